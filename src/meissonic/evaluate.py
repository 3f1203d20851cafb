"""`meissonic eval shapes`: generate a fixed set of shapes prompts and judge every image automatically.

Three categories: single objects (colour-shape pairs seen in training), two objects with a relation, and held-out
colour-shape pairs. The prompt set and the seeds are fixed by `--seed`, so a run is reproducible; `--ground-truth`
judges the data set's own renderings of the same prompts instead, which checks the judge itself.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .judge import judge
from .shapes import Scene, random_scene, render

CATEGORIES = ("single", "two objects", "held-out")
COLUMNS = ("colour", "shape", "size", "position", "relation", "count", "fully_right")


def prompt_set(num: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """`num` scenes per category, the same for the same seed."""
    rng = random.Random(seed)
    chosen: dict[str, list[Scene]] = {c: [] for c in CATEGORIES}
    while len(chosen["single"]) < num or len(chosen["two objects"]) < num:
        scene = random_scene(rng)
        category = "single" if len(scene.objects) == 1 else "two objects"
        if len(chosen[category]) < num:
            chosen[category].append(scene)
    while len(chosen["held-out"]) < num:
        chosen["held-out"].append(random_scene(rng, held_out=True))
    return [(c, s) for c in CATEGORIES for s in chosen[c]]


def run_eval(make_image: Callable[[Scene, int], Image.Image], num: int, seed: int = 0,
             save: Path | None = None) -> dict:
    """Judge `make_image(scene, index)` for every prompt; returns per-category rates and per-image verdicts."""
    rows = []
    for index, (category, scene) in enumerate(prompt_set(num, seed)):
        image = make_image(scene, index)
        verdict = judge(scene, image)
        rows.append({"category": category, "prompt": scene.caption(), **verdict})
        if category == "held-out":
            rows[-1]["held_out"] = f"{scene.objects[0].colour} {scene.objects[0].shape}"
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            image.save(save / f"{index:04d}-{'ok' if verdict['fully_right'] else 'wrong'}.png")
    summary = {}
    for category in CATEGORIES:
        mine = [r for r in rows if r["category"] == category]
        summary[category] = {"n": len(mine)}
        for column in COLUMNS:
            values = [r[column] for r in mine if column in r]
            if values:
                summary[category][column] = sum(bool(v) for v in values) / len(values)
    return {"summary": summary, "held_out_pairs": held_out_pairs(rows), "images": rows}


def held_out_pairs(rows: list[dict]) -> dict[str, dict]:
    """The held-out category per held-out pair (the first object of its scenes): how often that object came out in
    its colour and shape, how often the whole scene was fully right, and which shapes were drawn in its colour
    instead ("nothing": no object of its colour)."""
    pairs: dict[str, dict] = {}
    for row in rows:
        if row["category"] != "held-out":
            continue
        drawn = row["drawn"][0] or "nothing"
        right = drawn == row["held_out"].split()[-1]
        entry = pairs.setdefault(row["held_out"], {"n": 0, "pair_right": 0, "fully_right": 0, "instead": {}})
        entry["n"] += 1
        entry["pair_right"] += right
        entry["fully_right"] += bool(row["fully_right"])
        if not right:
            entry["instead"][drawn] = entry["instead"].get(drawn, 0) + 1
    for entry in pairs.values():
        entry["pair_right"] /= entry["n"]
        entry["fully_right"] /= entry["n"]
        entry["instead"] = dict(sorted(entry["instead"].items(), key=lambda kv: -kv[1]))
    return dict(sorted(pairs.items()))


def ground_truth_images(seed: int = 0) -> Callable[[Scene, int], Image.Image]:
    rng = random.Random(seed + 1)
    return lambda scene, index: render(scene, 256, rng)


def reconstructed_images(vqvae, seed: int = 0) -> Callable[[Scene, int], Image.Image]:
    """The data set's renderings passed through a tokenizer (encode, decode): the best a model on it can score."""
    import numpy as np
    import torch

    from .vq import decode_tokens, encode_image

    truth = ground_truth_images(seed)

    def make(scene: Scene, index: int) -> Image.Image:
        pixels = torch.from_numpy(np.asarray(truth(scene, index), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        image = decode_tokens(vqvae, encode_image(vqvae, pixels))[0]
        return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    return make


def pipeline_images(pipe, steps: int | None, guidance: float | None, seed: int, size: int | None = None,
                    sampling: dict | None = None):
    """`sampling`: more pipeline keywords (schedule, guidance interval and ramp, order)."""
    import torch

    def make(scene: Scene, index: int) -> Image.Image:
        return pipe(prompt=scene.caption(), num_inference_steps=steps, guidance_scale=guidance,
                    height=size, width=size, generator=torch.Generator().manual_seed(seed + index),
                    **(sampling or {})).images[0]

    return make


def format_summary(summary: dict) -> str:
    lines = [f"{'category':12} {'n':>4} " + " ".join(f"{c.replace('_', ' '):>11}" for c in COLUMNS)]
    for category, row in summary.items():
        cells = [f"{row[c]:11.1%}" if c in row else f"{'-':>11}" for c in COLUMNS]
        lines.append(f"{category:12} {row['n']:>4} " + " ".join(cells))
    return "\n".join(lines)


def format_held_out(pairs: dict) -> str:
    """One line per held-out pair: its object right, the scene fully right, and what was drawn instead."""
    lines = [f"{'held-out pair':16} {'n':>4} {'pair right':>11} {'fully right':>11}  drawn instead"]
    for name, e in pairs.items():
        instead = ", ".join(f"{shape} {count}" for shape, count in e["instead"].items()) or "-"
        lines.append(f"{name:16} {e['n']:>4} {e['pair_right']:11.1%} {e['fully_right']:11.1%}  {instead}")
    return "\n".join(lines)


def write_report(path: Path, result: dict, settings: dict) -> None:
    path.write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
