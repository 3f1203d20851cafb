"""`meissonic bench`: time and size a whole generation for each precision and quantization asked.

One row per (precision, quantization), each run in a fresh Python process, so that its peak memory (CUDA max
allocated and reserved, or the process's peak RSS on CPU) is its own. A row times text encoding, every sampling
step, the VQ decode and the total, and records the transformer's weight memory and the top-1 token agreement of its
logits with fp32 on fixed inputs (half the tokens masked, seeded conditioning), the quality cost of a precision or
quantization. The model is a folder, or a named architecture with random weights built in place (no download), so
the 1B Meissonic can be measured anywhere. Compare ratios within one run, not absolute times across machines;
on a noisy machine `repeat` interleaves rounds of the rows and reports medians and per-round ratios.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
from .one_step import ONE_STEP  # noqa: E402 - the `speed` of a row that samples a one-step student
PROMPT = "a photo of a red fox sitting in a snowy forest, golden hour"


@dataclass
class BenchSpec:
    """One row: what to build and how to run it."""

    model: str | None = None  # a pipeline folder, or
    preset: str | None = None  # a named architecture with random weights
    dtype: str = "fp32"
    quantize: str = "none"
    resolution: int | None = None  # default: the model's
    steps: int | None = None  # default: the model's
    batch: int = 1
    guidance: float | None = None  # default: the model's (> 1: the guidance batch doubles the transformer's rows)
    release_text_encoder: bool = False
    vq_tile: int | None = None
    offload: str = "none"
    compile: bool = False
    device: str = "cpu"
    speed: str = "exact"  # the sampler's speed level (`meissonic.speeds`), or ONE_STEP: a student in one pass
    tokens_out: str | None = None  # where the row writes its generated tokens (agreement between speed levels)
    reference: str | None = None  # file of the fp32 top-1 tokens on the fixed inputs (agreement is measured against)
    warmup: bool = False  # one untimed generation (and decode) first: times are then the steady state
    iterations: int = 1  # timed generations in the row's process; each time reported is the median of theirs
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- building


def _fill_random(module: torch.nn.Module, generator: torch.Generator) -> None:
    """N(0, 0.02) weights, norm scales 1, biases 0: a random model whose activations stay in range."""
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 1 and ("norm" in name or "norm" in type(module).__name__.lower()) and "weight" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator))
        for name, buf in module.named_buffers(recurse=False):
            if name == "position_ids":  # CLIP's (1, positions) arange
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            elif buf.is_floating_point():
                buf.zero_()


def materialize(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0,
                quantize: str = "none", blocks: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """Give a meta-device model random weights in `dtype` on `device`, module by module; with `quantize`, each of
    `blocks` is quantized as soon as it exists, so the full-precision model never sits in memory whole."""
    from .quantize import quantize as quantize_module
    from .runtime import release_freed_memory

    generator = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    torch.nn.Module.to(model, dtype)  # still on the meta device: memory comes next, directly in `dtype`
    for block in blocks or []:
        block.to_empty(device=device)
        for module in block.modules():
            _fill_random(module, generator)
            done.add(id(module))
        if quantize != "none":
            quantize_module(block, quantize, device=device)
    for module in model.modules():
        if id(module) in done:
            continue
        module.to_empty(device=device, recurse=False)
        _fill_random(module, generator)
    if quantize != "none":  # the layers outside the blocks
        quantize_module(model, quantize, device=device, filter_fn=lambda m, fqn: id(m) not in done)
    release_freed_memory()
    return model.eval().requires_grad_(False)


def random_pipeline(preset: str, dtype: torch.dtype, device: torch.device, quantize: str = "none", seed: int = 0):
    """The preset's whole pipeline with random weights, built in `dtype` on `device` without a float32 copy."""
    from diffusers import VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .presets import assemble_pipeline, get_preset
    from .transformer import MeissonicTransformer

    spec = get_preset(preset)
    with torch.device("meta"):
        transformer = MeissonicTransformer(**spec.transformer)
        vqvae = VQModel(**spec.vqvae)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder))
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    materialize(transformer, dtype, device, seed, quantize, blocks)
    materialize(vqvae, dtype, device, seed + 1)
    materialize(text_encoder, dtype, device, seed + 2)
    return assemble_pipeline(spec, transformer, vqvae, text_encoder)


