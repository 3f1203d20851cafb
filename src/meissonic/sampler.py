"""MaskGIT-style parallel decoding (Chang et al. 2022), as Meissonic samples (arXiv 2410.08261).

`decode` is a pure function: it sees token grids and a logits function, never a network, tokenizer or text. Each
task (text-to-image, image-to-image, inpainting, outpainting) only builds the initial grid, with `mask_token_id`
where the image is unknown, and calls it.

Per step, as the reference scheduler: sample a token for every unknown position from softmax(logits); score each
sample by log p + T_i * Gumbel noise (T annealed 2 -> 0 by default); keep the most confident and re-mask the
`floor(n * schedule((i + 1) / steps))` least confident, n being the number of tokens unknown at the start. The last
step keeps everything. Deviation from the reference: tokens that were known before a step get +inf confidence, so
they are never re-masked in any dtype (the reference gives them log(finfo.max), which fp16 can lose to noise).
With a single `torch.Generator`, random numbers are drawn in the same order and shapes as the reference scheduler,
so a reference run with the same seed and logits picks the same tokens; a list gives one generator per image.

Two ways through a step, the same tokens for the same seed and logits: by default only the masked rows are drawn
(compact logits welcome; it waits for the device to count them), and with `static=True` every row is, on fixed
shapes, with nothing that waits for the device (`sampling_step`: for torch.compile and CUDA graphs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .draws import make_draws, pick
from .orders import ORDERS, rolled_ranks

Generators = torch.Generator | Sequence[torch.Generator] | None
# logits_fn(tokens (B, h, w), step index) -> logits (B, codebook_size, h, w), or compact (M, codebook_size): the rows of
# the M masked positions only, in the order of `tokens == mask_token_id` (row-major over (B, h, w))
LogitsFn = Callable[[torch.Tensor, int], torch.Tensor]


def cosine_schedule(progress: torch.Tensor) -> torch.Tensor:
    """Share of the initially unknown tokens still masked after `progress` in (0, 1] of the steps."""
    return torch.cos(progress * math.pi / 2)


def linear_schedule(progress: torch.Tensor) -> torch.Tensor:
    return 1 - progress


def arccos_schedule(progress: torch.Tensor) -> torch.Tensor:
    """Halton-MaskGIT's schedule: slow at first, fast at the end."""
    return torch.arccos(progress.clamp(max=1.0)) / (math.pi / 2)


MASK_SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_schedule,
    "linear": linear_schedule,
    "arccos": arccos_schedule,
}


def temperature_schedule(temperature: float | Sequence[float], steps: int) -> list[float]:
    """Gumbel-noise temperature per step: (start, end) -> linspace(start, end); a number t -> linspace(t, 0.01)."""
    if isinstance(temperature, (int, float)):
        start, end = float(temperature), 0.01
    else:
        if len(temperature) != 2:
            raise ValueError(f"temperature={temperature!r}: give one number or a (start, end) pair")
        start, end = float(temperature[0]), float(temperature[1])
    return torch.linspace(start, end, steps).tolist()


def masked_count(seq_len: int, start_ratio: torch.Tensor, step: int, steps: int, schedule: str) -> torch.Tensor:
    """How many tokens are re-masked after step `step` (0-based), per image: floor(seq_len * r0 * schedule)."""
    progress = torch.tensor((step + 1) / steps, dtype=torch.float32)
    return (seq_len * (start_ratio * MASK_SCHEDULES[schedule](progress))).floor()  # (B,)


def guided_logits(uncond: torch.Tensor, cond: torch.Tensor, scale: float, overwrite: bool = False) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). `overwrite=True` computes it in `cond`'s memory
    (the same values: each operation rounds alike, in either order of the sum)."""
    if overwrite:
        return cond.sub_(uncond).mul_(scale).add_(uncond)
    return uncond + scale * (cond - uncond)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.zeros(shape, device=gen_device).uniform_(0, 1, generator=generator).to(device)


def _randint(high: int, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (count,), generator=generator, device=gen_device).to(device)


def _confidence_noise(batch: int, seq_len: int, single: torch.Generator | None,
                      generators: list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """The uniform noise (B, N) behind the confidence's Gumbel noise, drawn as the reference scheduler draws it."""
    if generators is None:
        return _uniform((batch, seq_len), single, device)
    return torch.cat([_uniform((1, seq_len), g, device) for g in generators])


def _gumbel(noise: torch.Tensor) -> torch.Tensor:
    return -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))


def _confidence(probs: torch.Tensor, drawn: torch.Tensor, unknown: torch.Tensor, temperature: float,
                single: torch.Generator | None, generators: list[torch.Generator] | None) -> torch.Tensor:
    """log p of each drawn token + temperature * Gumbel noise, (B, N) (the reference scheduler's confidence)."""
    batch, seq_len = unknown.shape
    chosen = probs.gather(-1, drawn[:, None])[:, 0]  # (M,)
    noise = _confidence_noise(batch, seq_len, single, generators, unknown.device)
    log_chosen = torch.zeros_like(noise).masked_scatter(unknown, torch.log(chosen.clamp(min=1e-20)))
    return log_chosen + temperature * _gumbel(noise)


