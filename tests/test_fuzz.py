"""Property-based fuzzing (hypothesis) of the pipeline, the edits and the CLI with hostile input.

Every case must either work or raise the project's own clear error (a ValueError subclass with a message); nothing
may crash the process, hang, or write outside the output folder. The number of cases run is printed at the end
(`pytest -s tests/test_fuzz.py`).
"""

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from meissonic.cli import main
from meissonic.edit import EditError, img2img, inpaint, open_image, outpaint, to_rgb
from meissonic.pipeline import MeissonicPipeline

CASES: Counter = Counter()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"]


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nfuzz cases run: {sum(CASES.values())} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})")


def works_or_clear_error(call, errors=(ValueError,)):
    """Run `call`; a raised error must be one of ours (or a ValueError) with a non-empty one-line message."""
    try:
        return call()
    except errors as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return None


prompts = st.text(st.characters(codec="utf-8"), max_size=400) | st.sampled_from(
    ["", " ", "\x00", "\n\t\r", "a" * 5000, "🙂" * 300, "\u202e reversed", "<|endoftext|>" * 20])


@FUZZ
@given(prompt=prompts, negative=prompts)
def test_any_prompt_makes_an_image(pipe, prompt, negative):
    CASES["prompts"] += 1
    image = pipe(prompt=prompt, negative_prompt=negative, height=32, width=32, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@FUZZ
@given(height=st.integers(-32, 96), width=st.integers(-32, 96), steps=st.integers(-2, 4),
       guidance=st.floats(allow_nan=True, allow_infinity=True, width=32), seed=st.integers(0, 2**63 - 1),
       images=st.integers(-1, 2))
def test_sizes_steps_guidance_seeds(pipe, height, width, steps, guidance, seed, images):
    CASES["sampling options"] += 1
    out = works_or_clear_error(lambda: pipe(prompt="x", height=height, width=width, num_inference_steps=steps,
                                            guidance_scale=guidance, num_images_per_prompt=images,
                                            generator=torch.Generator().manual_seed(seed), output_type="np").images)
    if out is not None:
        assert out.shape == (images, height, width, 3) and math.isfinite(guidance)
        assert np.isfinite(out).all()


@st.composite
def pictures(draw):
    """PIL images in any mode and odd sizes, including 1x1 and alpha."""
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**16))
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257, mode="I;16")
    return rgb.convert(mode)


@FUZZ
@given(image=pictures(), strength=st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0, 1]))
def test_img2img_any_image_any_strength(pipe, image, strength):
    CASES["img2img"] += 1
    out = works_or_clear_error(lambda: img2img(pipe, "x", image, strength, num_inference_steps=1,
                                               generator=torch.Generator().manual_seed(0)), (EditError,))
    if out is not None:
        assert 0 <= strength <= 1 and out.images[0].mode == "RGB"


@FUZZ
@given(image=pictures(), mask_shape=st.tuples(st.integers(0, 72), st.integers(0, 72)), seed=st.integers(0, 99),
       density=st.floats(0, 1), grow=st.integers(-1, 3))
def test_inpaint_any_mask(pipe, image, mask_shape, seed, density, grow):
    CASES["inpaint"] += 1
    mask = np.random.default_rng(seed).random(mask_shape) < density
    out = works_or_clear_error(lambda: inpaint(pipe, "x", image, mask, grow=grow, num_inference_steps=1,
                                               generator=torch.Generator().manual_seed(0)), (EditError,))
    if out is not None:
        assert out.images[0].size == image.size


@FUZZ
@given(image=pictures(), margins=st.tuples(*[st.integers(-20, 300)] * 4))
def test_outpaint_any_margins(pipe, image, margins):
    CASES["outpaint"] += 1
    left, right, top, bottom = margins
    out = works_or_clear_error(lambda: outpaint(pipe, "x", image, left=left, right=right, top=top, bottom=bottom,
                                                num_inference_steps=1, generator=torch.Generator().manual_seed(0)),
                               (EditError,))
    if out is not None:
        assert out.images[0].width >= image.width + left + right


@st.composite
def image_files(draw):
    """Bytes of image files: whole, truncated, corrupted, or not images at all."""
    buffer = io.BytesIO()
    picture = draw(pictures())
    fmt = draw(st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "JPEG"]))
    try:
        picture.save(buffer, format=fmt)
    except (OSError, ValueError):  # a mode this format cannot hold
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format=fmt)
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "truncate", "flip", "random", "empty", "huge"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    elif damage == "random":
        data = draw(st.binary(max_size=300))
    elif damage == "empty":
        data = b""
    elif damage == "huge":  # a PNG header claiming 60000 x 60000 pixels (a decompression bomb)
        data = huge_png(draw(st.integers(20_000, 60_000)))
    return data


def huge_png(side: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png(60_000))
    with pytest.raises(EditError, match="cannot read image"):
        open_image(path)


@FUZZ
@given(data=image_files())
def test_any_file_opens_or_is_refused_clearly(tmp_path_factory, data):
    CASES["image files"] += 1
    path = tmp_path_factory.mktemp("files") / "upload.img"
    path.write_bytes(data)
    image = works_or_clear_error(lambda: to_rgb(open_image(path)), (EditError,))
    if image is not None:
        assert image.mode == "RGB" and image.width > 0 and image.height > 0


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(prompt=prompts.filter(lambda p: not p.startswith("-")), seed=st.integers(-5, 2**64),
       steps=st.integers(-1, 3), size=st.integers(-16, 80), guidance=st.sampled_from(["3", "-1", "nan", "inf", "0"]))
def test_cli_never_crashes_nor_writes_outside_out(tiny_folder, tmp_path_factory, capsys, prompt, seed, steps, size,
                                                  guidance):
    CASES["cli"] += 1
    root = tmp_path_factory.mktemp("cli")
    before = tree(root)
    code = main(["generate", prompt, "--model", str(tiny_folder), "--out", str(root / "out"), "--seed", str(seed),
                 "--steps", str(steps), "--width", str(size), "--height", "32", "--guidance", guidance])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("meissonic: error: ") and len(err.strip().splitlines()) == 1
    written = tree(root) - before
    assert all(name == "out" or name.startswith("out/") for name in written), written
    assert all("/" not in name.removeprefix("out/") for name in written)  # flat: no path from the prompt
