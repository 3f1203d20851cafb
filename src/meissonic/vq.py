"""Image tokens: diffusers `VQModel` (f=16, as released with Meissonic), images in [0, 1] <-> token grids (B, h, w).

Large grids can be decoded in overlapping tiles (`decode_tokens(..., tile=32)`), so that the decoder's full-resolution
activations (128+ channels a pixel) are held for one tile at a time. Our own scheme, in the spirit of the tiled VAE
decoding of diffusers' `AutoencoderKL`: equal tiles spread evenly over the grid, blended with sin^2 ramps.

A tile sees only its own tokens, so its decode deviates from the whole one: near its edges (the convolutions miss
context; with the shipped demo tokenizer the deviation fades within 2-3 tokens) and, more faintly, all over (every
GroupNorm takes the tile's statistics, not the image's; a mid-block attention, where a config has one, would see
only the tile; every preset, "meissonic" included, has mid_block_add_attention False). The blend hides the edges;
the statistics make tiled output differ a little from whole output everywhere, most where a tile's content is unlike
the rest of the image.
Default overlap tile // 4 (4 tokens at tile 16, 8 at 32): a ramp longer than the edge deviation reaches, so a tile's
edge tokens weigh next to nothing, for ~1.6x the whole decode's work (64 tokens, tile 32: 3x3 tiles of 27 tokens).
"""

from __future__ import annotations

import math

import torch
from diffusers import VQModel


