"""What the `meissonic` commands share: the user-error type, device and precision choice, model loading."""

from __future__ import annotations

import os
from pathlib import Path

DTYPES = ("auto", "fp32", "bf16", "fp16")


class UsageError(ValueError):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def version() -> str:
    from . import __version__

    return __version__

def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 on CPU is hundreds of times slower than bf16: use --dtype bf16 or fp32")
    return torch_dtype(name)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def save_new_folder(pipe, out: Path) -> None:
    """Write a pipeline folder that appears whole: into a temporary sibling, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pipe.save_pretrained(tmp)
    os.replace(tmp, out)


def load_pipeline(model: str, dtype, allow_pickle: bool = False):
    from .loading import ModelFolderError
    from .pipeline import MeissonicPipeline

    try:
        return MeissonicPipeline.from_pretrained(model, torch_dtype=dtype, allow_pickle=allow_pickle)
    except ModelFolderError:
        raise
    except Exception as err:  # a library's error while reading a malformed folder: one line, no traceback
        raise UsageError(f"cannot load model {model!r}: {type(err).__name__}: {reason(err)}") from None


def reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
