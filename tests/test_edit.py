"""Image editing (img2img, inpaint, outpaint) from Python and the CLI, on the tiny random model (f=16, 128 px)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic.cli import main
from meissonic.edit import (
    EditError,
    img2img,
    image_tokens,
    inpaint,
    open_image,
    outpaint,
    read_mask,
    to_mask,
    to_rgb,
    token_mask,
)
from meissonic.pipeline import MeissonicPipeline
from meissonic.sizes import LargeSizeWarning, SizePolicy
from meissonic.step_cache import CachePlan
from meissonic.vq import decode_tokens


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(width=64, height=48, seed=0) -> Image.Image:
    """A picture with structure: smooth gradients plus a few blocks, so its tokens are not all alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        pixels[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- img2img


@pytest.mark.exact
def test_strength_0_is_the_tokenizer_copy_and_samples_nothing(pipe):
    image = picture()
    calls = []
    out = img2img(pipe, "x", image, strength=0.0, generator=gen(), guidance_scale=1.0,
                  callback=lambda *a: calls.append(a))
    tokens = image_tokens(pipe, image)
    assert torch.equal(out.tokens, tokens) and not out.masked.any() and calls == []
    copy = pipe.image_processor.postprocess(decode_tokens(pipe.vqvae, tokens), output_type="pil")[0]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(copy))


def test_strength_1_redraws_every_token(pipe):
    out = img2img(pipe, "x", picture(), strength=1.0, generator=gen(), num_inference_steps=4)
    assert out.masked.all()


@pytest.mark.exact
def test_change_grows_with_strength(pipe):
    image = picture()
    original = image_tokens(pipe, image)
    changed = []
    for strength in (0.25, 0.5, 0.75, 1.0):
        out = img2img(pipe, "x", image, strength=strength, generator=gen(1), num_inference_steps=4)
        assert out.masked.float().mean().item() == pytest.approx(strength, abs=1 / 12)  # 12 tokens of 96 per 1/8
        assert torch.equal(out.tokens[~out.masked], original.expand_as(out.tokens)[~out.masked])
        changed.append((out.tokens != original).float().mean().item())
    assert changed == sorted(changed) and changed[0] < changed[-1], changed


def test_img2img_size_and_batch(pipe):
    out = img2img(pipe, ["a", "b"], picture(70, 50), strength=0.5, num_images_per_prompt=2,
                  generator=[gen(i) for i in range(4)], num_inference_steps=2)
    assert len(out.images) == 4 and out.images[0].size == (64, 48)  # rounded to the 16-pixel patch
    with pytest.raises(EditError, match="strength=1.5 must be a number in"):
        img2img(pipe, "x", picture(), strength=1.5)
    with pytest.raises(EditError, match="got 3 generators for 2 images"):
        img2img(pipe, "x", picture(), num_images_per_prompt=2, generator=[gen(), gen(), gen()])


# ---------------------------------------------------------------------------------------------- inpaint


FEWER_PASSES = {"exact": {}, "interval": {"guidance_interval": (0.25, 0.75)}, "ramp": {"guidance_ramp": True},
                "halton": {"order": "halton", "masking_schedule": "arccos"}, "fast": {"speed": "fast"},
                "fastest": {"speed": "fastest"}, "cached": {"step_cache": CachePlan(warmup=0, every=3, share=0.3)},
                "cached-ramp": {"step_cache": CachePlan(warmup=0, every=3, share=0.5), "guidance_ramp": True}}


@pytest.mark.exact
@pytest.mark.parametrize("knobs", list(FEWER_PASSES))
def test_inpaint_never_changes_tokens_outside_the_mask(pipe, knobs):
    image = picture()
    mask = np.zeros((48, 64), dtype=bool)
    mask[10:20, 20:30] = True  # touches tokens (0..1, 1)
    out = inpaint(pipe, "x", image, mask, generator=gen(), num_inference_steps=4, keep_unmasked=False,
                  guidance_scale=3.0, **FEWER_PASSES[knobs])
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0:2, 1] = True
    assert torch.equal(out.masked[0], expected)
    original = image_tokens(pipe, image)[0]
    assert torch.equal(out.tokens[0][~expected], original[~expected])
    assert not torch.equal(out.tokens[0][expected], original[expected])  # a random model redraws them differently


