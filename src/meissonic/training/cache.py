"""Pre-encoding (as open-muse does): VQ tokens and text embeddings of a dataset written to disk once, so training
does not run the frozen encoders every epoch. Each sample is cropped once (center, or a crop seeded by its index).
Captions are kept too, so a run that trains the text encoder can still use the cached tokens.

A cache remembers what made it (data, resolution, crop, a fingerprint of the tokenizer and text encoder); a cache
made otherwise is refused rather than silently reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..text import encode_prompts
from ..vq import encode_image
from .data import prepare_image

SHARD = 256


def fingerprint(*models: torch.nn.Module) -> str:
    """A cheap identity of models' weights: every parameter's name, shape and float64 sum."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                digest.update(f"{name}{tuple(param.shape)}{param.double().sum().item():.9e}".encode())
    return digest.hexdigest()[:16]


def cache_identity(data: str, resolution: int, center_crop: bool, seed: int, size: int, vqvae: str,
                   text_encoder: str) -> dict:
    return {"data": str(data), "resolution": resolution, "center_crop": center_crop,
            "seed": None if center_crop else seed, "samples": size, "vqvae": vqvae, "text_encoder": text_encoder}


@torch.no_grad()
def build_cache(folder: Path, identity: dict, dataset, vqvae, tokenizer, text_encoder, batch: int = 16,
                progress: bool = False, precision=contextlib.nullcontext) -> None:
    """Encode every sample into shards under `folder` (written to a temporary folder, then renamed)."""
    from tqdm.auto import tqdm

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hidden, pooled = encode_prompts(tokenizer, text_encoder, [""])
    save_file({"hidden": hidden.cpu().half().contiguous(), "pooled": pooled.cpu().half().contiguous()},
              tmp / "empty_prompt.safetensors")
    n = len(dataset)
    captions = []
    bar = tqdm(total=n, desc="pre-encoding", unit="image", disable=not progress)
    for shard_start in range(0, n, SHARD):
        rows = {"tokens": [], "hidden": [], "pooled": [], "micro": []}
        for start in range(shard_start, min(shard_start + SHARD, n), batch):
            indices = range(start, min(start + batch, n, shard_start + SHARD))
            samples = [dataset[i] for i in indices]
            captions += [s.caption for s in samples]
            crops = [prepare_image(s.image, identity["resolution"], _crop_generator(identity, i),
                                   center=identity["center_crop"]) for s, i in zip(samples, indices)]
            pixels = torch.stack([c[0] for c in crops])
            with precision():  # e.g. accelerate's autocast
                rows["tokens"].append(encode_image(vqvae, pixels.to(vqvae.device)).int().cpu())
                h, p = encode_prompts(tokenizer, text_encoder, [s.caption for s in samples])
            rows["hidden"].append(h.cpu().half())
            rows["pooled"].append(p.cpu().half())
            rows["micro"].append(torch.stack([torch.cat([c[1], torch.tensor([s.score])])
                                              for c, s in zip(crops, samples)]))
            bar.update(len(samples))
        save_file({k: torch.cat(v).contiguous() for k, v in rows.items()},
                  tmp / f"shard-{shard_start // SHARD:05d}.safetensors")
    bar.close()
    (tmp / "captions.json").write_text(json.dumps(captions, ensure_ascii=False))
    (tmp / "cache.json").write_text(json.dumps(identity, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _crop_generator(identity: dict, index: int) -> torch.Generator | None:
    if identity["center_crop"]:
        return None
    return torch.Generator().manual_seed(identity["seed"] * 1_000_003 + index)


class EncodedCache:
    """Random access to a built cache: `cache[i]` -> (tokens (h, w), hidden (77, C), pooled (P,), micro (5,)).

    `text_live`: the text encoder is being trained, so its cached outputs are not used and may differ."""

    def __init__(self, folder: Path, identity: dict, text_live: bool = False):
        meta = folder / "cache.json"
        if not meta.is_file():
            raise ValueError(f"{str(folder)!r} is not a finished pre-encoding cache (no cache.json)")
        found = json.loads(meta.read_text())
        changed = sorted(k for k in identity if found.get(k) != identity[k] and not (text_live and k == "text_encoder"))
        if changed:
            raise ValueError(f"cache {str(folder)!r} was made for other settings ({', '.join(changed)} differ); "
                             "use a new --cache folder")
        self.shards = sorted(folder.glob("shard-*.safetensors"))
        self.captions = json.loads((folder / "captions.json").read_text())
        self.size = identity["samples"]
        self._handles: dict[int, object] = {}
        with safe_open(folder / "empty_prompt.safetensors", "pt") as f:
            self.empty = (f.get_tensor("hidden"), f.get_tensor("pooled"))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        shard, row = divmod(index, SHARD)
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.shards[shard], "pt")
        handle = self._handles[shard]
        return tuple(handle.get_slice(k)[row] for k in ("tokens", "hidden", "pooled", "micro"))