def _remask(filled: torch.Tensor, confidence: torch.Tensor, unknown: torch.Tensor, target: torch.Tensor,
            mask_token_id: int) -> torch.Tensor:
    """Re-mask the least confident of the tokens drawn this step: `target` (B,) (the schedule's count, a float) of
    them, at least one and at most all but one per image. Known tokens are never re-masked. Fixed shapes only."""
    batch = filled.shape[0]
    n_mask = torch.minimum(unknown.sum(dim=1) - 1, target.long()).clamp(min=1)  # (B,)
    confidence = torch.where(unknown, confidence, torch.inf)  # known tokens are never re-masked
    ranked = torch.cat([confidence.sort(dim=-1).values, confidence.new_full((batch, 1), torch.inf)], 1)
    cut_off = ranked.gather(1, n_mask[:, None])  # (B, 1); +inf when every unknown token stays masked
    return torch.where(confidence < cut_off, mask_token_id, filled)  # (B, N)


def sampling_step(
    sample: torch.Tensor,
    logits: torch.Tensor,
    exponential: torch.Tensor,
    mask_token_id: int,
    final: bool,
    target: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    halton: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `decode(static=True)`, pure and on fixed shapes: no `.item()`, no boolean indexing, nothing that
    waits for the device, so `torch.compile(sampling_step, fullgraph=True)` traces it whole (a test checks).

    sample (B, N) tokens; logits (B, V, h, w), the grid's; exponential (B*N, V): the multinomial's Exp(1) noise for
    every position (`Draws.every_row`), or (B*N, 1) uniforms for `draws="cdf"` (`CdfDraws.every_row`). Unless `final` (the last step keeps every draw): target (B,) the schedule's
    count left masked after the step (`masked_count`), and either `uniform` (B, N) + `temperature` (a 0-dim tensor)
    for the confidence order, or `halton` (B, N) (minus the rolled ranks) for the Halton order.
    Returns the next grid (B, N) and whether a masked position's logits held nan or inf (a 0-dim bool, for the
    caller to read when it may wait).

    Every position is drawn, known or not, and the step keeps the masked ones' draws with `torch.where`: the same
    softmax, division and argmax per row as the masked-rows path, hence the same tokens.
    """
    batch, seq_len = sample.shape
    unknown = sample == mask_token_id  # (B, N)
    probs = logits.permute(0, 2, 3, 1).reshape(batch * seq_len, -1).float().softmax(dim=-1)  # (B*N, V)
    not_finite = (probs[:, 0].isnan() & unknown.flatten()).any()  # softmax spreads a nan or inf logit over its row
    drawn = pick(probs, exponential)  # (B*N,): the multinomial's draw (Gumbel-max, or the inverse CDF; draws.py)
    filled = torch.where(unknown, drawn.reshape(batch, seq_len), sample)  # (B, N)
    if final:
        return filled, not_finite
    if halton is not None:
        confidence = halton
    else:
        chosen = probs.gather(-1, drawn[:, None]).reshape(batch, seq_len)  # (B, N)
        log_chosen = torch.where(unknown, torch.log(chosen.clamp(min=1e-20)), 0.0)
        confidence = log_chosen + temperature * _gumbel(uniform)  # (B, N)
    return _remask(filled, confidence, unknown, target, mask_token_id), not_finite


def _masked_rows(logits: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    """The logits function's answer as the rows of the masked positions, (M, V)."""
    count = int(unknown.sum())
    if logits.dim() == 2:
        if logits.shape[0] != count:
            raise ValueError(f"compact logits have {logits.shape[0]} rows for {count} masked positions")
        return logits
    batch, seq_len = unknown.shape
    if logits.dim() != 4 or logits.shape[0] != batch or logits.shape[2] * logits.shape[3] != seq_len:
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected (B, V, h, w) for {batch} grids of "
                         f"{seq_len} tokens, or ({count}, V) for the masked positions")
    return logits.permute(0, 2, 3, 1).reshape(batch, seq_len, -1)[unknown]


def _per_image(generators: Generators, batch: int) -> list[torch.Generator] | None:
    if generators is None or isinstance(generators, torch.Generator):
        return None
    generators = list(generators)
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for {batch} images: pass one per image, or a single one")
    return generators


