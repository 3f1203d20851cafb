"""Tiled VQ decoding (`decode_tokens(..., tile=...)`): the picture of a whole decode, in tile-sized pieces, no seams.

Two tokenizers: the tiny preset with random weights for the mechanics, and the shipped demo model's trained tokenizer
for how close the blend comes. A random decoder is no judge of closeness: its tile decodes differ from the whole decode
by 0.1-0.5x the image's spread even far from any tile edge (GroupNorm statistics and long-range chaos), so a correct
blend, unweighted averaging and tiles pasted a token off all score alike. The trained decoder is local.
"""

import pytest
import torch
from diffusers import VQModel

from meissonic.loading import demo_model_folder
from meissonic.presets import get_preset, seeded_init
from meissonic.vq import decode_tokens, downscale_factor, tile_layout


@pytest.fixture(scope="module")
def random_vq():
    with seeded_init(0):
        return VQModel(**get_preset("tiny").vqvae).eval()


@pytest.fixture(scope="module")
def trained_vq():
    return VQModel.from_pretrained(demo_model_folder() / "vqvae", torch_dtype=torch.float32).eval()


def random_tokens(vqvae: VQModel, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vqvae.config.num_vq_embeddings, shape, generator=torch.Generator().manual_seed(seed))


def seam_spike(error: torch.Tensor) -> float:
    """How far the sharpest column or row step of an error image (B, 3, H, W) stands above the typical step.

    A seam is a jump in the error (one tile's deviation meets another's), so it shows as one column (or row) whose
    step dwarfs the median; a smooth blend leaves no such column.
    """
    across_columns = error.diff(dim=3).abs().mean((0, 1, 2))  # (W-1,)
    across_rows = error.diff(dim=2).abs().mean((0, 1, 3))  # (H-1,)
    return max((steps.max() / steps.median()).item() for steps in (across_columns, across_rows))


@pytest.mark.exact
def test_a_grid_that_fits_one_tile_is_the_plain_decode(random_vq):
    tokens = random_tokens(random_vq, (2, 12, 16))
    whole = decode_tokens(random_vq, tokens)
    assert torch.equal(decode_tokens(random_vq, tokens, tile=16), whole)
    assert torch.equal(decode_tokens(random_vq, tokens, tile=16, overlap=7), whole)
    assert not torch.equal(decode_tokens(random_vq, tokens, tile=15), whole)  # one token too many: tiled


@pytest.mark.parametrize("tile,overlap", [(16, 4), (32, 8), (9, 4), (3, 1), (5, 0)])
def test_tiles_cover_the_grid_evenly_with_the_overlap(tile, overlap):
    for size in range(1, 130):
        length, starts = tile_layout(size, tile, overlap)
        ends = [start + length for start in starts]
        assert starts[0] == 0 and ends[-1] == size and length <= min(tile, size)
        shared = [end - start for end, start in zip(ends, starts[1:])]
        assert all(s >= overlap for s in shared), (size, length, starts)
        assert all(a < b for a, b in zip(starts, starts[1:])), (size, starts)  # no tile decoded twice
        # the fewest tiles: one tile fewer could not cover the grid with `overlap` shared between neighbours
        assert (len(starts) - 1) * (tile - overlap) + overlap < size or len(starts) == 1


def test_tiled_decode_is_close_to_the_whole_decode(trained_vq):
    tokens = random_tokens(trained_vq, (2, 24, 40))
    f = downscale_factor(trained_vq)
    whole = decode_tokens(trained_vq, tokens)
    tiled = decode_tokens(trained_vq, tokens, tile=16)
    assert tiled.shape == (2, 3, 24 * f, 40 * f) and tiled.dtype == torch.float32
    assert tiled.min() >= 0 and tiled.max() <= 1
    error = (tiled - whole).abs()
    # measured 0.015 mean, 0.135 at the 99th percentile; tiles stitched edge to edge (overlap=0) score 0.030 / 0.32,
    # reversed ramps 0.029 / 0.34, tiles pasted one token off 0.18 / 0.73
    assert error.mean() < 0.025 and error.flatten().quantile(0.99) < 0.25
    # each image of the batch is decoded from its own tokens
    assert (tiled[1] - whole[0]).abs().mean() > 5 * error[1].mean()


