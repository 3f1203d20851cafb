"""What both APIs do with images and jobs: decode uploads within the limits, encode results, run a job."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..outputs import png_info
from .engine import Engine, Job, JobError, Made

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def open_upload(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Bytes of an uploaded image -> a loaded PIL image; its header is read first, so an image beyond `max_pixels`
    is refused before it is decoded (JobError naming `what`)."""
    if not data:
        raise JobError(f"{what} is empty", what)
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise JobError(f"{what} of {image.width}x{image.height} pixels: at most {max_pixels} pixels", what)
        image.load()
    except JobError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise JobError(f"{what} is not an image this server can read (PNG, JPEG, WebP, ...): "
                       f"{type(err).__name__}", what) from None
    return image


def decode_base64_image(text: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image, with or without a `data:image/...;base64,` prefix (as AUTOMATIC1111 tolerates)."""
    if not isinstance(text, str):
        raise JobError(f"{what} must be a base64 string", what)
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise JobError(f"{what} is not valid base64", what) from None
    return open_upload(data, what, max_pixels)


def encode_image(image: Image.Image, params: dict, output_format: str = "png", quality: int | None = None) -> str:
    """An image as base64: PNG with its parameters in text chunks (as the CLI writes them), or JPEG/WebP."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", pnginfo=png_info(params))
    else:
        image.convert("RGB").save(buffer, format=FORMATS[output_format], quality=90 if quality is None else quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def white_mask(image: Image.Image) -> np.ndarray:
    """A mask image where white (bright) means redraw -> (H, W) bool (AUTOMATIC1111's convention)."""
    return np.asarray(image.convert("L")) >= 128


def transparent_mask(image: Image.Image) -> np.ndarray:
    """A mask image whose fully transparent pixels mark the area to edit -> (H, W) bool (OpenAI's convention)."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise JobError("mask must have an alpha channel: its fully transparent pixels mark the area to edit", "mask")
    return np.asarray(image.convert("RGBA"))[..., 3] == 0


async def run_job(engine: Engine, job: Job) -> Made:
    """Check, queue and await a job (the errors are the engine's: JobError, QueueFull, NotReady, or the model's)."""
    engine.check(job)
    return await asyncio.wrap_future(engine.submit(job))