def fixed_inputs(config, grid: tuple[int, int], resolution: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 1234) -> dict:
    """A transformer input that is the same in every process: half the tokens masked, seeded conditioning."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.codebook_size, (1, *grid), generator=gen)
    tokens[torch.rand(1, *grid, generator=gen) < 0.5] = config.vocab_size - 1
    return dict(
        hidden_states=tokens.to(device),
        encoder_hidden_states=torch.randn(1, 77, config.joint_attention_dim, generator=gen).to(device, dtype),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=gen).to(device, dtype),
        micro_conds=torch.tensor([[resolution, resolution, 0, 0, 6]], dtype=torch.float32, device=device),
        timestep=torch.tensor([0.5], device=device),
    )


# ---------------------------------------------------------------------------------------------- one row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far, GiB: CUDA max allocated and reserved on GPU; the process's peak RSS always."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["cuda_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["cuda_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def run_row(spec: BenchSpec) -> dict:
    """Build, then time `iterations` generations (text, steps, decode; the median of each time) and measure memory
    and agreement; in this process."""
    from .cli_common import load_pipeline
    from .quantize import token_agreement, weight_bytes
    from .runtime import RunOptions, prepare
    from .vq import decode_tokens

    if spec.iterations < 1 or spec.iterations > 1 and spec.release_text_encoder:
        raise ValueError(f"iterations={spec.iterations}: at least 1, and 1 with release_text_encoder")
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    start = time.perf_counter()
    if spec.preset is not None:  # quantized while built, unless offloading (then `prepare` quantizes on the GPU)
        built = spec.quantize if spec.offload == "none" else "none"
        pipe = random_pipeline(spec.preset, dtype, torch.device("cpu") if spec.offload != "none" else device, built)
        options = RunOptions(quantize=spec.quantize if built == "none" else "none", offload=spec.offload,
                             compile=spec.compile, vq_tile=spec.vq_tile)
    else:
        pipe = load_pipeline(spec.model, dtype)
        options = RunOptions(quantize=spec.quantize, offload=spec.offload, compile=spec.compile, vq_tile=spec.vq_tile)
    prepare(pipe, device, options)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - start
    resolution, grid = _image_size(spec, pipe)
    steps = spec.steps or pipe.defaults["steps"]
    guidance = pipe.defaults["guidance"] if spec.guidance is None else spec.guidance
    row = {"weights_gb": weight_bytes(pipe.transformer) / 2**30, "build_s": build_s}

    one_step = spec.speed == ONE_STEP or pipe.one_step_mode is not None
    agreement = None
    if spec.reference is not None and spec.offload == "none" and not one_step:  # before the generation: a failure
        # costs little (a student's logits are not comparable with its teacher's)
        with torch.no_grad():
            inputs = fixed_inputs(pipe.transformer.config, grid, resolution, device, dtype)
            logits = pipe.transformer(**inputs)
        agreement = token_agreement(logits.float().cpu(), torch.load(spec.reference, weights_only=True))
        del logits

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompts = [PROMPT] * spec.batch
    # a student has no guidance batch: its prompt alone is encoded, as a generation would
    texts = [PROMPT] if one_step or guidance <= 1 else [PROMPT, ""]
    sampling = dict(one_step=True) if one_step else dict(num_inference_steps=steps, guidance_scale=guidance,
                                                          speed=spec.speed)
    if spec.warmup:  # untimed: text encoder, sampler and decoder each run once before the timed generation
        with torch.no_grad():
            pipe.encode_prompt(texts)
        warm = pipe(prompt=prompts, height=resolution, width=resolution, output_type="latent",
                    generator=torch.Generator().manual_seed(1), **sampling).images
        decode_tokens(pipe.vqvae, warm, tile=spec.vq_tile)
    times = {key: [] for key in ("text_s", "sample_s", "decode_s", "total_s", "first_step_s", "step_s")}
    generator_device = device if device.type == "cuda" else "cpu"
    for iteration in range(spec.iterations):  # the same generation each time (same prompt, seed and tokens)
        for text in texts:  # encoded anew each time: a cached prompt would cost nothing
            pipe.prompt_cache.pop(text, None)
        _sync(device)
        t0 = time.perf_counter()
        pipe.encode_prompts_once(texts, release=spec.release_text_encoder)
        _sync(device)
        text_s = time.perf_counter() - t0

        stamps = []

        def on_step(pipe_, step, timestep, tensors):
            _sync(device)
            stamps.append(time.perf_counter())
            return {}

        generator = torch.Generator(generator_device).manual_seed(0)
        _sync(device)
        t1 = time.perf_counter()
        tokens = pipe(prompt=prompts, height=resolution, width=resolution, generator=generator, output_type="latent",
                      callback_on_step_end=on_step, **sampling).images
        sample_s = time.perf_counter() - t1
        work = pipe.last_work
        if spec.tokens_out is not None and iteration == 0:
            torch.save(tokens.cpu(), spec.tokens_out)
        step_times = [b - a for a, b in zip([t1, *stamps[:-1]], stamps)]
        _sync(device)
        t2 = time.perf_counter()
        decode_tokens(pipe.vqvae, tokens, tile=spec.vq_tile)
        _sync(device)
        decode_s = time.perf_counter() - t2
        for key, value in (("text_s", text_s), ("sample_s", sample_s), ("decode_s", decode_s),
                           ("total_s", text_s + sample_s + decode_s), ("first_step_s", step_times[0]),
                           # steady state: the first step also builds the cache
                           ("step_s", statistics.median(step_times[1:] or step_times))):
            times[key].append(value)
    row.update(
        **{key: statistics.median(values) for key, values in times.items()},
        iterations=spec.iterations,
        top1_agreement=agreement,
        resolution=resolution,
        steps=1 if one_step else steps,
        guidance=None if one_step else guidance,
        speed=ONE_STEP if one_step else spec.speed,
        passes=work["passes"],  # full-pass equivalents per image (the batch's images run together)
        cache_mb=work.get("cache_bytes", 0) / 2**20,
        threads=torch.get_num_threads(),
        **peak_memory(device),
    )
    return row


def _image_size(spec: BenchSpec, pipe) -> tuple[int, tuple[int, int]]:
    """The row's image side (the model's default unless asked) and its token grid."""
    resolution = spec.resolution or pipe.defaults["resolution"]
    return resolution, (resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)


def reference_tokens(spec: BenchSpec, out: str) -> None:
    """fp32, unquantized: the top-1 tokens of the fixed inputs, written to `out` (the agreement's reference)."""
    from .cli_common import load_pipeline

    device = torch.device(spec.device)
    if spec.preset is not None:
        pipe = random_pipeline(spec.preset, torch.float32, device)
    else:
        pipe = load_pipeline(spec.model, torch.float32).to(device)
    resolution, grid = _image_size(spec, pipe)
    with torch.no_grad():
        logits = pipe.transformer(**fixed_inputs(pipe.transformer.config, grid, resolution, device, torch.float32))
    torch.save(logits.float().cpu(), out)


# ---------------------------------------------------------------------------------------------- many rows


def _in_subprocess(task: str, spec: BenchSpec, out: str | None = None) -> dict:
    """Run `task` for `spec` in a fresh interpreter (its own peak memory); returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        payload = json.dumps({"task": task, "spec": asdict(spec), "out": out, "result": str(result)})
        proc = subprocess.run([sys.executable, "-m", "meissonic.bench", payload], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"bench row {spec.dtype}/{spec.quantize} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def run_bench(specs: list[BenchSpec], agreement: bool = True, on_row=None, repeat: int = 1) -> list[dict]:
    """Every spec in its own process; with `agreement`, an fp32 reference process first. With `repeat` > 1 the rows
    run in `repeat` interleaved rounds (every other round in reverse order, so no row always follows the same one)
    and each row reports the median of its runs (`combine_runs`). `on_row(run)` sees each run as it finishes.
    Rows of several speed levels also get `tokens_as_exact`: the share of their generated tokens equal to those of
    the exact row of the same precision and quantization (same prompt and seed)."""
    runs: list[list[dict]] = [[] for _ in specs]
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        if agreement:
            reference = str(Path(tmp) / "reference.pt")
            _in_subprocess("reference", specs[0], reference)
        for i, spec in enumerate(specs):
            spec.tokens_out = str(Path(tmp) / f"tokens-{i}.pt")
        for round_ in range(repeat):
            order = list(range(len(specs)))
            for i in order if round_ % 2 == 0 else order[::-1]:
                spec = specs[i]
                spec.reference = reference
                row = {"dtype": spec.dtype, "quantize": spec.quantize, "batch": spec.batch,
                       "release_text_encoder": spec.release_text_encoder, "vq_tile": spec.vq_tile,
                       "offload": spec.offload, "compile": spec.compile, "device": spec.device,
                       "model": spec.model or f"{spec.preset} (random weights)", "round": round_ + 1}
                row.update(_in_subprocess("row", spec))
                runs[i].append(row)
                if on_row is not None:
                    on_row(row)
        agreements = _tokens_as_exact(specs)
    rows = [r[0] for r in runs] if repeat == 1 else [combine_runs(r, runs[0]) for r in runs]
    for row, agree in zip(rows, agreements):
        row["tokens_as_exact"] = agree
    _against_exact(rows)
    return rows


def _against_exact(rows: list[dict]) -> None:
    """Each row's compute and sampling time as shares of the exact row of its precision and quantization (time: per
    round, rows of one round having seen the same machine), when the rows hold several speed levels."""
    exact = {(r["dtype"], r["quantize"]): r for r in rows if r.get("speed") == "exact"}
    for row in rows:
        base = exact.get((row["dtype"], row["quantize"]))
        if base is None or len({r.get("speed") for r in rows}) == 1:
            continue
        row["compute_vs_exact"] = row["passes"] / base["passes"]
        for key, name in (("sample_s", "time_vs_exact"), ("total_s", "total_vs_exact")):
            pairs = zip(base.get("runs", [base]), row.get("runs", [row]))
            row[name] = [mine[key] / theirs[key] for theirs, mine in pairs]


def _tokens_as_exact(specs: list[BenchSpec]) -> list[float | None]:
    """Per row: the share of its tokens equal to the exact row's of the same precision and quantization."""
    exact = {(s.dtype, s.quantize): s.tokens_out for s in specs if s.speed == "exact"}
    out = []
    for spec in specs:
        other = exact.get((spec.dtype, spec.quantize))
        if other is None or len({s.speed for s in specs}) == 1 or spec.speed == ONE_STEP:  # a student: another model
            out.append(None)
            continue
        mine, theirs = torch.load(spec.tokens_out, weights_only=True), torch.load(other, weights_only=True)
        out.append((mine == theirs).float().mean().item())
    return out


