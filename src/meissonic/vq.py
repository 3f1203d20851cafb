"""Image tokens: diffusers `VQModel` (f=16, as released with Meissonic), images in [0, 1] <-> token grids (B, h, w)."""

from __future__ import annotations

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


@torch.no_grad()
def decode_tokens(vqvae: VQModel, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (B, h, w) -> images (B, 3, h*f, w*f) in [0, 1], float32."""
    batch, height, width = tokens.shape
    dtype = _decode_dtype(vqvae)
    restore = vqvae.dtype
    if dtype != restore:
        vqvae.to(dtype)
    try:
        shape = (batch, height, width, vqvae.config.latent_channels)
        images = vqvae.decode(tokens.to(vqvae.device), force_not_quantize=True, shape=shape).sample
    finally:
        if dtype != restore:
            vqvae.to(restore)
    return images.float().clamp(0, 1)