def test_tiles_are_blended_without_seams(trained_vq):
    tokens = random_tokens(trained_vq, (2, 24, 40))
    whole = decode_tokens(trained_vq, tokens)
    # measured 1.7; a hard switch halfway through the shared span 4.9, unweighted averaging 14.8
    assert seam_spike(decode_tokens(trained_vq, tokens, tile=16) - whole) < 3.5
    # the same measure does see the seams of tiles stitched edge to edge (28)
    assert seam_spike(decode_tokens(trained_vq, tokens, tile=16, overlap=0) - whole) > 10


def test_error_at_tile_edges_is_no_larger_than_elsewhere(trained_vq):
    tokens = random_tokens(trained_vq, (2, 24, 40), seed=1)
    f = downscale_factor(trained_vq)
    error = (decode_tokens(trained_vq, tokens, tile=16) - decode_tokens(trained_vq, tokens)).abs().mean((0, 1, 2))
    length, starts = tile_layout(40, 16, 4)
    edges = sorted({start * f for start in starts[1:]} | {(start + length) * f for start in starts[:-1]})
    near = torch.zeros_like(error, dtype=torch.bool)
    for edge in edges:
        near[edge - f // 2 : edge + f // 2] = True  # the pixel columns around where a tile's decode begins or ends
    assert error[near].mean() < 1.5 * error[~near].mean()  # measured 0.87x; unweighted averaging 1.96x


def test_odd_grids_decode_to_their_own_size(random_vq, trained_vq):
    tokens = random_tokens(random_vq, (1, 23, 37))
    f = downscale_factor(random_vq)
    tiled = decode_tokens(random_vq, tokens, tile=16)
    assert tiled.shape == (1, 3, 23 * f, 37 * f) and torch.isfinite(tiled).all()
    small = decode_tokens(random_vq, random_tokens(random_vq, (1, 5, 7)), tile=3, overlap=1)
    assert small.shape == (1, 3, 5 * f, 7 * f)
    tokens = random_tokens(trained_vq, (1, 23, 37))
    error = (decode_tokens(trained_vq, tokens, tile=16) - decode_tokens(trained_vq, tokens)).abs()
    assert error.mean() < 0.025  # measured 0.016


def test_tiles_are_decoded_one_tile_of_one_image_at_a_time(random_vq):
    seen = []
    hook = random_vq.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        decode_tokens(random_vq, random_tokens(random_vq, (2, 20, 28)), tile=16)
    finally:
        hook.remove()
    assert len(seen) == 2 * 2 * 2  # 2 images x (2 x 2 tiles)
    assert all(shape[0] == 1 and shape[2] <= 16 and shape[3] <= 16 for shape in seen), seen


def test_fp16_model_decodes_tiles_in_float32(trained_vq):
    half = VQModel.from_pretrained(demo_model_folder() / "vqvae", torch_dtype=torch.float16).eval()
    tokens = random_tokens(half, (1, 20, 20))
    seen = []
    hook = half.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        out = decode_tokens(half, tokens, tile=12)
    finally:
        hook.remove()
    assert len(seen) == 4 and set(seen) == {torch.float32}  # every tile decoded in fp32
    assert half.dtype == torch.float16  # restored afterwards
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - decode_tokens(trained_vq, tokens, tile=12)).abs().max() < 0.02


@pytest.mark.parametrize(
    "tile,overlap,message",
    [
        (0, None, r"tile=0 must be an int >= 1"),
        (-8, 2, r"tile=-8 must be an int >= 1"),
        (16.0, None, r"tile=16.0 must be an int"),
        (16, 8, r"overlap=8 must be an int with 0 <= overlap <= 7 for tile=16"),
        (16, -1, r"overlap=-1 must be an int with 0 <= overlap <= 7"),
        (2, 1, r"overlap=1 must be an int with 0 <= overlap <= 0 for tile=2"),
        (None, 4, r"overlap=4 needs a tile size"),
    ],
)
def test_bad_tile_or_overlap_is_refused(random_vq, tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        decode_tokens(random_vq, random_tokens(random_vq, (1, 4, 4)), tile=tile, overlap=overlap)
