"""What both training loops (`train.py` for the transformer, `vq_train.py` for the tokenizer) use: the settings every
run shares, the one-line error type, the optimizer and loading a tokenizer to train or to train with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RunConfig:
    """Settings every training run shares: data, output, seed, crops, checkpoints, logging."""

    data: str
    out: Path
    model: str | None = None
    preset: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    seed: int = 0
    center_crop: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    resume: str | None = None
    log_every: int = 10
    progress: bool = True


class TrainingError(ValueError):
    """A training option or state that cannot work, named in one line."""


def adamw(params, lr: float, weight_decay: float, eight_bit: bool = False, betas=(0.9, 0.999)):
    """AdamW, or bitsandbytes' 8-bit AdamW when asked (and installed)."""
    if eight_bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def load_vqvae(path: str, option: str):
    """A VQModel from its folder, or from a pipeline folder's `vqvae/`, its weights in memory torch owns; one-line
    errors naming `option`."""
    from diffusers import VQModel

    from ..loading import own_memory

    folder = Path(path)
    if not folder.is_dir():
        raise TrainingError(f"{option} {path!r}: no such folder")
    if (folder / "vqvae").is_dir():
        folder = folder / "vqvae"
    try:
        return own_memory(VQModel.from_pretrained(folder, use_safetensors=True))
    except Exception as err:  # a library error for a malformed folder: its first line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainingError(f"{option} {path!r}: cannot load a VQModel ({reason})") from None