def downscale_factor(vqvae: VQModel) -> int:
    """Pixels per token along each side (16 for the released tokenizer)."""
    return 2 ** (len(vqvae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_image(vqvae: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> token ids (B, H/f, W/f)."""
    f = downscale_factor(vqvae)
    batch, _, height, width = images.shape
    latents = vqvae.encode(images.to(vqvae.device, vqvae.dtype)).latents
    ids = vqvae.quantize(latents)[2][2]  # flat (B*h*w,)
    return ids.reshape(batch, height // f, width // f)


def _decode_dtype(vqvae: VQModel) -> torch.dtype:
    # The VQ decoder produces NaNs in fp16 (diffusers' `force_upcast`): decode fp16 models in fp32.
    if vqvae.dtype == torch.float16 and vqvae.config.get("force_upcast", True):
        return torch.float32
    return vqvae.dtype


def _check_tiling(tile: int | None, overlap: int | None) -> int:
    """The overlap to use (0 when not tiling); ValueError for values that cannot tile."""
    if tile is None:
        if overlap is not None:
            raise ValueError(f"overlap={overlap!r} needs a tile size; pass tile=... (an int >= 1) or leave overlap out")
        return 0
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile={tile!r} must be an int >= 1 (tokens per tile side), or None to decode whole")
    if overlap is None:
        return tile // 4
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or 2 * overlap >= tile:
        raise ValueError(
            f"overlap={overlap!r} must be an int with 0 <= overlap <= {(tile - 1) // 2} for tile={tile} "
            "(tile >= 2 * overlap + 1)"
        )
    return overlap


def tile_layout(size: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """Tiles along one side of `size` tokens: (tile length, first token of each tile).

    The fewest tiles of at most `tile` tokens whose neighbours share at least `overlap` tokens; all of one length, as
    short as covering allows (less work and memory than full `tile`s), evenly spread from 0 to `size`.
    """
    if size <= tile:
        return size, [0]
    count = math.ceil((size - overlap) / (tile - overlap))  # >= 2
    length = math.ceil((size + (count - 1) * overlap) / count)  # <= tile, by the choice of count
    gaps = count - 1
    return length, [(i * (size - length) + gaps // 2) // gaps for i in range(count)]


def _ramp(pixels: int, device: torch.device) -> torch.Tensor:
    """Weights rising from ~0 to ~1 over `pixels` samples: sin^2, so a ramp and its mirror sum to 1 (cos^2 + sin^2)."""
    t = (torch.arange(pixels, device=device, dtype=torch.float32) + 0.5) / pixels
    return torch.sin(0.5 * math.pi * t) ** 2


def _tile_weights(starts: list[int], length: int, f: int, device: torch.device) -> list[torch.Tensor]:
    """Per tile of `length` tokens, its blending weights (length*f,) along one side.

    Ramps only over the span shared with each neighbour, where the two neighbours' ramps are mirror images summing to
    1; the image's own edges are not ramped.
    """
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(length * f, device=device)
        shared_before = (starts[i - 1] + length - start) * f if i > 0 else 0  # [start, previous end)
        shared_after = (start + length - starts[i + 1]) * f if i + 1 < len(starts) else 0  # [next start, end)
        if shared_before:
            w[:shared_before] *= _ramp(shared_before, device)
        if shared_after:
            w[-shared_after:] *= _ramp(shared_after, device).flip(0)
        weights.append(w)
    return weights


def _decode(vqvae: VQModel, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (B, h, w) on the model's device -> decoder output (B, 3, h*f, w*f), unclamped, in the model's dtype."""
    batch, height, width = tokens.shape
    shape = (batch, height, width, vqvae.config.latent_channels)
    return vqvae.decode(tokens, force_not_quantize=True, shape=shape).sample


def _decode_tiled(vqvae: VQModel, tokens: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Token ids (B, h, w) -> float32 images (B, 3, h*f, w*f), unclamped, decoding one tile of one image at a time.

    Each tile sees only its own tokens, so it differs a little from the whole decode (the convolutions miss context
    at its edges and GroupNorm takes the tile's statistics); the weights fade a tile out across the span it shares
    with a neighbour, so the blend has no hard edge. Weights are normalised per pixel.
    """
    f = downscale_factor(vqvae)
    batch, height, width = tokens.shape
    tile_h, rows = tile_layout(height, tile, overlap)
    tile_w, cols = tile_layout(width, tile, overlap)
    row_weights = _tile_weights(rows, tile_h, f, tokens.device)
    col_weights = _tile_weights(cols, tile_w, f, tokens.device)
    images = torch.zeros(batch, 3, height * f, width * f, device=tokens.device)  # (B, 3, H, W)
    total = torch.zeros(height * f, width * f, device=tokens.device)  # (H, W)
    for top, w_row in zip(rows, row_weights):
        for left, w_col in zip(cols, col_weights):
            weight = w_row[:, None] * w_col[None, :]  # (tile_h*f, tile_w*f)
            window = (slice(top * f, (top + tile_h) * f), slice(left * f, (left + tile_w) * f))
            total[window] += weight
            for b in range(batch):  # one image at a time: peak memory does not grow with the batch
                ids = tokens[b : b + 1, top : top + tile_h, left : left + tile_w]  # (1, tile_h, tile_w)
                piece = _decode(vqvae, ids)  # (1, 3, tile_h*f, tile_w*f)
                images[b, :, window[0], window[1]] += piece[0].float() * weight
    return images / total


@torch.no_grad()
def decode_tokens(
    vqvae: VQModel, tokens: torch.Tensor, tile: int | None = None, overlap: int | None = None
) -> torch.Tensor:
    """Token ids (B, h, w) -> images (B, 3, h*f, w*f) in [0, 1], float32.

    tile: decode in overlapping tiles of at most `tile` x `tile` tokens (e.g. 32, i.e. 512 px with f=16), one tile of
        one image at a time, so peak memory follows the tile, not the image. A grid that fits in one tile is decoded
        whole (the same output as tile=None). Tiles see only their own tokens, so the result differs slightly from a
        whole decode; overlapping tiles are blended with smooth per-pixel weights so that no seam shows.
    overlap: tokens that neighbouring tiles share at least (default tile // 4; with 0, tiles that fit exactly meet
        edge to edge, with visible seams). Needs `tile`, and tile >= 2 * overlap + 1.
    An fp16 model is decoded in fp32 (and left in fp16 afterwards).
    """
    overlap = _check_tiling(tile, overlap)
    height, width = tokens.shape[1:]
    dtype = _decode_dtype(vqvae)
    restore = vqvae.dtype
    if dtype != restore:
        vqvae.to(dtype)
    try:
        tokens = tokens.to(vqvae.device)
        if tile is None or (height <= tile and width <= tile):
            images = _decode(vqvae, tokens).float()
        else:
            images = _decode_tiled(vqvae, tokens, tile, overlap)
    finally:
        if dtype != restore:
            vqvae.to(restore)
    return images.clamp(0, 1)
