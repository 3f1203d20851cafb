"""Which image sizes run without a word, and what a request costs: the one rule the command line, the web UI, the
HTTP server and the library share.

Sides up to `LARGE_SIDE` times the model's resolution run as they always did (the UI's size sliders stop there). A
larger size works, but the token grid grows with the square of the side and every step attends over all of it: the
demo (128 px) asked for 4096 px draws a 512x512 grid, 262,144 tokens, and takes many minutes a step. The command
line refuses such sizes unless told `--allow-large`; the library never refuses them, it warns (`LargeSizeWarning`)
with the token grid before sampling and with the time of the first step after it, so the user can stop early.

Separately, each request's peak memory is estimated before any work (`memory_estimate`); where the estimate exceeds
the memory available (Linux's MemAvailable, or the GPU's free memory) the command line and the UI refuse with one
line, and the library warns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

LARGE_SIDE = 2  # sides up to this multiple of the model's resolution run without a word

# Peak memory per unit of each term, fitted on peak-RSS measurements (README, "Image sizes"; `scripts/size_memory.py`)
# of the demo, the tiny preset and the 1B architecture at 256 to 2048 px, fp32 and bf16, one and two images.
LOGITS_COPIES = 4  # float32 rows of the codebook per token while a step draws: logits, probabilities, noise, ...
BLOCK_ACTIVATIONS = 32  # float32 activations of the model's width per block position and branch, at a block's peak
TOKEN_ACTIVATIONS = 2  # float32 activations of the model's width per token and branch (decompression, head)
DECODER_ACTIVATIONS = 10  # activations of the tokenizer decoder's first width per pixel, at the decoder's peak
OVERHEAD = 100 * 2**20  # allocator and thread buffers


class SizeError(ValueError):
    """A request refused by the size or memory rule (one line, naming the size and what is allowed)."""


class LargeSizeWarning(UserWarning):
    """A request beyond `LARGE_SIDE` times the model's resolution, or one estimated not to fit in memory."""


@dataclass(frozen=True)
class SizePolicy:
    """What a pipeline does with large and memory-hungry requests. The library's default runs everything (warning);
    the command line refuses large sizes unless `--allow-large` and requests that would not fit in memory."""

    allow_large: bool = True
    check_memory: bool = False
    hint: str = ""  # how the user allows a large size, appended to the refusal (e.g. "pass --allow-large ...")


