"""How a loaded pipeline runs: precision choice, quantization, offload, compilation, tiled decoding, process share.

Shared by the image commands, the eval, the UI and the benchmark, so each option means the same everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

OFFLOADS = ("none", "model", "sequential")
# bf16 pays on a CPU only once matmuls dominate the step. Small models spend their time in element-wise work, where
# bf16's casts cost more than they save: they stay in fp32. Measured with `meissonic bench` (README): the 5M-parameter
# demo gains nothing reliable in bf16 (0.85-1.23x across runs); the 1B architecture runs 1.4-2.4x faster per step in
# bf16 on an AMD Zen 4 (AVX512-BF16), but 0.81x on an Intel Xeon with AVX512-BF16 and no AMX, whose bf16 matmuls are
# slower than its fp32 ones. So the CPU's own matmuls decide (`cpu_has_fast_bf16`).
CPU_BF16_MIN_PARAMS = 100_000_000
BF16_PROBE_MARGIN = 1.2  # bf16 matmuls must be this many times faster than fp32 ones for `auto` to pick bf16
_PROBE_SHAPE = (256, 1024, 4096)  # tokens x features x outputs: a 1B block's feed-forward matmul, ~2 GFLOP


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); never fp16 on CPU: it is emulated there."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int] = _PROBE_SHAPE, repeats: int = 5) -> float:
    """Best of `repeats` timings of one (tokens x features) @ (features x outputs) matmul in `dtype` on the CPU, after
    two warm-up runs. Leaves the global random state alone."""
    import time

    tokens, features, outputs = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, features, generator=generator).to(dtype)
    w = torch.randn(outputs, features, generator=generator).to(dtype)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if i >= 2:
                best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls are clearly faster than fp32 ones on this CPU: it must have bf16 instructions, and a
    transformer-sized matmul (~0.2 s for both precisions, once per process) must run at least `BF16_PROBE_MARGIN`
    times faster in bf16. AVX512-BF16 alone does not make bf16 fast: some Intel Xeons without AMX run it slower."""
    if not cpu_has_native_bf16():
        return False
    return matmul_seconds(torch.bfloat16) * BF16_PROBE_MARGIN <= matmul_seconds(torch.float32)


