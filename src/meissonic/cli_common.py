"""What the `meissonic` commands share: the user-error type, device and precision choice, model loading."""

from __future__ import annotations

import os
from pathlib import Path

from .quantize import QUANTIZE_METHODS as QUANTIZE
from .runtime import OFFLOADS

DTYPES = ("auto", "fp32", "bf16", "fp16")


class UsageError(ValueError):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def add_runtime_options(p) -> None:
    """How the model runs: the options every command that samples shares (`runtime.RunOptions`)."""
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on GPU; on CPU bf16 for large "
                   "models (>= 100M transformer parameters) where a quick timing finds the CPU's bf16 matmuls faster "
                   "than fp32 ones or an fp32 run would not fit in memory, else fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="quantize the transformer's weights (torchao): less memory, a little quality; int8-dynamic "
                        "also quantizes activations: fastest int8 on CPU, more quality lost (see README)")
    p.add_argument("--quantize-text-encoder", action="store_true", help="with --quantize: the text encoder's too")
    p.add_argument("--offload", nargs="?", const="model", default="none", choices=OFFLOADS,
                   help="GPU only: 'model' moves whole components to the GPU in turn, 'sequential' layer by layer "
                        "(least memory, slowest); --offload alone means model")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (first step per size slower)")
    p.add_argument("--vq-tile", type=int, help="decode images in overlapping tiles of this many tokens a side "
                   "(less memory for large images)")


def add_size_rule_options(p) -> None:
    """The size rule's escapes (`meissonic.sizes`): every command that makes images."""
    from .sizes import LARGE_SIDE

    p.add_argument("--allow-large", action="store_true", help=f"run sizes beyond {LARGE_SIDE}x the model's "
                   "resolution a side (refused without it: they cost the square of the side); prints the token "
                   "grid and the first step's time")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="run even where the peak memory estimate exceeds the memory available")


def apply_size_rule(pipe, args) -> None:
    """Refuse, on this pipeline, what the size rule refuses on the command line (see `add_size_rule_options`)."""
    from .sizes import SizePolicy

    pipe.size_policy = SizePolicy(allow_large=args.allow_large, check_memory=not args.skip_memory_check,
                                  hint="pass --allow-large to run it anyway")


def show_size_warnings() -> None:
    """Print the size rule's warnings (token grid, first step's time, memory) as one `meissonic: ...` line each."""
    import sys
    import warnings

    from tqdm.auto import tqdm

    from .sizes import LargeSizeWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LargeSizeWarning):  # above the progress bar, which may be drawing
            tqdm.write(f"meissonic: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", LargeSizeWarning)


def add_fewer_passes_options(p) -> None:
    """How each step runs: speed level, mask schedule, guidance interval and ramp, unmasking order, step caching
    (sampling commands, eval)."""
    from .draws import DRAWS
    from .speeds import SPEEDS

    p.add_argument("--speed", choices=SPEEDS, help="exact (default: the reference sampler), fast or fastest: "
                   "measured combinations of the options below (README: Fewer passes); options given beside a "
                   "level replace its values")
    p.add_argument("--schedule", choices=("cosine", "linear", "arccos"), help="mask schedule (default: the model's)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("START", "END"),
                   help="guide only the steps whose share of the steps done lies in [START, END); the others run "
                        "one pass instead of two (default: every step)")
    p.add_argument("--guidance-ramp", action="store_true",
                   help="scale guidance by the share of tokens already known (MUSE/MAR); the first step runs unguided")
    p.add_argument("--order", choices=("confidence", "halton"), default="confidence",
                   help="which drawn tokens each step keeps: the most confident (default) or a Halton order")
    p.add_argument("--draws", choices=DRAWS, help="how each masked token is drawn: reference (the reference's "
                   "random stream, the same tokens for a seed; exact's) or cdf (one uniform per token by inverse "
                   "CDF: the same distribution, far fewer random numbers; fast's and fastest's)")
    p.add_argument("--step-cache", type=float, nargs=3, metavar=("WARMUP", "EVERY", "SHARE"),
                   help="full passes on the first WARMUP share of the steps and every EVERY steps after; between "
                        "them only a SHARE of the positions runs, the rest from caches (e.g. 0.3 4 0.25)")


def check_fewer_passes_args(args) -> None:
    """Refuse bad values and combinations of `add_fewer_passes_options` (one line each, no traceback)."""
    fewer_passes_kwargs(args)
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] < args.guidance_interval[1] <= 1:
        start, end = args.guidance_interval
        raise UsageError(f"--guidance-interval {start:g} {end:g}: needs 0 <= START < END <= 1 (shares of the steps)")