@dataclass(frozen=True)
class Request:
    """An image size asked of a model, with its token grid."""

    width: int
    height: int
    images: int
    resolution: int  # the model's
    grid: tuple[int, int]  # (rows, cols) of tokens

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def limit(self) -> int:
        return LARGE_SIDE * self.resolution

    @property
    def large(self) -> bool:
        return max(self.width, self.height) > self.limit

    def grid_text(self) -> str:
        return f"a {self.grid[1]}x{self.grid[0]} token grid ({self.tokens:,} tokens per image)"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a request adds at its peak beyond the loaded model: while sampling, and while decoding the tokens."""

    sampling: int
    decoding: int

    @property
    def peak(self) -> int:
        return max(self.sampling, self.decoding) + OVERHEAD


def size_limit(pipe) -> int:
    """The longest side a model makes without `--allow-large`: `LARGE_SIDE` times its resolution."""
    return LARGE_SIDE * pipe.defaults["resolution"]


def request(pipe, width: int, height: int, images: int = 1) -> Request:
    f = pipe.vae_scale_factor
    return Request(width, height, images, pipe.defaults["resolution"], (height // f, width // f))


def large_size_message(req: Request) -> str:
    return (f"{req.width}x{req.height} px is beyond {LARGE_SIDE}x this model's {req.resolution} px resolution (at "
            f"most {req.limit} px a side): {req.grid_text()}, every step attending over all of them")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The precision of a module's first floating-point weight (diffusers' `.dtype` walks every module to find it,
    a few ms a call on a small model)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def memory_estimate(pipe, width: int, height: int, images: int = 1, guided: bool = True, cached: bool = False,
                    vq_tile: int | None = None) -> MemoryEstimate:
    """Peak memory a generation of `images` images of width x height adds to the loaded model (`guided`: two
    branches per step; `cached`: step caching's keys, values and logits). An estimate, fitted on measurements."""
    cfg, f = pipe.transformer.config, pipe.vae_scale_factor
    rows, cols = height // f, width // f
    tokens = rows * cols
    block_rows, block_cols = pipe.transformer.block_grid(rows, cols)
    sequence = block_rows * block_cols + pipe.tokenizer.model_max_length
    dim, vocab = cfg.num_attention_heads * cfg.attention_head_dim, cfg.codebook_size
    branches = 2 if guided else 1
    model_bytes = _bytes(_dtype(pipe.transformer))
    per_image = (tokens * vocab * 4 * LOGITS_COPIES + branches * sequence * dim * 4 * BLOCK_ACTIVATIONS
                 + branches * tokens * dim * 4 * TOKEN_ACTIVATIONS)
    if cached:
        layers = cfg.num_layers + cfg.num_single_layers
        per_image += layers * 2 * branches * sequence * dim * model_bytes + 2 * tokens * vocab * model_bytes
    vq = pipe.vqvae
    vq_dtype = _dtype(vq)
    vq_bytes = 4 if vq_dtype == torch.float16 else _bytes(vq_dtype)  # fp16 decodes in fp32
    first = vq.config.block_out_channels[0] * vq_bytes * DECODER_ACTIVATIONS
    outputs = images * 3 * width * height * 4  # the decoded images, float32
    if vq_tile is not None and (rows > vq_tile or cols > vq_tile):  # one tile of one image at a time
        side = min(vq_tile, rows) * f, min(vq_tile, cols) * f
        decoding = first * side[0] * side[1] + 2 * outputs
    else:
        decoding = images * first * width * height + outputs
    return MemoryEstimate(images * per_image, decoding)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on `device` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        from .runtime import available_memory as host_available

        return host_available()
    return None


def memory_message(req: Request, estimate: MemoryEstimate, available: int, tiled: bool) -> str:
    gb = 2**30
    advice = "make fewer images at once (--num-images, --batch-size) or a smaller size"
    if estimate.decoding > estimate.sampling and not tiled:
        advice += ", or decode in tiles (--vq-tile 32)"
    return (f"{req.images} image(s) of {req.width}x{req.height} px need about {estimate.peak / gb:.1f} GB at their "
            f"peak (sampling {estimate.sampling / gb:.1f} GB, decoding {estimate.decoding / gb:.1f} GB) and "
            f"{available / gb:.1f} GB is available: {advice}")


def check_request(pipe, width: int, height: int, images: int = 1, guided: bool = True, cached: bool = False,
                  warn: bool = True, device: torch.device | None = None) -> Request:
    """Apply the pipeline's `size_policy` to a request before any work: raise `SizeError` for what it refuses;
    with `warn`, warn (`LargeSizeWarning`) about a large size or a memory estimate beyond what is available.
    `device`: where it runs, when the caller knows (default: the pipeline's execution device)."""
    policy: SizePolicy = getattr(pipe, "size_policy", SizePolicy())
    req = request(pipe, width, height, images)
    if req.large:
        if not policy.allow_large:
            raise SizeError(large_size_message(req) + (f"; {policy.hint}" if policy.hint else ""))
        if warn:
            warnings.warn(f"{large_size_message(req)}; the first step's time follows", LargeSizeWarning, stacklevel=4)
    if policy.check_memory or warn:
        available = available_memory(pipe._execution_device if device is None else device)
        tile = getattr(pipe, "vq_tile", None)
        estimate = memory_estimate(pipe, width, height, images, guided, cached, tile)
        if available is not None and estimate.peak > available:
            message = memory_message(req, estimate, available, tile is not None)
            if policy.check_memory:
                raise SizeError(message)
            warnings.warn(message, LargeSizeWarning, stacklevel=4)
    return req


def first_step_message(seconds: float, steps: int) -> str:
    total = seconds * steps
    rest = f"{total / 60:.0f} min" if total >= 120 else f"{total:.0f} s" if total >= 10 else f"{total:.1f} s"
    return f"the first step took {seconds:.1f} s: about {rest} for {steps} step{'s' * (steps != 1)}"
