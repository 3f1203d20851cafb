"""Writing images: names derived from the prompt, never overwriting, atomic, with the parameters in PNG metadata."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

MAX_SLUG = 60


def slug(prompt: str) -> str:
    """A file-name-safe, bounded form of a prompt: letters, digits and single dashes."""
    text = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()
    return text[:MAX_SLUG].rstrip("-") or "image"


def png_info(params: dict) -> PngInfo:
    """Every parameter as its own text chunk, plus all of them as JSON under `parameters`."""
    info = PngInfo()
    for key, value in params.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("parameters", json.dumps(params))
    return info


def prompt_seeds(seed: int, number: int, num_images: int) -> list[int]:
    """The seeds of the images of prompt `number` (its place in the prompt list) for a run with `seed`: they follow
    the number, so an image does not depend on which process or batch made it."""
    return [seed + number * num_images + i for i in range(num_images)]


def png_name(prompt: str, seed: int) -> str:
    """The file name `save_png` gives an image first (it adds _n only when that name is taken)."""
    return f"{slug(prompt)}_{seed}.png"


def save_png(image: Image.Image, folder: Path, prompt: str, seed: int, params: dict) -> Path:
    """Write `image` as folder/<prompt-slug>_<seed>[_n].png, choosing a name no file has; returns the path."""
    base = png_name(prompt, seed).removesuffix(".png")
    tmp = folder / f".{base}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG", pnginfo=png_info(params))
    try:
        for n in range(10_000):
            path = folder / (f"{base}.png" if n == 0 else f"{base}_{n}.png")
            try:
                os.link(tmp, path)  # atomic, and fails instead of replacing an existing file
                return path
            except FileExistsError:
                continue
        raise OSError(f"no free file name for {base}.png in {str(folder)!r}")
    finally:
        tmp.unlink(missing_ok=True)


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, `columns` per row (default: all in one row up to 4)."""
    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