TIMES = ("build_s", "text_s", "first_step_s", "step_s", "sample_s", "decode_s", "total_s")


def combine_runs(runs: list[dict], first_row_runs: list[dict]) -> dict:
    """One row from its repeated runs: the median of every time, the largest of every memory peak, and the per-round
    step speed-up against the first row's run of the same round (`step_speedups`), whose median the table shows:
    two rows of one round saw the same machine, so their ratio is steadier than either time."""
    row = dict(runs[0])
    row.pop("round")
    for key in TIMES:
        row[key] = statistics.median(r[key] for r in runs)
    for key in ("peak_rss_gb", "cuda_allocated_gb", "cuda_reserved_gb"):
        if key in row:
            row[key] = max(r[key] for r in runs)
    row["step_speedups"] = [base["step_s"] / r["step_s"] for base, r in zip(first_row_runs, runs)]
    row["runs"] = runs
    return row


def seed_format(row: dict) -> str:
    """The seed's table cell: 'BF16 int8: 2.31 s / 4.2 GB' (total time / peak memory: CUDA allocated, or RSS)."""
    memory = row.get("cuda_allocated_gb", row["peak_rss_gb"])
    quant = "" if row["quantize"] == "none" else f" {row['quantize']}"
    return f"{row['dtype'].upper()}{quant}: {row['total_s']:.2f} s / {memory:.1f} GB"


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1024:.1f} MB"


