"""Categorical draws for the masked positions of a token grid, with the random stream of a multinomial over all of it.

The reference scheduler draws one token per position with `torch.multinomial(probs (B*N, V), 1, generator)`, for
every position, masked or not. torch implements that as argmax(p / q) with q ~ Exp(1) of p's shape (the Gumbel-max
trick). So the same tokens come from drawing q for all B*N rows, in order, and dividing and taking the argmax on the
masked rows only: `Draws` does that, and the sampler never computes anything for the known rows but their noise.

On a CPU generator, torch's `exponential_` is a serial loop: 53 random bits per value, made a uniform double u, then
-log1p(-u) in double, rounded to float (0.59 s for the 33.5 M values of a 64 x 64 grid at 8192 codes, 2-core Xeon).
`uniform_` on doubles draws the same u from the same bits, and the logarithm then runs vectorised, on the masked rows
only, chunk by chunk (0.3 s there): the same values, bit for bit, checked against `exponential_` once per process on a
sample (`fast_cpu_stream()`); where they differ (another torch build), the plain `exponential_` is used. CUDA
generators always use `exponential_`.

Calling a `Draws` waits for the device: it counts each generator's masked rows (`int(...)`) and gathers them with a
boolean index. The sampler's fixed-shape path (`decode(static=True)`, for torch.compile and CUDA graphs) takes
`Draws.every_row` instead: the same noise for every row, no count, no gather; the step picks with `torch.where`.

`CdfDraws` is the cheap way to the same distribution, for the sampler's faster levels, which do not promise the
reference's tokens: one uniform per masked position and the inverse of its row's cumulative distribution (a float64
cumulative sum and a binary search). It skips the V random values per position that the reference's stream spends
(at 8192 codes on a 2-core EPYC, 57 ms against 2 ms for 512 rows).
"""

from __future__ import annotations

import functools

import torch

CHUNK_ROWS = 256  # rows of doubles drawn at a time by the CPU path: 16 MB at 8192 codes
DRAWS = ("reference", "cdf")  # how a step draws a token per masked position: the reference's stream, or CdfDraws


@functools.cache
def fast_cpu_stream() -> bool:
    """Does -log1p(-u), u from `uniform_` on doubles, give `exponential_`'s float32 values and leave the generator
    where `exponential_` leaves it, in this torch build?"""
    drawn = [torch.Generator().manual_seed(20241008) for _ in range(2)]
    expected = torch.empty(3, 1000).exponential_(1, generator=drawn[0])
    ours = _log_transform(torch.empty(3, 1000, dtype=torch.float64).uniform_(generator=drawn[1]))
    after = [torch.rand(4, generator=g) for g in drawn]
    return torch.equal(expected, ours) and torch.equal(*after)


def _log_transform(uniform: torch.Tensor) -> torch.Tensor:
    """u (double) -> -log1p(-u) as float32, in place on u (torch's CPU exponential with rate 1, value by value)."""
    return uniform.neg_().log1p_().neg_().float()


