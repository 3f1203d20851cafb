"""A procedural captioned data set: one or two plain shapes on a plain background, with exact captions.

"a large red circle on the left, on a white background", "a small blue triangle above a yellow square, on a gray
background". Object colours are ones people name alike; the background never shares an object's colour. Some
colour-shape pairs (`HELD_OUT`) never appear in the training split, to test generalisation. Written as parquet in
the training format (an `image` struct with PNG bytes, a `caption`), plus the scene as JSON for judging.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 20, 20), "orange": (245, 130, 0), "yellow": (245, 225, 0), "green": (20, 160, 40),
    "blue": (20, 60, 230), "purple": (130, 40, 180), "white": (255, 255, 255), "black": (0, 0, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": 0.11, "large": 0.2}  # radius as a share of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
# relation -> (first object's position, second object's position)
RELATIONS = {"to the left of": ("left", "right"), "to the right of": ("right", "left"),
             "above": ("top", "bottom"), "below": ("bottom", "top")}
SHORT_CAPTIONS = 0.25  # share of captions without ", on a ... background"
OMITTABLE = ("size", "colour", "shape")  # what a partial caption may leave unsaid about one object
JITTER = 0.04  # default largest shift of an object's center, as a share of the side
HELD_OUT = {("purple", "triangle"), ("orange", "circle"), ("green", "star"), ("yellow", "diamond")}


@dataclass
class Shape:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self, omit: str | None = None) -> str:
        """'a large red circle'; `omit` leaves the size or colour unsaid, or names the shape only as 'shape'."""
        words = [self.size if omit != "size" else "", self.colour if omit != "colour" else "",
                 self.shape if omit != "shape" else "shape"]
        return "a " + " ".join(w for w in words if w)


@dataclass
class Scene:
    objects: list[Shape]
    background: str
    relation: str | None = None

    def caption(self, background: bool = True, omit: tuple[int, str] | None = None) -> str:
        """The exact caption; `omit=(i, what)` leaves `what` (one of OMITTABLE) of object i unsaid."""
        said = [o.phrase(omit[1] if omit and omit[0] == i else None) for i, o in enumerate(self.objects)]
        if len(self.objects) == 1:
            body = f"{said[0]} {PLACES[self.objects[0].position]}"
        else:
            body = f"{said[0]} {self.relation} {said[1]}"
        return f"{body}, on a {self.background} background" if background else body

    def to_json(self) -> str:
        return json.dumps({"objects": [asdict(o) for o in self.objects], "background": self.background,
                           "relation": self.relation})


def random_scene(rng: random.Random, held_out: bool = False) -> Scene:
    """A scene of one or two objects; `held_out` scenes contain at least one held-out colour-shape pair."""
    while True:
        count = rng.choice((1, 2))
        pairs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(count)]
        if held_out:
            pairs[0] = rng.choice(sorted(HELD_OUT))
        if not held_out and any(p in HELD_OUT for p in pairs):
            continue
        colours = {c for c, _ in pairs}
        backgrounds = [b for b in BACKGROUNDS if b not in colours]
        if not backgrounds or (count == 2 and pairs[0] == pairs[1]):
            continue
        background = rng.choice(backgrounds)
        if count == 1:
            objects = [Shape(pairs[0][1], pairs[0][0], rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))]
            return Scene(objects, background)
        relation = rng.choice(list(RELATIONS))
        places = RELATIONS[relation]
        objects = [Shape(s, c, rng.choice(list(SIZES)), p) for (c, s), p in zip(pairs, places)]
        return Scene(objects, background, relation)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render(scene: Scene, side: int = 256, rng: random.Random | None = None, jitter: float = JITTER) -> Image.Image:
    """Draw the scene (supersampled 4x for clean edges); centers move by up to `jitter` of the side."""
    return draw(scene, side, jitters(scene, rng, jitter))


def jitters(scene: Scene, rng: random.Random | None, jitter: float = JITTER) -> list[tuple[float, float]]:
    """The (dx, dy) shift of each object's center, as shares of the side (none without `rng`)."""
    if rng is None:
        return [(0.0, 0.0)] * len(scene.objects)
    return [(rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)) for _ in scene.objects]


def draw(scene: Scene, side: int, shifts: list[tuple[float, float]]) -> Image.Image:
    scale = 4
    big = side * scale
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    for obj, (dx, dy) in zip(scene.objects, shifts):
        fx, fy = POSITIONS[obj.position]
        cx, cy, r = (fx + dx) * big, (fy + dy) * big, SIZES[obj.size] * big
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            pen.polygon(_polygon(obj.shape, cx, cy, r), fill=colour)
    return image.resize((side, side), Image.LANCZOS)


def _png(job: tuple[Scene, int, list[tuple[float, float]]]) -> bytes:
    buffer = io.BytesIO()
    draw(*job).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shapes(out: Path, num: int, seed: int = 0, side: int = 256, held_out: bool = False,
                 jitter: float = JITTER, partial: float = 0.0) -> Path:
    """Write `num` scenes as parquet to `out` (a .parquet file); returns it. Refuses to overwrite.

    Each object's center moves by up to `jitter` of the side (0: every object exactly at its named place); the scenes
    drawn for a seed are the same whatever the jitter and the wording. A `partial` share of the captions leave one
    thing about one object unsaid (its size, its colour, or its shape, said as "shape"); the images and the other
    captions stay those of `partial=0`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if num < 1:
        raise ValueError(f"--num {num}: must be at least 1")
    if side < 64 or side % 16:
        raise ValueError(f"--size {side}: must be a multiple of 16, at least 64")
    if not 0 <= jitter <= 0.1:
        raise ValueError(f"--jitter {jitter}: must be between 0 and 0.1 (a share of the image side)")
    if not 0 <= partial <= 1:
        raise ValueError(f"--partial-captions {partial}: must be between 0 and 1 (a share of the captions)")
    out = Path(out)
    if out.suffix != ".parquet":
        out = out / "shapes.parquet"
    if out.exists():
        raise ValueError(f"{str(out)!r} exists; choose a new path")
    rng = random.Random(seed)
    wording = random.Random(seed + 1)  # its own stream: the scenes stay those of earlier versions
    omitting = random.Random(seed + 2)  # and this one: other captions stay those of earlier versions
    jobs, captions = [], []
    for _ in range(num):  # scenes and jitter drawn in order (the data set is fixed by the seed) ...
        scene = random_scene(rng, held_out)
        jobs.append((scene, side, jitters(scene, rng, jitter)))
        # a quarter of the captions leave the background unsaid, so prompts without one work too
        background = wording.random() >= SHORT_CAPTIONS
        omit = None
        if omitting.random() < partial:
            omit = (omitting.randrange(len(scene.objects)), omitting.choice(OMITTABLE))
        captions.append(scene.caption(background=background, omit=omit))
    workers = min(os.cpu_count() or 1, 8, max(1, num // 256))
    if workers > 1:  # ... and drawn on every core
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            pngs = list(pool.map(_png, jobs, chunksize=64))
    else:
        pngs = [_png(job) for job in jobs]
    images = [{"bytes": png, "path": None} for png in pngs]
    scenes = [job[0].to_json() for job in jobs]
    table = pa.table({"image": images, "caption": captions, "scene": scenes,
                      "split": ["heldout" if held_out else "train"] * num})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=256)
    try:
        os.link(tmp, out)  # appears whole, and never replaces a file that appeared meanwhile
    finally:
        tmp.unlink()
    return out