@pytest.mark.exact
def test_inpaint_keeps_the_inputs_own_pixels(pipe):
    image = picture()
    mask = np.zeros((48, 64), dtype=bool)
    mask[16:32, 16:32] = True  # exactly token (1, 1)
    out = inpaint(pipe, "x", image, mask, generator=gen(), num_inference_steps=4)
    result, source = np.asarray(out.images[0]).astype(int), np.asarray(image).astype(int)
    outside = np.ones((48, 64), dtype=bool)
    outside[16:32, 16:32] = False
    assert np.array_equal(result[outside], source[outside])  # kept tokens: the input's pixels, not the copy's
    assert np.abs(result[~outside] - source[~outside]).mean() > 5  # the masked token was redrawn
    raw = inpaint(pipe, "x", image, mask, generator=gen(), num_inference_steps=4, keep_unmasked=False)
    assert not np.array_equal(np.asarray(raw.images[0])[outside], source[outside].astype(np.uint8))


def test_inpaint_soft_edge_and_grow(pipe):
    image = picture()
    mask = np.zeros((48, 64), dtype=bool)
    mask[18:26, 18:26] = True  # inside token (1, 1), away from its edges
    out = inpaint(pipe, "x", image, mask, generator=gen(), num_inference_steps=2, feather=6)
    result, source = np.asarray(out.images[0]).astype(int), np.asarray(image).astype(int)
    ring = (slice(16, 18), slice(16, 32))  # in the redrawn token, outside the mask: a blend
    assert not np.array_equal(result[ring], source[ring])
    assert np.array_equal(result[:16], source[:16])  # outside the redrawn token: untouched
    grown = inpaint(pipe, "x", image, mask, grow=1, generator=gen(), num_inference_steps=2)
    assert grown.masked[0].sum() == 9 and out.masked[0].sum() == 1


def test_inpaint_odd_size_comes_back_at_the_input_size(pipe):
    image = picture(70, 50)
    mask = np.zeros((50, 70), dtype=bool)
    mask[20:30, 30:40] = True
    out = inpaint(pipe, "x", image, mask, generator=gen(), num_inference_steps=2)
    assert out.images[0].size == (70, 50)
    result, source = np.asarray(out.images[0]), np.asarray(image)
    assert np.array_equal(result[:5], source[:5]) and np.array_equal(result[:, :10], source[:, :10])


def test_mask_checks(tmp_path):
    with pytest.raises(EditError, match="the mask is 32x32 but the image is 64x48"):
        read_mask(Image.new("L", (32, 32), 255), (64, 48))
    with pytest.raises(EditError, match="empty"):
        read_mask(Image.new("L", (64, 48), 0), (64, 48))
    with pytest.raises(EditError, match="covers the whole image"):
        read_mask(Image.new("1", (64, 48), 1), (64, 48))
    strokes = Image.new("RGBA", (64, 48), (0, 0, 0, 0))  # a brush layer: transparent but for a white stroke
    strokes.paste((255, 255, 255, 255), (5, 5, 15, 15))
    mask = to_mask(strokes)
    assert mask.sum() == 100 and mask[5:15, 5:15].all()
    assert token_mask(mask, 16).sum() == 1 and token_mask(mask, 16, grow=1).sum() == 4


# ---------------------------------------------------------------------------------------------- outpaint


@pytest.mark.exact
@pytest.mark.parametrize("knobs", list(FEWER_PASSES))
def test_outpaint_size_and_kept_area(pipe, knobs):
    image = picture(64, 48)
    out = outpaint(pipe, "x", image, left=10, right=20, generator=gen(), num_inference_steps=2, **FEWER_PASSES[knobs])
    result = out.images[0]
    assert result.size == (112, 48)  # left rounded up to 16; 16 + 64 + 20 -> 112
    assert np.array_equal(np.asarray(result)[:, 16:80], np.asarray(image))
    assert out.masked[0, :, 0].all() and not out.masked[0, :, 1:5].any() and out.masked[0, :, 5:].all()
    centred = outpaint(pipe, "x", image, expand=(96, 80), generator=gen(), num_inference_steps=2)
    assert centred.images[0].size == (96, 80)
    with pytest.warns(LargeSizeWarning, match="at most 256 px a side"):  # the library warns (meissonic.sizes)
        wide = outpaint(pipe, "x", image, right=300, generator=gen(), num_inference_steps=1)
    assert wide.images[0].size == (368, 48)  # 64 + 300 rounded up to the patch (16)
    pipe.size_policy = SizePolicy(allow_large=False)  # as the command line sets it without --allow-large
    try:
        with pytest.raises(EditError, match="at most 256 px a side"):
            outpaint(pipe, "x", image, right=300)
    finally:
        pipe.size_policy = SizePolicy()
    with pytest.raises(EditError, match="nothing to extend"):
        outpaint(pipe, "x", image)
    with pytest.raises(EditError, match="smaller than the image"):
        outpaint(pipe, "x", image, expand=(32, 32))


