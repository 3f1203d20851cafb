"""An automatic judge for shapes images: what does the picture show, and does it match its prompt?

Classical image analysis, no learned model: the background is the border's colour; object pixels are those near a
palette colour and away from the background; each colour's connected regions are objects, whose shape comes from
how they fill their convex hull (a star ~0.56, the rest ~1) and bounding box (square 1.0, circle 0.79, triangle and
diamond 0.5, told apart by where they are wide), size from area, position from the centroid. Checked on the data set's own images (`eval shapes
--ground-truth`), where it must be right at least 98% of the time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import BACKGROUNDS, COLOURS, PLACES, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, Shape

SIDE = 256
MIN_AREA = 150  # pixels at 256x256: smaller regions are noise
PALETTE_DISTANCE = 90.0  # a pixel this close to a palette colour counts as that colour
BACKGROUND_DISTANCE = 60.0
# area / radius^2 of each shape (radius = the drawing radius, see shapes.render)
AREA_FACTOR = {"circle": math.pi, "square": 4.0, "diamond": 2.0, "triangle": 1.299, "star": 1.322}
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2


@dataclass
class Found:
    colour: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) as shares of the side
    area: int


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, by label propagation (each pixel takes its neighbours' max label)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = labels.copy()
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return [labels == value for value in np.unique(labels) if value]


def _hull_area(region: np.ndarray) -> float:
    """Area of the convex hull of a region (pixel centres widened by half a pixel), from each row's extremes."""
    points = []
    for row in np.nonzero(region.any(axis=1))[0]:
        cols = np.nonzero(region[row])[0]
        points += [(cols[0] - 0.5, row - 0.5), (cols[-1] + 0.5, row - 0.5),
                   (cols[0] - 0.5, row + 0.5), (cols[-1] + 0.5, row + 0.5)]
    points = sorted(set(points))

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = half(points)[:-1] + half(points[::-1])[:-1]
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def classify_shape(region: np.ndarray) -> str:
    rows, cols = np.nonzero(region)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    area = region.sum()
    if area / _hull_area(region) < 0.75:  # the only concave shape: a star fills ~56% of its hull
        return "star"
    fill = area / (height * width)
    if fill > 0.89:
        return "square"
    if fill > 0.68:
        return "circle"
    box = region[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    widths = box.sum(axis=1)
    third = max(1, height // 3)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    return "triangle" if top < 0.7 * bottom else "diamond"


def analyze(image: Image.Image) -> tuple[str, list[Found]]:
    """(background colour name, objects found, largest first)."""
    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda n: np.linalg.norm(bg_rgb - BACKGROUNDS[n]))
    away = np.linalg.norm(pixels - bg_rgb, axis=-1) > BACKGROUND_DISTANCE
    names = [n for n in COLOURS if n != background]
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)  # (S, S, colours)
    nearest, closeness = distance.argmin(-1), distance.min(-1)
    found = []
    for index, name in enumerate(names):
        mask = away & (nearest == index) & (closeness < PALETTE_DISTANCE)
        if mask.sum() < MIN_AREA:
            continue
        for region in _components(mask):
            area = int(region.sum())
            if area < MIN_AREA:
                continue
            shape = classify_shape(region)
            rows, cols = np.nonzero(region)
            center = (cols.mean() / SIDE, rows.mean() / SIDE)
            radius = math.sqrt(area / AREA_FACTOR[shape]) / SIDE
            position = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], center))
            found.append(Found(name, shape, "large" if radius > SIZE_SPLIT else "small", position, center, area))
    return background, sorted(found, key=lambda f: -f.area)


_OBJECT = rf"a (?P<size{{i}}>{'|'.join(SIZES)}) (?P<colour{{i}}>{'|'.join(COLOURS)}) (?P<shape{{i}}>{'|'.join(SHAPES)})"
_SINGLE = re.compile(_OBJECT.format(i=0) + rf" (?P<place>{'|'.join(PLACES.values())})"
                     rf"(, on a (?P<background>{'|'.join(BACKGROUNDS)}) background)?")
_DOUBLE = re.compile(_OBJECT.format(i=0) + rf" (?P<relation>{'|'.join(RELATIONS)}) " + _OBJECT.format(i=1)
                     + rf"(, on a (?P<background>{'|'.join(BACKGROUNDS)}) background)?")


def parse_prompt(prompt: str) -> Scene:
    """The scene a shapes prompt asks for (the data set's caption grammar; the background part is optional)."""
    text = prompt.strip().lower()
    if match := _DOUBLE.fullmatch(text):
        places = RELATIONS[match["relation"]]
        objects = [Shape(match[f"shape{i}"], match[f"colour{i}"], match[f"size{i}"], places[i]) for i in (0, 1)]
        return Scene(objects, match["background"] or "", match["relation"])
    if match := _SINGLE.fullmatch(text):
        place = {v: k for k, v in PLACES.items()}[match["place"]]
        return Scene([Shape(match["shape0"], match["colour0"], match["size0"], place)], match["background"] or "")
    raise ValueError(f"prompt {prompt!r} is not in the shapes grammar, e.g. 'a large red circle on the left'")


def _relation(first: Found, second: Found) -> str:
    dx, dy = second.center[0] - first.center[0], second.center[1] - first.center[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def judge(scene: Scene, image: Image.Image) -> dict[str, bool | list[str | None]]:
    """Per-attribute verdicts for one image; `fully_right` is what the targets count.

    `drawn` names, for each wanted object, the shape of the object the judge matched to it (one of its colour, the
    right shape first), or None when nothing of its colour was found."""
    background, found = analyze(image)
    matches: list[Found | None] = []
    for wanted in scene.objects:
        same_colour = [f for f in found if f.colour == wanted.colour and all(f is not m for m in matches)]
        best = next((f for f in same_colour if f.shape == wanted.shape), same_colour[0] if same_colour else None)
        matches.append(best)
    result = {
        "colour": all(m is not None for m in matches),
        "shape": all(m is not None and m.shape == w.shape for m, w in zip(matches, scene.objects)),
        "size": all(m is not None and m.size == w.size for m, w in zip(matches, scene.objects)),
        "count": len(found) == len(scene.objects),
        "background": not scene.background or background == scene.background,
    }
    result["objects"] = result["colour"] and result["shape"]
    result["drawn"] = [m.shape if m is not None else None for m in matches]  # per wanted object: the shape found
    if len(scene.objects) == 1:
        result["position"] = matches[0] is not None and matches[0].position == scene.objects[0].position
        result["fully_right"] = result["objects"] and result["position"]
    else:
        result["relation"] = None not in matches and _relation(matches[0], matches[1]) == scene.relation
        result["fully_right"] = result["objects"] and result["relation"]
    return result
