"""The procedural shapes data set: captions match scenes, held-out pairs stay out of training, files are safe."""

import io
import json
import random
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meissonic.cli import main
from meissonic.shapes import BACKGROUNDS, COLOURS, HELD_OUT, SHAPES, random_scene, render, write_shapes


def test_scenes_cover_the_vocabulary_and_respect_the_rules():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    seen_colours = {o.colour for s in scenes for o in s.objects}
    seen_shapes = {o.shape for s in scenes for o in s.objects}
    assert seen_colours == set(COLOURS) and seen_shapes == set(SHAPES)
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    for scene in scenes:
        assert all((o.colour, o.shape) not in HELD_OUT for o in scene.objects)
        assert scene.background not in {o.colour for o in scene.objects}
    held = [random_scene(rng, held_out=True) for _ in range(200)]
    assert all((h.objects[0].colour, h.objects[0].shape) in HELD_OUT for h in held)


def test_captions_name_every_object_in_order():
    rng = random.Random(3)
    for _ in range(200):
        scene = random_scene(rng)
        caption = scene.caption()
        assert caption.endswith(f", on a {scene.background} background")
        positions = [caption.index(o.phrase()) for o in scene.objects]
        assert positions == sorted(positions)
        if scene.relation:
            assert f" {scene.relation} " in caption
        assert scene.caption(background=False) == caption.removesuffix(f", on a {scene.background} background")


def test_render_puts_the_object_colour_where_the_caption_says():
    rng = random.Random(5)
    for _ in range(50):
        scene = random_scene(rng)
        image = np.asarray(render(scene, 128)).astype(int)
        for obj in scene.objects:
            x, y = {"left": (32, 64), "right": (96, 64), "top": (64, 32), "bottom": (64, 96), "center": (64, 64)}[
                obj.position]
            assert np.abs(image[y, x] - COLOURS[obj.colour]).max() < 40, (scene.caption(), obj)


def test_write_and_command(tmp_path, capsys):
    path = write_shapes(tmp_path / "d", 40, seed=1, side=64)
    table = pq.read_table(path)
    short = [c for c in table["caption"].to_pylist() if not c.endswith(" background")]
    assert 0 < len(short) < 20  # some captions leave the background unsaid (a quarter, on average)
    assert table.num_rows == 40 and set(table.column_names) >= {"image", "caption", "scene", "split"}
    image = Image.open(io.BytesIO(table["image"][0].as_py()["bytes"]))
    assert image.size == (64, 64)
    scene = json.loads(table["scene"][0].as_py())
    assert scene["objects"] and table["caption"][0].as_py().startswith("a ")
    with pytest.raises(ValueError, match="exists"):
        write_shapes(path, 3)
    assert main(["data", "shapes", "--num", "4", "--out", str(tmp_path / "x.parquet"), "--held-out"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "shapes", "--num", "0", "--out", str(tmp_path / "y.parquet")]) == 2
    assert "--num 0" in capsys.readouterr().err


def test_parallel_drawing_gives_the_images_of_the_sequential_order(tmp_path):
    from meissonic.shapes import jitters

    path = write_shapes(tmp_path / "p.parquet", 520, seed=4, side=64)  # enough rows to draw on every core
    table = pq.read_table(path)
    rng = random.Random(4)
    for row in range(520):
        scene = random_scene(rng)
        expected = render(scene, 64, rng) if row in (0, 1, 519) else jitters(scene, rng)
        if row in (0, 1, 519):
            got = Image.open(io.BytesIO(table["image"][row].as_py()["bytes"]))
            assert np.array_equal(np.asarray(got), np.asarray(expected)), row
            assert json.loads(table["scene"][row].as_py())["background"] == scene.background


def test_partial_captions_leave_one_thing_unsaid_and_change_nothing_else(tmp_path, capsys):
    from meissonic.shapes import Shape

    star = Shape("star", "green", "large", "left")
    assert star.phrase() == "a large green star"
    assert [star.phrase(w) for w in ("size", "colour", "shape")] == [
        "a green star", "a large star", "a large green shape"]
    full = write_shapes(tmp_path / "full.parquet", 300, seed=2, side=64)
    part = write_shapes(tmp_path / "part.parquet", 300, seed=2, side=64, partial=0.5)
    a, b = pq.read_table(full), pq.read_table(part)
    assert a["image"].to_pylist() == b["image"].to_pylist() and a["scene"].to_pylist() == b["scene"].to_pylist()
    changed = 0
    for caption, partial, scene in zip(a["caption"].to_pylist(), b["caption"].to_pylist(), a["scene"].to_pylist()):
        if caption == partial:
            continue
        changed += 1
        # exactly one word of one object is gone (its size or colour) or replaced by "shape"
        objects = json.loads(scene)["objects"]
        words, said = Counter(caption.replace(",", "").split()), Counter(partial.replace(",", "").split())
        gone, added = words - said, said - words
        assert sum(gone.values()) == 1, (caption, partial)
        word = next(iter(gone))
        attribute = next(k for k in ("size", "colour", "shape") if word in {o[k] for o in objects})
        assert added == (Counter(["shape"]) if attribute == "shape" else Counter()), (caption, partial)
    assert 100 < changed < 200  # about half of 300
    assert main(["data", "shapes", "--num", "4", "--out", str(tmp_path / "z.parquet"),
                 "--partial-captions", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--partial-captions 1.5" in err and "between 0 and 1" in err