class Draws:
    """One categorical draw per masked position: `draws(probs (M, V), rows (B, N) bool) -> (M,)`, `probs` holding the
    masked positions' rows in the order of `rows`. One generator for the grid, or one per image (a list)."""

    def __init__(self, generator: torch.Generator | None, per_image: list[torch.Generator] | None):
        self.generator, self.per_image = generator, per_image
        self.noise: torch.Tensor | None = None  # q's memory, kept from step to step (a fresh one faults its pages in)

    def __call__(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.per_image is None:
            parts = [(self.generator, rows.flatten())]
        else:
            parts = [(g, rows[b]) for b, g in enumerate(self.per_image)]
        drawn, start = [], 0
        for generator, part in parts:  # every row's noise is drawn, masked or not: the stream stays the reference's
            count = int(part.sum())
            drawn.append(self._draw(probs[start:start + count], part, generator))
            start += count
        return torch.cat(drawn)

    def _draw(self, probs: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Draws for the `rows.sum()` masked rows among the len(rows) whose noise `generator` makes, in order."""
        device = generator.device if generator is not None else probs.device
        if device.type == "cpu" and fast_cpu_stream():
            return _draw_cpu(probs, rows.cpu(), generator).to(probs.device)
        shape = (rows.numel(), probs.shape[-1])
        if self.noise is None or self.noise.shape != shape or self.noise.device != device:
            self.noise = torch.empty(shape, device=device)
        noise = self.noise.exponential_(1, generator=generator)
        noise = (noise if probs.shape[0] == shape[0] else noise[rows.to(device)]).to(probs.device)
        return torch.div(probs, noise, out=noise).argmax(dim=-1)  # q's memory is free to be overwritten

    def every_row(self, rows: int, codes: int, device: torch.device) -> torch.Tensor:
        """q (rows, codes) float32 for every position, the values and stream of `__call__`'s draws (one generator
        over all rows, or one per image over its equal share), on `device`; nothing waits for the device. Sync-free
        where the generator lives on `device` (a CPU generator's noise is copied there). The memory is reused from
        call to call: read it before the next."""
        if self.noise is None or self.noise.shape != (rows, codes) or self.noise.device != device:
            self.noise = torch.empty(rows, codes, device=device)
        generators = [self.generator] if self.per_image is None else self.per_image
        for part, generator in zip(self.noise.chunk(len(generators)), generators):
            _exponential(part, generator)
        return self.noise


def _exponential(out: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fill `out` (rows, V) with Exp(1) noise from `generator`: `exponential_`'s values, by the fast CPU path where
    it holds (the logarithm over every row here, chunk by chunk)."""
    device = generator.device if generator is not None else out.device
    if device.type == "cpu" and fast_cpu_stream():
        buffer = torch.empty(min(CHUNK_ROWS, out.shape[0]), out.shape[1], dtype=torch.float64)
        for chunk in out.split(buffer.shape[0]):
            chunk.copy_(_log_transform(buffer[: chunk.shape[0]].uniform_(generator=generator)))
    elif device == out.device:
        out.exponential_(1, generator=generator)
    else:
        out.copy_(torch.empty(out.shape, device=device).exponential_(1, generator=generator))


def _draw_cpu(probs: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The same draws as `exponential_` + argmax(p / q), with the logarithm run only on the masked rows."""
    codes = probs.shape[-1]
    buffer = torch.empty(min(CHUNK_ROWS, rows.numel()), codes, dtype=torch.float64)
    drawn = torch.empty(probs.shape[0], dtype=torch.long)
    counts = rows.reshape(-1).split(buffer.shape[0])
    start = 0
    for part in counts:
        uniform = buffer[: part.numel()].uniform_(generator=generator)  # the stream advances over every row
        count = int(part.sum())
        if not count:
            continue
        noise = _log_transform(uniform if count == part.numel() else uniform[part])  # (count, V) float32
        chunk = probs[start:start + count].to(device="cpu", dtype=torch.float32)
        drawn[start:start + count] = torch.div(chunk, noise, out=noise).argmax(dim=-1)
        start += count
    return drawn


def pick(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The token each row of `probs` (R, V) draws from its noise: (R, V) Exp(1) noise, `Draws`' (argmax(p / q)), or
    (R, 1) uniforms in [0, 1), `CdfDraws`' (the inverse of the row's cumulative distribution). Fixed shapes only."""
    if noise.shape[-1] != 1:
        return (probs / noise).argmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)  # (R, V): float64, so that small probabilities keep their share
    target = noise.double() * cdf[:, -1:]  # (R, 1): scaled to the row's total (softmax sums to 1 up to rounding)
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


class CdfDraws:
    """One categorical draw per masked position from one uniform each: `draws(probs (M, V), rows (B, N) bool) -> (M,)`
    as `Draws`, and the same distribution, but another stream (so other tokens for a seed than the reference's).
    One uniform is drawn for every position, masked or not (a few thousand numbers), so the fixed-shape path
    (`every_row`) draws the same tokens. One generator for the grid, or one per image (a list)."""

    def __init__(self, generator: torch.Generator | None, per_image: list[torch.Generator] | None):
        self.generator, self.per_image = generator, per_image

    def __call__(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        every = self.every_row(rows.numel(), probs.shape[-1], probs.device)  # (B*N, 1): B*N numbers, cheap
        return pick(probs, every[rows.reshape(-1).to(probs.device)])

    def every_row(self, rows: int, codes: int, device: torch.device) -> torch.Tensor:
        """(rows, 1) uniforms, one per position (the fixed-shape path): one generator over all rows, or one per image
        over its equal share."""
        if self.per_image is None:
            return _uniform(rows, self.generator, device)[:, None]
        share = rows // len(self.per_image)
        return torch.cat([_uniform(share, g, device) for g in self.per_image])[:, None]


def _uniform(count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`count` float64 uniforms in [0, 1) from `generator` (on its device), on `device`."""
    made = generator.device if generator is not None else device
    return torch.rand(count, dtype=torch.float64, generator=generator, device=made).to(device)


def make_draws(method: str, generator: torch.Generator | None, per_image: list[torch.Generator] | None):
    """The draws of `method` (one of DRAWS) for the sampler."""
    if method not in DRAWS:
        raise ValueError(f"draws={method!r} is not one of {', '.join(DRAWS)}")
    return Draws(generator, per_image) if method == "reference" else CdfDraws(generator, per_image)
