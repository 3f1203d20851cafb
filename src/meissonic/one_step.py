"""One-step generation with a Di[M]O student (arXiv 2503.15457, ICCV 2025), sampled the way its authors do.

A student is a Meissonic transformer distilled to map, in one pass and with no guidance batch, a grid of random
codebook ids with a fixed share masked to a whole image. Their sampling script (`generate_one_step`):

1. uniformly random ids in [0, codebook_size) per position;
2. exactly round(N * mask_ratio) positions masked per image, chosen by a random permutation (script default 0.6);
3. one transformer pass whose mask-rate condition is what the script actually passes: `long(mask_ratio) * 1000`,
   which is 0 for any ratio below 1 (the students were trained with it too); Gaussian noise mixed into the token
   embeddings right after the embedding layer, `p * noise + sqrt(1 - p^2) * embeddings` (script default p = 0.1);
4. temperature (default 1), optional top-k and top-p, then one categorical draw per position: every position's draw
   is the output, masked and known alike.

Here every random draw (ids, mask, noise, tokens) comes from the caller's generator for that image, so a seed gives
the same image whatever the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .draws import Draws

ONE_STEP = "one-step"  # what the UI and `bench` call sampling a student in one pass, beside the speed levels


@dataclass(frozen=True)
class OneStep:
    """How a student is sampled; the defaults are the published script's."""

    mask_ratio: float = 0.6  # share of the random initial ids replaced by the mask id
    embedding_noise: float = 0.1  # p in p * noise + sqrt(1 - p^2) * embeddings
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely codes (0: all)
    top_p: float = 0.0  # keep the most likely codes up to this probability mass (0: all)
    # the mask-rate condition handed to the model (which multiplies it by 1000), None: what the script passes,
    # long(mask_ratio) * 1000, so 0 for any ratio below 1
    timestep: float | None = None

    def __post_init__(self):
        if not 0 <= self.mask_ratio <= 1:
            raise ValueError(f"one-step mask_ratio={self.mask_ratio!r} must lie in [0, 1]")
        if not 0 <= self.embedding_noise < 1:
            raise ValueError(f"one-step embedding_noise={self.embedding_noise!r} must lie in [0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"one-step temperature={self.temperature!r} must be > 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"one-step top_k={self.top_k!r} must be a whole number >= 0 (0: no limit)")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"one-step top_p={self.top_p!r} must lie in [0, 1] (0: no limit)")

    @property
    def condition(self) -> float:
        return float(int(self.mask_ratio) * 1000) if self.timestep is None else float(self.timestep)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> OneStep:
        unknown = set(saved) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown one-step setting(s) {sorted(unknown)}")
        return cls(**saved)


def initial_tokens(generators: list[torch.Generator], grid: tuple[int, int], codebook_size: int, mask_id: int,
                   mask_ratio: float) -> torch.Tensor:
    """(B, h, w) random ids with exactly round(h * w * mask_ratio) (at least one) set to `mask_id` per image."""
    count = torch.tensor(grid[0] * grid[1] * mask_ratio).round().clamp(min=1)  # rounds half to even, as theirs
    grids = []
    for gen in generators:
        ids = torch.randint(0, codebook_size, grid, generator=gen, device=gen.device)
        order = torch.rand(grid[0] * grid[1], generator=gen, device=gen.device).argsort()  # a random permutation
        grids.append(torch.where((order < count.to(order.device)).reshape(grid), mask_id, ids))
    return torch.stack(grids)


def embedding_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal noise, image b from generator b."""
    return torch.stack([torch.randn(shape, generator=gen, device=gen.device) for gen in generators])


def student_inputs(plan: OneStep, generators: list[torch.Generator], grid: tuple[int, int], codebook_size: int,
                   mask_id: int, width: int, device) -> tuple[torch.Tensor, tuple[float, torch.Tensor] | None]:
    """What a student's pass takes besides the prompt: the initial ids (B, h, w) and the `embedding_noise` argument
    of `MeissonicTransformer.predict` ((p, noise (B, width, h, w)), or None at p = 0, where the published script skips
    the mix). Sampling (`MeissonicPipeline`) and distillation (`meissonic.training.distill`) both start here."""
    ids = initial_tokens(generators, grid, codebook_size, mask_id, plan.mask_ratio).to(device)
    if plan.embedding_noise <= 0:
        return ids, None
    return ids, (plan.embedding_noise, embedding_noise(generators, (width, *grid)).to(device))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """(..., V) logits with all but the top-k codes, then all beyond the top-p mass (the first code beyond it kept),
    set to -inf; in place."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = -float("inf")
    if top_p > 0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        beyond = torch.softmax(ordered, dim=-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()  # keep the code that crosses the threshold
        beyond[..., 0] = False
        logits[beyond.scatter(-1, order, beyond)] = -float("inf")
    return logits


def draw_tokens(logits: torch.Tensor, plan: OneStep, generators: list[torch.Generator]) -> torch.Tensor:
    """Logits (B, V, h, w) -> one categorical draw per position (B, h, w), image b from generator b."""
    batch, vocab, height, width = logits.shape
    rows = filter_logits(logits.float().permute(0, 2, 3, 1).reshape(batch, -1, vocab) / plan.temperature,
                         plan.top_k, plan.top_p)
    probs = torch.softmax(rows, dim=-1)  # (B, N, V)
    # torch.multinomial(probs[b], 1, generator=generators[b]) per image, token for token: the same exponential noise
    # and argmax(p / q), with `meissonic.draws`' vectorised noise (a 2.5x faster draw on the demo's grid)
    every = torch.ones(batch, height * width, dtype=torch.bool, device=logits.device)
    return Draws(None, list(generators))(probs.reshape(-1, vocab), every).to(logits.device).reshape(batch, height, width)
