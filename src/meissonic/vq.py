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
import weakref

import torch
import torch.nn.functional as F
from diffusers import VQModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D


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


def fold_nearest_conv(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight (C_out, C_in, 3, 3) -> the (C_in, C_out, 4, 4) weight of the stride-2, padding-1
    transposed convolution that equals nearest 2x upsampling followed by that convolution (padding 1).

    An output pixel at even row 2i sees, through the upsampling, input rows i-1 (the kernel's row 0) and i (rows 1 and
    2 summed); at odd row 2i+1, rows i (rows 0 and 1 summed) and i+1 (row 2); the same along columns. A transposed
    convolution with stride 2 and padding 1 reaches input row i from output row y with its kernel row y - 2i + 1, so
    its 4 kernel rows are (w2, w1 + w2, w0 + w1, w0). Each output pixel then costs 4 products per channel pair instead
    of 9, and the upsampled tensor is never made. The sums are formed in float32 at least: the result equals the
    original to float rounding."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight

    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return fold(fold(w, 2), 3).transpose(0, 1).to(weight.dtype, memory_format=torch.channels_last)


class NearestConvUpsample(torch.nn.Module):
    """diffusers' `Upsample2D` as the VQ decoder uses it (nearest 2x, then a 3x3 convolution, padding 1) computed as
    one transposed convolution (`fold_nearest_conv`): 2-4x faster on a CPU at the demo's sizes (its decode 10%
    faster; the released tokenizer's at 512 px 9%, its peak 35 MB lower), the same output to float rounding. It
    keeps the original convolution as `conv`, so state dicts and saved folders do not change.

    Folding costs ~0.1-0.3 ms for the demo's small kernels, so a folded kernel of at most `CACHE_BYTES` is kept
    and made again when its weight changes (replaced, written in place) or the module moves (`.to()`: nothing is
    left behind on the old device); larger ones (the released tokenizer's 512- and 768-channel ones, 17-38 MB in
    float32) are folded at each call, a few ms against a decode of seconds, and hold no memory between decodes.
    Where accelerate or diffusers hooks the convolution (offloading) or an output size is asked for, it runs the
    original two steps."""

    CACHE_BYTES = 8 << 20

    def __init__(self, upsample: Upsample2D):
        super().__init__()
        self.channels = upsample.channels
        self.conv = upsample.conv
        self._folded: tuple | None = None  # (weakref to the weight, (address, version, dtype, device), fold)

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(): the fold was made for the old weight
        self._folded = None
        return super()._apply(fn, recurse)

    def _kernel(self) -> torch.Tensor:
        weight = self.conv.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return fold_nearest_conv(weight)  # part of the graph: made anew each call
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self._folded
        if cached is not None and cached[0]() is weight and cached[1] == key:
            return cached[2]
        kernel = fold_nearest_conv(weight.detach())
        cache = kernel.numel() * kernel.element_size() <= self.CACHE_BYTES
        self._folded = (weakref.ref(weight), key, kernel) if cache else None
        return kernel

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None or hasattr(self.conv, "_hf_hook") or hasattr(self.conv, "_diffusers_hook"):
            size = dict(scale_factor=2.0) if output_size is None else dict(size=output_size)
            return self.conv(F.interpolate(hidden_states, mode="nearest", **size))
        return F.conv_transpose2d(hidden_states, self._kernel(), self.conv.bias, stride=2, padding=1)


def fold_upsamplers(vqvae: VQModel) -> int:
    """Replace the decoder's nearest-2x + 3x3 `Upsample2D`s by `NearestConvUpsample` in place; returns how many."""
    count = 0
    for module in list(vqvae.decoder.modules()):
        ups = getattr(module, "upsamplers", None)
        if ups is None:
            continue
        for i, up in enumerate(ups):
            conv = getattr(up, "conv", None)
            if (type(up) is Upsample2D and up.name == "conv" and up.use_conv and not up.use_conv_transpose
                    and up.interpolate and up.norm is None
                    and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)
                    and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
                    and conv.groups == 1 and conv.padding_mode == "zeros"):
                ups[i] = NearestConvUpsample(up)
                count += 1
    return count


class InferenceResnet(ResnetBlock2D):
    """diffusers' `ResnetBlock2D` as the VQ uses it (no time embedding, no up- or downsampling, SiLU), with its
    activations and residual sum written in place when no gradient is wanted: the same values bit for bit, one
    full-size tensor fewer to allocate and fill at each step (the released tokenizer's 512 px decode 5% faster and
    its peak 40 MB lower, on a CPU; the demo's 4% faster). Training, a gradient or any other call runs diffusers'
    own forward."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if temb is not None or args or kwargs or self.training or torch.is_grad_enabled():
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = self.conv1(F.silu(self.norm1(input_tensor), inplace=True))  # the norms' outputs are new tensors
        hidden = self.conv2(F.silu(self.norm2(hidden), inplace=True))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        hidden = hidden.add_(shortcut)  # (input + hidden), summed the other way round: the same floats
        return hidden if self.output_scale_factor == 1 else hidden.div_(self.output_scale_factor)


def lean_resnets(vqvae: VQModel) -> int:
    """Make the VQ's plain `ResnetBlock2D`s `InferenceResnet`s in place (same weights, same state dict); returns
    how many."""
    count = 0
    for module in vqvae.modules():
        if (type(module) is ResnetBlock2D and isinstance(module.nonlinearity, torch.nn.SiLU)
                and module.upsample is None and module.downsample is None and module.time_emb_proj is None
                and module.time_embedding_norm != "scale_shift"):  # "default", "group" (decoder): norm2 alone
            module.__class__ = InferenceResnet
            count += 1
    return count


def speed_up_decoding(vqvae: VQModel) -> None:
    """What `MeissonicPipeline` does to its VQ: channels-last convolutions (oneDNN's layout: the demo decodes 1.8x
    faster on a CPU), folded upsamplers and in-place resnets; the same images to float32 rounding."""
    vqvae.to(memory_format=torch.channels_last)
    fold_upsamplers(vqvae)
    lean_resnets(vqvae)


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
