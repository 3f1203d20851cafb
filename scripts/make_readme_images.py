"""Make the README's pictures with the shipped demo models: a grid of prompts, one example of each edit, and the
one-step student (`demo-1step`) beside its teacher on the same prompts and seeds.

    python scripts/make_readme_images.py [OUT_DIR]      (default docs/; seeds fixed, so the pictures are reproducible)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from meissonic import MeissonicPipeline
from meissonic.edit import img2img, inpaint, outpaint

GRID_PROMPTS = [
    "a large red circle on the left",
    "a small blue square on the right",
    "a large green triangle at the top, on a black background",
    "a small yellow star in the center",
    "a large purple diamond at the bottom, on a gray background",
    "a small orange square on the left, on a black background",
    "a large white circle in the center, on a black background",
    "a small black triangle on the right",
    "a large red circle to the left of a small blue square",
    "a small green triangle above a large yellow circle",
    "a large purple square below a small orange triangle, on a white background",
    "a large yellow diamond on the left (held out)",
]


def captioned(images: list[Image.Image], captions: list[str], columns: int, cell: int = 256) -> Image.Image:
    """Images in a grid, each with its caption underneath."""
    rows = -(-len(images) // columns)
    text_h = 34
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(image.resize((cell, cell * image.height // image.width)), (x, y))
        words, lines = caption.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) > 40:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((x + 4, y + cell + 2), "\n".join(lines[:2]), fill="black", spacing=2)
    return grid


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe = MeissonicPipeline.from_pretrained("demo", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p.replace(" (held out)", "") for p in GRID_PROMPTS]
    images = [pipe(prompt=p, generator=torch.Generator().manual_seed(i)).images[0] for i, p in enumerate(prompts)]
    captioned(images, GRID_PROMPTS, columns=4).save(out / "demo-grid.png")

    side = pipe.defaults["resolution"]
    source = pipe(prompt="a large blue square on the left", generator=torch.Generator().manual_seed(1)).images[0]
    mask = np.zeros((side, side), dtype=bool)
    mask[side // 4:side * 3 // 4, side * 9 // 16:] = True  # the right part, where the square is not
    edits = [
        ("input: a large blue square on the left", source),
        ("img2img 0.6: a large red circle on the left",
         img2img(pipe, "a large red circle on the left", source, 0.6,
                 generator=torch.Generator().manual_seed(0)).images[0]),
        ("inpaint (right part): a small yellow star",
         inpaint(pipe, "a large blue square to the left of a small yellow star", source, mask,
                 generator=torch.Generator().manual_seed(0)).images[0]),
        (f"outpaint +{side // 2} px right: a green circle",
         outpaint(pipe, "a large blue square to the left of a large green circle", source, right=side // 2,
                  generator=torch.Generator().manual_seed(0)).images[0]),
    ]
    captioned([e[1] for e in edits], [e[0] for e in edits], columns=4).save(out / "demo-edits.png")

    student = MeissonicPipeline.from_pretrained("demo-1step", torch_dtype=torch.float32)
    student.set_progress_bar_config(disable=True)
    chosen = [0, 1, 2, 8, 9, 11]  # three single objects, two pairs and a held-out pair
    pairs = [(f"12 steps: {GRID_PROMPTS[i]}", images[i]) for i in chosen]
    pairs += [(f"1 step: {GRID_PROMPTS[i]}", student(prompt=prompts[i], generator=torch.Generator().manual_seed(i))
               .images[0]) for i in chosen]
    captioned([p[1] for p in pairs], [p[0] for p in pairs], columns=len(chosen)).save(out / "demo-1step-grid.png")
    print(f"wrote {out / 'demo-grid.png'}, {out / 'demo-edits.png'} and {out / 'demo-1step-grid.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