# A whole fp32 generation peaks near twice the transformer's fp32 weights (`meissonic bench`: 7.1 GB for the 1B's
# 3.75 GB at 512 px; bf16 4.0 GB): where that would not fit in the memory available, `auto` takes bf16 even if slower.
FP32_PEAK_BYTES_PER_PARAM = 8


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable, else the free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def auto_dtype(device: torch.device, transformer_params: int | None = None) -> torch.dtype:
    """The precision `--dtype auto` picks: bf16 on CUDA (fp16 where bf16 is missing). On a CPU, for models of at
    least `CPU_BF16_MIN_PARAMS` transformer parameters, bf16 where its bf16 matmuls are faster than fp32 ones, or
    where it has bf16 instructions and an fp32 generation would not fit in the memory available; else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and transformer_params is not None and transformer_params >= CPU_BF16_MIN_PARAMS:
        if cpu_has_fast_bf16():
            return torch.bfloat16
        available = available_memory()
        too_big = available is not None and transformer_params * FP32_PEAK_BYTES_PER_PARAM > available
        return torch.bfloat16 if too_big and cpu_has_native_bf16() else torch.float32
    return torch.float32


def transformer_params(folder) -> int:
    """Parameter count of a pipeline folder's transformer, from its config alone (built on the meta device)."""
    from .transformer import MeissonicTransformer

    with torch.device("meta"):
        model = MeissonicTransformer.from_config(MeissonicTransformer.load_config(str(folder / "transformer")))
    return sum(p.numel() for p in model.parameters())


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the system (glibc's `malloc_trim`): after loading,
    quantizing or releasing a model, the freed full-precision weights otherwise stay in the process's heap and count
    in its resident memory. A no-op where the C library has no `malloc_trim`."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class RunOptions:
    """What `prepare` does to a loaded pipeline, in this order: LoRA is the caller's; then these."""

    quantize: str = "none"  # none, int8, fp8, int4 (transformer weights)
    quantize_text_encoder: bool = False
    offload: str = "none"  # none, model (whole components to the GPU in turn), sequential (layer by layer)
    compile: bool = False  # torch.compile the transformer's per-step call, as one graph
    vq_tile: int | None = None  # decode in tiles of this many tokens a side


def prepare(pipe, device: torch.device, options: RunOptions) -> None:
    """Place, quantize, offload and compile a loaded pipeline as `options` say; raises ValueError for combinations
    that cannot work, naming them."""
    if options.offload not in OFFLOADS:
        raise ValueError(f"offload={options.offload!r} is not one of {', '.join(OFFLOADS)}")
    if options.offload != "none" and device.type != "cuda":
        raise ValueError(f"offload={options.offload!r} needs a CUDA GPU (the weights wait in CPU memory and move "
                         f"to the GPU when used); on {device.type} everything is in one memory already")
    if options.offload == "sequential" and options.quantize != "none":
        raise ValueError("sequential offload moves weights layer by layer and cannot carry quantized weights: "
                         "use offload 'model' with quantization")
    if options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
        if options.quantize != "none":
            pipe.quantize(options.quantize, text_encoder=options.quantize_text_encoder)
        if options.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
    release_freed_memory()
    if options.compile:
        compile_transformer(pipe.transformer, device=device)
    pipe.enable_vq_tiling(options.vq_tile)


def compile_transformer(transformer, backend: str | Callable = "inductor", device: torch.device | None = None) -> None:
    """torch.compile the transformer's per-step call, `predict`, whole and in place: `fullgraph=True` (the full head
    has no graph break; a test checks), `dynamic=False` (one graph per grid size and batch, compiled on its first
    step), inductor's `max-autotune` mode on CUDA (tuned kernels, CUDA graphs), its default mode elsewhere.

    Only the full head is compiled: a call with `logits_for` (the masked-only head, compact rows of a data-dependent
    shape) or with step caching's `kv`/`rows` runs eagerly. The pipeline sees `is_compiled` and asks for grid logits and a static sampling step.
    `backend`: torch.compile's (tests use "eager" or a counting one); `device`: where it will run (default: where the
    weights are now). A second call does nothing. torchao's quantized weights (int8, fp8, int4, and int8-dynamic
    in bf16 or on CUDA) trace into the graph; fbgemm's packed int8 linears do not, and are refused."""
    if is_compiled(transformer):
        return
    from torch.ao.nn.quantized.dynamic import Linear as PackedLinear

    if any(isinstance(m, PackedLinear) for m in transformer.modules()):
        raise ValueError("compile with torch.ao's dynamic int8 linears (quantize 'int8-dynamic' on a CPU in fp32, "
                         "fbgemm) cannot work: torch.compile cannot trace their packed weights; use 'int8', 'fp8', "
                         "or bf16 with 'int8-dynamic'")
    device = torch.device(device) if device is not None else transformer.device
    mode = {"mode": "max-autotune"} if backend == "inductor" and device.type == "cuda" else {}
    eager = transformer.predict
    compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend=backend, **mode)

    @functools.wraps(eager)
    def predict(hidden_states, timestep, conditions, logits_for=None, kv=None, rows=None, embedding_noise=None,
                modulations=None):
        # masked-only head, step caching (and its modulation cache), a student's embedding noise: not the
        # fixed-shape step, so eager
        if any(x is not None for x in (logits_for, kv, rows, embedding_noise, modulations)):
            return eager(hidden_states, timestep, conditions, logits_for, kv, rows, embedding_noise, modulations)
        return compiled(hidden_states, timestep, conditions)

    transformer.predict = predict
    transformer._meissonic_compiled = True


def is_compiled(transformer) -> bool:
    """Whether `compile_transformer` compiled this transformer."""
    return getattr(transformer, "_meissonic_compiled", False)


@dataclass
class ProcessShare:
    """This process's place among the ranks that `torchrun` or `accelerate launch` started (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def take(self, items: list) -> list:
        """This rank's share: every world-th item from its rank, so shares differ by at most one."""
        return items[self.rank::self.world]


def process_share() -> ProcessShare:
    """Read the ranks from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, as torchrun and accelerate set
    them). The ranks only split the work: each writes its own images, nothing is exchanged between them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}: "
                         f"not whole numbers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: a rank must lie in [0, WORLD_SIZE)")
    return ProcessShare(rank, world, local_rank)


def rank_device(device: torch.device, share: ProcessShare) -> torch.device:
    """With several ranks on CUDA and no GPU index given, each rank takes the GPU of its local rank."""
    if device.type == "cuda" and device.index is None and share.world > 1:
        return torch.device("cuda", share.local_rank % torch.cuda.device_count())
    return device