# ---------------------------------------------------------------------------------------------- reading images


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "I;16", "L", "1", "RGB"])
def test_any_pillow_mode_reads_as_rgb(tmp_path, mode):
    source = picture(32, 32).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        source = Image.fromarray((np.asarray(source).astype(np.uint16) * 257), mode="I;16")
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    source.save(path)
    image = to_rgb(open_image(path))
    assert image.mode == "RGB" and image.size == (32, 32)
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert np.asarray(image).min() < 200


def test_unreadable_images(tmp_path):
    with pytest.raises(EditError, match="no such file"):
        open_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(EditError, match="cannot read image"):
        open_image(junk)
    truncated = tmp_path / "truncated.png"
    picture().save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    with pytest.raises(EditError, match="cannot read image"):
        open_image(truncated)


# ---------------------------------------------------------------------------------------------- CLI


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_edits_write_pngs_with_their_parameters(capsys, tiny_folder, tmp_path):
    source = tmp_path / "photo.png"
    picture().save(source)
    common = ["--model", tiny_folder, "--out", tmp_path / "o", "--steps", 2, "--seed", 5]
    code, out, err = run(capsys, "img2img", "a cat", "--image", source, "--strength", 0.5, *common)
    assert code == 0, err
    params = json.loads(Image.open(tmp_path / "o" / "a-cat_5.png").text["parameters"])
    assert params["task"] == "img2img" and params["source_image"] == str(source) and params["strength"] == 0.5
    code, out, err = run(capsys, "inpaint", "a dog", "--image", source, "--box", "16,16,32,32", "--grow", 1, *common)
    assert code == 0, err
    image = Image.open(tmp_path / "o" / "a-dog_5.png")
    params = json.loads(image.text["parameters"])
    assert params["task"] == "inpaint" and params["box"] == "16,16,32,32" and params["grow"] == 1
    assert image.size == (64, 48)
    code, out, err = run(capsys, "outpaint", "a sky", "--image", source, "--expand", "96x80", *common)
    assert code == 0, err
    image = Image.open(tmp_path / "o" / "a-sky_5.png")
    assert image.size == (96, 80) and json.loads(image.text["parameters"])["expand"] == "96x80"
    mask = tmp_path / "mask.png"
    drawn = Image.new("L", (64, 48), 0)
    drawn.paste(255, (0, 0, 20, 20))
    drawn.save(mask)
    code, out, err = run(capsys, "inpaint", "a hat", "--image", source, "--mask", mask, "--no-composite", *common)
    assert code == 0, err
    assert json.loads(Image.open(tmp_path / "o" / "a-hat_5.png").text["parameters"])["composite"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["img2img", "x", "--image", "{missing}"], "no such file"),
        (["img2img", "x", "--image", "{junk}"], "cannot read image"),
        (["img2img", "x", "--image", "{photo}", "--strength", "1.5"], "--strength 1.5: must be in [0, 1]"),
        (["inpaint", "x", "--image", "{photo}", "--mask", "{small}"], "the mask is 32x32 but the image is 64x48"),
        (["inpaint", "x", "--image", "{photo}", "--mask", "{black}"], "the mask is empty"),
        (["inpaint", "x", "--image", "{photo}", "--mask", "{white}"], "covers the whole image"),
        (["inpaint", "x", "--image", "{photo}", "--box", "0,0,100,10"], "box 0,0,100,10 must satisfy"),
        (["inpaint", "x", "--image", "{photo}", "--box", "1,2"], "--box '1,2': give x0,y0,x1,y1"),
        (["inpaint", "x", "--image", "{photo}", "--box", "1,1,5,5", "--grow", "-1"], "--grow -1: must be >= 0"),
        (["outpaint", "x", "--image", "{photo}", "--left", "400"], "at most 256 px a side"),
        (["img2img", "x", "--image", "{photo}", "--width", "512"], "pass --allow-large to run it anyway"),
        (["outpaint", "x", "--image", "{photo}", "--top", "-3"], "--top -3: must be >= 0"),
        (["outpaint", "x", "--image", "{photo}", "--expand", "big"], "--expand 'big': give WIDTHxHEIGHT"),
        (["outpaint", "x", "--image", "{photo}"], "nothing to extend"),
    ],
)
def test_cli_bad_edit_input_exits_2_with_one_line(capsys, tiny_folder, tmp_path, argv, message):
    picture().save(tmp_path / "photo.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    Image.new("L", (64, 48), 0).save(tmp_path / "black.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "white.png")
    argv = [a.format(missing=tmp_path / "missing.png", junk=tmp_path / "junk.png", photo=tmp_path / "photo.png",
                     small=tmp_path / "small.png", black=tmp_path / "black.png", white=tmp_path / "white.png")
            for a in argv]
    code, out, err = run(capsys, *argv, "--model", tiny_folder, "--out", tmp_path / "o", "--steps", 1)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