def decode(
    tokens: torch.Tensor,
    logits_fn: LogitsFn,
    mask_token_id: int,
    num_steps: int,
    schedule: str = "cosine",
    temperature: float | Sequence[float] = (2.0, 0.0),
    generator: Generators = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    order: str = "confidence",
    static: bool = False,
    draws: str = "reference",
) -> torch.Tensor:
    """Fill every `mask_token_id` in `tokens` (B, h, w) over `num_steps` steps; returns the completed grid.

    Tokens that are not masked on entry are returned unchanged. `on_step(step, tokens)` sees the grid after each step
    and may return a grid to continue from instead. `order`: which drawn tokens each step keeps: "confidence" (the
    reference: the most probable, with annealed Gumbel noise) or "halton" (positions in a Halton order rolled by a
    random offset per image, see `orders.py`; the same counts per step, no confidence noise drawn). `draws`: how a
    token is drawn per masked position: "reference" (the reference's random stream, so its tokens for a seed) or
    "cdf" (one uniform per masked position, inverse CDF: the same distribution, far fewer random numbers; `draws.py`).

    `static=True`: every step on fixed shapes, without waiting for the device (`sampling_step`), for a compiled
    logits function and CUDA graphs. `logits_fn` must then return grid logits (B, V, h, w). The same tokens as the
    default for the same seed and logits: the same noise (`Draws.every_row`), the same arithmetic per masked row.
    The nan/inf check of the logits is not dropped but deferred: each step flags it on the device, and the flags are
    read once after the last step (a ValueError then, not at the step). Sync-free only where the generators live on
    the logits' device (a CPU generator's noise is copied over); `on_step` and `logits_fn` are the caller's.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1")
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {sorted(MASK_SCHEDULES)}")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {', '.join(ORDERS)}")
    temperatures = temperature_schedule(temperature, num_steps)
    batch, height, width = tokens.shape
    seq_len = height * width
    generators = _per_image(generator, batch)
    single = None if generators is not None else generator
    sample = tokens.reshape(batch, seq_len).clone()  # (B, N)
    start_ratio = (sample == mask_token_id).sum(dim=1).float() / seq_len  # (B,)
    draw = make_draws(draws, single, generators)
    if order == "halton":  # one random offset per image, drawn before the first step
        if generators is None:
            offsets = _randint(seq_len, batch, single, sample.device)
        else:
            offsets = torch.cat([_randint(seq_len, 1, g, sample.device) for g in generators])
        halton = -rolled_ranks(height, width, offsets).float()  # (B, N): earlier in the order = kept first
    if static:  # every step's count and temperature on the device before the loop, so no step creates a tensor
        targets = [masked_count(seq_len, start_ratio, step, num_steps, schedule).to(sample.device)
                   for step in range(num_steps - 1)]  # (B,) each
        step_temperatures = torch.tensor(temperatures, device=sample.device)  # (steps,) float32: the same values
        not_finite = torch.zeros((), dtype=torch.bool, device=sample.device)

    for step in range(num_steps):
        if static:
            final = step == num_steps - 1
            logits = _grid_logits(logits_fn(sample.reshape(batch, height, width), step), batch, seq_len)
            exponential = draw.every_row(batch * seq_len, logits.shape[1], sample.device)  # (B*N, V)
            uniform = None
            if not final and order == "confidence":
                uniform = _confidence_noise(batch, seq_len, single, generators, sample.device)  # (B, N)
            sample, flag = sampling_step(
                sample, logits, exponential, mask_token_id, final,
                target=None if final else targets[step],
                uniform=uniform,
                temperature=step_temperatures[step],
                halton=halton if order == "halton" else None,
            )
            not_finite |= flag
        else:  # the masked rows only: counting them waits for the device
            unknown = sample == mask_token_id  # (B, N)
            logits = logits_fn(sample.reshape(batch, height, width), step)  # (B, V, h, w) or (M, V)
            probs = _masked_rows(logits, unknown).float().softmax(dim=-1)  # (M, V): only masked tokens are drawn
            if probs.numel() and bool(probs[:, 0].isnan().any()):  # softmax spreads a nan or inf logit over its row
                raise ValueError(f"step {step}: the logits contain nan or inf; the model's output is not usable")
            drawn = draw(probs, unknown)  # (M,)
            filled = sample.masked_scatter(unknown, drawn)  # (B, N)
            if step == num_steps - 1:
                sample = filled
            else:
                target = masked_count(seq_len, start_ratio, step, num_steps, schedule).to(sample.device)  # (B,)
                if order == "halton":
                    confidence = halton
                else:
                    confidence = _confidence(probs, drawn, unknown, temperatures[step], single, generators)
                sample = _remask(filled, confidence, unknown, target, mask_token_id)
        if on_step is not None:
            replaced = on_step(step, sample.reshape(batch, height, width))
            if replaced is not None:
                sample = replaced.reshape(batch, seq_len).to(sample)
    if static and bool(not_finite):  # the one wait of the static path, after the loop
        raise ValueError("the logits contain nan or inf at a masked position; the model's output is not usable")
    return sample.reshape(batch, height, width)


def _grid_logits(logits: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Refuse anything but grid logits (B, V, h, w) on the static path (compact rows have a data-dependent shape)."""
    if logits.dim() != 4 or logits.shape[0] != batch or logits.shape[2] * logits.shape[3] != seq_len:
        raise ValueError(f"static=True needs grid logits (B, V, h, w) for {batch} grids of {seq_len} tokens; got "
                         f"shape {tuple(logits.shape)} (compact rows have a data-dependent shape: use static=False)")
    return logits