def _speedup(row: dict, base: dict) -> str:
    """Step speed-up against the first row: one ratio, or over repeated rounds their median and range."""
    if "step_speedups" not in row:
        return f"{base['step_s'] / row['step_s']:.2f}x"
    ratios = row["step_speedups"]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def format_table(rows: list[dict]) -> str:
    """A markdown table; speed-up and weight share are relative to the first row (over repeated rounds, the median
    and range of the per-round step speed-ups; times are medians). Rows of several speed levels: `speed_table`."""
    if len({r.get("speed", "exact") for r in rows}) > 1:
        return speed_table(rows)
    base = rows[0]
    gpu = "cuda_allocated_gb" in base
    memory_cols = "| CUDA alloc GB | CUDA reserved GB " if gpu else "| peak RSS GB "
    lines = [f"| precision | quantize | text s | step s | decode s | total s {memory_cols}| weights | weights vs "
             f"first | step speed-up | top-1 vs fp32 |",
             "|---" * (11 if gpu else 10) + "|"]
    for r in rows:
        memory = (f"| {r['cuda_allocated_gb']:.2f} | {r['cuda_reserved_gb']:.2f} " if gpu
                  else f"| {r['peak_rss_gb']:.2f} ")
        agree = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        quant = r["quantize"] + (" +release TE" if r["release_text_encoder"] else "") + (
            f" +tile {r['vq_tile']}" if r["vq_tile"] else "") + (" +compile" if r["compile"] else "")
        lines.append(f"| {r['dtype']} | {quant} | {r['text_s']:.2f} | {r['step_s']:.3f} | {r['decode_s']:.2f} | "
                     f"{r['total_s']:.2f} {memory}| {_size(r['weights_gb'])} | "
                     f"{100 * r['weights_gb'] / base['weights_gb']:.0f}% | {_speedup(r, base)} | {agree} |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    """One row per speed level: transformer compute per image (full-pass equivalents) and sampling time, each also
    as a share of the exact row of the same precision and quantization (over repeated rounds the median and range of
    the per-round time ratios), the caches' size, peak memory and the share of tokens drawn as exact drew them."""
    memory = "CUDA alloc GB" if "cuda_allocated_gb" in rows[0] else "peak RSS GB"
    lines = [f"| speed | precision | quantize | compute (passes) | compute vs exact | sample s | time vs exact | "
             f"total s | total vs exact | caches MB | {memory} | tokens as exact |", "|---" * 12 + "|"]
    for r in rows:
        compute = "-" if "compute_vs_exact" not in r else f"{100 * r['compute_vs_exact']:.0f}%"
        agree = "-" if r.get("tokens_as_exact") is None else f"{100 * r['tokens_as_exact']:.1f}%"
        mem = r.get("cuda_allocated_gb", r["peak_rss_gb"])
        lines.append(f"| {r['speed']} | {r['dtype']} | {r['quantize']} | {r['passes']:.1f} | {compute} | "
                     f"{r['sample_s']:.2f} | {_share(r.get('time_vs_exact'))} | {r['total_s']:.2f} | "
                     f"{_share(r.get('total_vs_exact'))} | {r['cache_mb']:.0f} | {mem:.2f} | {agree} |")
    return "\n".join(lines)


def _share(ratios: list[float] | None) -> str:
    """A time ratio as a share (over repeated rounds the median, and the range in brackets)."""
    if not ratios:
        return "-"
    text = f"{100 * statistics.median(ratios):.0f}%"
    if len(ratios) > 1:
        text += f" ({100 * min(ratios):.0f}-{100 * max(ratios):.0f}%)"
    return text


def _worker(payload: str) -> None:
    job = json.loads(payload)
    spec = BenchSpec(**job["spec"])
    if job["task"] == "reference":
        reference_tokens(spec, job["out"])
        result = {"ok": True}
    else:
        result = run_row(spec)
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
