"""Timing the transformer: one forward (with the classifier-free-guidance batch) of a named architecture.

Weights are random (filled in place, no download), so the 1B Meissonic can be timed anywhere. Figures are medians
over repeats after warm-up; compare ratios within one run, not absolute times across machines.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from .presets import get_preset
from .transformer import ConditionCache, MeissonicTransformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_transformer(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> MeissonicTransformer:
    """The preset's transformer with N(0, 0.02) weights, built without the cost of the default initialisers."""
    with torch.device("meta"):
        model = MeissonicTransformer(**get_preset(preset).transformer)
    model = model.to_empty(device=device).eval()
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".norm_" in name or name.endswith("layer_norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: MeissonicTransformer, resolution: int, batch: int, cfg: bool, repeats: int,
                 warmup: int, patch: int = 16) -> dict:
    """Seconds for one full forward (conditioning included) and for one cached sampling step."""
    device, dtype = model.device, model.dtype
    rows = batch * (2 if cfg else 1)
    grid = (resolution // patch, resolution // patch)
    cfgd = model.config
    gen = torch.Generator(device).manual_seed(0)
    inputs = dict(
        hidden_states=torch.randint(0, cfgd.vocab_size, (rows, *grid), device=device, generator=gen),
        encoder_hidden_states=torch.randn(rows, 77, cfgd.joint_attention_dim, device=device, generator=gen).to(dtype),
        pooled_projections=torch.randn(rows, cfgd.pooled_projection_dim, device=device, generator=gen).to(dtype),
        micro_conds=torch.tensor([[resolution, resolution, 0, 0, 6]], device=device).float().expand(rows, -1),
        timestep=torch.tensor([10], device=device),
    )
    full, step = [], []
    with torch.no_grad():
        for i in range(warmup + repeats):
            cache = ConditionCache()
            _sync(device)
            start = time.perf_counter()
            model(**inputs, cache=cache)
            _sync(device)
            mid = time.perf_counter()
            model(**inputs, cache=cache)
            _sync(device)
            end = time.perf_counter()
            if i >= warmup:
                full.append(mid - start)
                step.append(end - mid)
    return {"forward_s": statistics.median(full), "cached_step_s": statistics.median(step)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB; process peak so far


def run_bench(preset: str, resolution: int, batch: int, cfg: bool, dtypes: list[str], repeats: int, warmup: int,
              device: torch.device) -> list[dict]:
    rows = []
    for name in dtypes:
        model = random_transformer(preset, DTYPES[name], device)
        result = time_forward(model, resolution, batch, cfg, repeats, warmup)
        result.update(preset=preset, dtype=name, resolution=resolution, batch=batch, cfg=cfg,
                      device=str(device), threads=torch.get_num_threads(), peak_memory_gb=peak_memory_gb(device))
        rows.append(result)
        del model
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]["forward_s"]
    lines = [f"{'dtype':6} {'forward s':>10} {'cached step s':>14} {'speed-up':>9} {'peak mem GB':>12}"]
    for r in rows:
        lines.append(f"{r['dtype']:6} {r['forward_s']:10.2f} {r['cached_step_s']:14.2f} "
                     f"{base / r['forward_s']:8.2f}x {r['peak_memory_gb']:12.2f}")
    return "\n".join(lines)