def fewer_passes_kwargs(args) -> dict:
    """The pipeline keywords of `add_fewer_passes_options`, the speed level resolved (`speeds.sampling_settings`)."""
    from .speeds import sampling_settings
    from .step_cache import CachePlan

    plan = None
    if args.step_cache is not None:
        warmup, every, share = args.step_cache
        if every != int(every):
            raise UsageError(f"--step-cache {warmup:g} {every:g} {share:g}: EVERY must be a whole number of steps")
        try:
            plan = CachePlan(warmup=warmup, every=int(every), share=share)
        except ValueError as err:
            raise UsageError(f"--step-cache {warmup:g} {every:g} {share:g}: {err}") from None
    if (plan is not None or args.speed in ("fast", "fastest")) and getattr(args, "compile", False):
        raise UsageError("--compile runs fixed shapes; step caching (--step-cache, --speed fast/fastest) runs "
                         "partial passes of changing shapes: use --speed exact with --compile")
    try:
        return sampling_settings(
            args.speed, masking_schedule=args.schedule, order=args.order, guidance_ramp=args.guidance_ramp,
            guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
            step_cache=plan, draws=args.draws)
    except ValueError as err:
        raise UsageError(f"--speed {args.speed}: {err}" if args.speed else str(err)) from None


def check_vq_tile(tile: int | None) -> None:
    if tile is not None and tile < 4:
        raise UsageError(f"--vq-tile {tile}: must be at least 4 tokens")


def check_runtime_args(args) -> None:
    check_vq_tile(args.vq_tile)
    if args.quantize_text_encoder and args.quantize == "none":
        raise UsageError("--quantize-text-encoder needs --quantize int8, fp8 or int4")


def run_options(args):
    from .runtime import RunOptions

    return RunOptions(quantize=args.quantize, quantize_text_encoder=args.quantize_text_encoder,
                      offload=args.offload, compile=args.compile, vq_tile=args.vq_tile)


def prepare_pipeline(pipe, device, args) -> None:
    """Apply the run options of the command line (quantize, offload, compile, tiled decoding) to a loaded pipeline."""
    from .runtime import prepare

    try:
        prepare(pipe, device, run_options(args))
    except ValueError as err:
        raise UsageError(str(err)) from None


def version() -> str:
    from .version import __version__

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


def resolve_dtype(name: str, device, model: str | None = None):
    """--dtype NAME on `device`; `auto` asks `runtime.auto_dtype`, sizing the model folder's transformer when given."""
    if name == "auto":
        return _auto_dtype(device, model)
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 on CPU is hundreds of times slower than bf16: use --dtype bf16 or fp32")
    return torch_dtype(name)


def _auto_dtype(device, model: str | None):
    """`runtime.auto_dtype` for the model folder's transformer size; a quantized folder's own precision."""
    from .loading import resolve_model_folder
    from .quantize import is_quantized_folder, saved_dtype
    from .runtime import auto_dtype, transformer_params

    if model is None:
        return auto_dtype(device)
    try:
        folder = resolve_model_folder(model)
        if is_quantized_folder(folder / "transformer"):
            return saved_dtype(folder / "transformer")
        return auto_dtype(device, transformer_params(folder) if device.type == "cpu" else None)
    except Exception:  # noqa: BLE001 - the load that follows reports the problem properly
        return auto_dtype(device)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def save_new_folder(pipe, out: Path) -> None:
    """Write a pipeline folder that appears whole: into a temporary sibling, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pipe.save_pretrained(tmp)
    os.replace(tmp, out)


def load_pipeline(model: str, dtype, allow_pickle: bool = False, transformer: Path | None = None):
    """The pipeline folder `model`, its transformer replaced by the folder `transformer` when given."""
    from .loading import ModelFolderError
    from .pipeline import MeissonicPipeline

    parts = {} if transformer is None else {"transformer": transformer}
    try:
        return MeissonicPipeline.from_pretrained(model, torch_dtype=dtype, allow_pickle=allow_pickle, **parts)
    except ModelFolderError:
        raise
    except Exception as err:  # a library's error while reading a malformed folder: one line, no traceback
        raise UsageError(f"cannot load model {model!r}: {type(err).__name__}: {reason(err)}") from None


def load_student(pipe, student: str, dtype, allow_pickle: bool = False):
    """A one-step student of `pipe`'s model (a student folder, `demo-1step`, or a pipeline folder written by
    `meissonic distill`) as its own pipeline sharing `pipe`'s tokenizer, text encoder, VQ and scheduler: only its
    transformer is loaded."""
    from .loading import ModelFolderError
    from .pipeline import MeissonicPipeline

    shared = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vqvae=pipe.vqvae, scheduler=pipe.scheduler)
    try:
        loaded = MeissonicPipeline.from_pretrained(student, torch_dtype=dtype, allow_pickle=allow_pickle, **shared)
    except ModelFolderError:
        raise
    except Exception as err:  # a library's error while reading a malformed folder: one line, no traceback
        raise UsageError(f"cannot load student {student!r}: {type(err).__name__}: {reason(err)}") from None
    if loaded.one_step_mode is None:
        raise UsageError(f"{student!r} is not a one-step student (it records no one-step mode): distill one with "
                         f"`meissonic distill`")
    return loaded


def reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
