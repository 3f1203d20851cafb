"""Step caching: full transformer passes on refresh steps, partial passes in between (ML-Cache, LazyMAR, ReCAP).

Between two sampling steps only the tokens decoded in the last step change, so most of the network's work repeats.
On a refresh step the whole grid goes through the transformer and every attention layer's keys and values are kept
(`KVReuse`), with the logits of every masked position (and, when guiding, the difference cond - uncond). On the steps
between, only a subset of the positions runs: those whose token changed since their keys and values were computed
(their new token is the step's news), then the masked positions at both ends of the last max-logit ranking (the
least settled, ML-Cache's choice, and the most settled, which are decoded next). Every layer reads the other
positions' keys and values from the cache and writes the subset's fresh ones into it; logits of positions not
computed come from the logits cache; with `guidance="diff"` the unconditional branch is not run on those steps and
its logits are the conditional ones minus the stored difference (LazyMAR's guidance cache), so a guided partial step
costs one branch on the subset.

Every pass also needs each block's AdaLN modulation of the step's condition: one row of products over a quarter of
the weights, which costs as much as many rows. `ModulationCache` computes them for a window of upcoming steps at once.

With the 2x feature compression the subset is chosen on the compressed grid (each of its positions covers 2x2
tokens). The sampler stays pure: all of this lives behind its logits callback (`MeissonicPipeline.__call__` builds
one `StepCache` per generation); known tokens are never re-drawn, whatever the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import AdaLNZero, Modulations

GUIDANCE_ON_PARTIAL = ("diff", "both")


@dataclass(frozen=True)
class CachePlan:
    """When to refresh and how much a partial pass computes."""

    warmup: float = 0.3  # share of the steps at the start that all run full passes
    every: int = 4  # after the warm-up, a full pass every `every` steps, partial passes between
    share: float = 0.25  # share of the (block-grid) positions a partial pass runs through the blocks
    guidance: str = "diff"  # partial steps that guide: "diff" (one branch + the stored difference) or "both"

    def __post_init__(self):
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"cache warmup={self.warmup!r} must lie in [0, 1] (a share of the steps)")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"cache every={self.every!r} must be an integer >= 1 (steps between full passes)")
        if not 0 < self.share <= 1:
            raise ValueError(f"cache share={self.share!r} must lie in (0, 1] (a share of the positions)")
        if self.guidance not in GUIDANCE_ON_PARTIAL:
            raise ValueError(f"cache guidance={self.guidance!r} is not one of {', '.join(GUIDANCE_ON_PARTIAL)}")

    def full_steps(self, steps: int) -> list[bool]:
        """Which of `steps` steps are refresh steps (the first always is)."""
        warm = max(1, math.ceil(self.warmup * steps))
        return [step < warm or (step - warm) % self.every == 0 for step in range(steps)]

    def subset_size(self, positions: int) -> int:
        return max(1, min(positions, round(self.share * positions)))


class KVReuse:
    """Every attention layer's keys and values (B, H, L+N, d), recorded on a full pass; on a partial pass each layer
    writes the fresh keys and values of its queries (the subset of image positions) in place and reads everyone's
    (the text's as the full pass left them)."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.index: torch.Tensor | None = None  # (B, S) sequence positions of a partial pass's queries
        self.cursor = 0

    def full(self) -> None:
        self.layers, self.index, self.cursor = [], None, 0

    def partial(self, index: torch.Tensor) -> None:
        if not self.layers:
            raise RuntimeError("a partial pass needs the keys and values of a full pass first")
        self.index, self.cursor = index, 0

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is None:  # full pass: keep them
            self.layers.append((k, v))
            return k, v
        keys, values = self.layers[self.cursor]
        self.cursor += 1
        batch = k.shape[0]
        if batch > keys.shape[0]:
            raise RuntimeError(f"a partial pass of {batch} grids after a full pass of {keys.shape[0]}")
        keys, values = keys[-batch:], values[-batch:]  # a one-branch partial pass after a guided full pass: cond
        where = self.index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H, S, d)
        keys.scatter_(2, where, k.to(keys.dtype))
        values.scatter_(2, where, v.to(values.dtype))
        return keys, values

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for pair in self.layers for t in pair)


def covered_tokens(rows: torch.Tensor, block_cols: int, grid: tuple[int, int], compressed: bool) -> torch.Tensor:
    """Block-grid positions (B, S) -> the token positions they cover, flat in (h, w), (B, S) or (B, 4S) with the 2x
    compression (2x2 tokens each, in the order (0,0), (0,1), (1,0), (1,1)); -1 where an odd grid crops them."""
    if not compressed:
        return rows
    height, width = grid
    r, c = rows // block_cols, rows % block_cols  # (B, S)
    a = torch.tensor([0, 0, 1, 1], device=rows.device)
    b = torch.tensor([0, 1, 0, 1], device=rows.device)
    tok_r, tok_c = (2 * r[..., None] + a).flatten(1), (2 * c[..., None] + b).flatten(1)  # (B, 4S)
    return torch.where((tok_r < height) & (tok_c < width), tok_r * width + tok_c, -1)


class StepCache:
    """The caches of one generation and the choice of what a step computes."""

    def __init__(self, plan: CachePlan, steps: int, grid: tuple[int, int], block: tuple[int, int]):
        self.plan, self.full_at = plan, plan.full_steps(steps)
        self.grid, self.block = grid, block
        self.compressed = block != grid
        self.kv = KVReuse()
        self.logits: torch.Tensor | None = None  # (B * h * w, V): last logits of every position computed masked
        self.diff: torch.Tensor | None = None  # (B * h * w, V): cond - uncond at the last guided full pass
        self.known: torch.Tensor | None = None  # (B, h*w) bool: positions with a row in `logits`
        self.top: torch.Tensor | None = None  # (B, h*w): the maximum logit of each cached row
        self.seen: torch.Tensor | None = None  # (B, h*w): the tokens the cached keys/values were computed from
        self.guided: bool | None = None  # whether the last full pass was guided
        self.full_passes = 0
        self.partial_passes = 0

    def is_full(self, step: int, guided: bool, masked: torch.Tensor) -> bool:
        """Refresh now: on plan, when guidance starts or stops, or when a masked position has no cached logits."""
        if self.full_at[step] or self.logits is None or guided != self.guided:
            return True
        return bool((masked.flatten(1) & ~self.known).any())  # a callback re-masked tokens

    def store(self, tokens: torch.Tensor, masked: torch.Tensor, rows: torch.Tensor, diff: torch.Tensor | None) -> None:
        """After a full pass: `rows` (M, V) are the logits the sampler gets, `diff` (M, V) cond - uncond."""
        batch = tokens.shape[0]
        flat = masked.reshape(-1)
        if self.logits is None or self.logits.shape != (flat.numel(), rows.shape[1]) or self.logits.dtype != rows.dtype:
            self.logits = rows.new_zeros(flat.numel(), rows.shape[1])
        self.logits[flat] = rows
        if diff is None:
            self.diff = None
        else:  # kept between refreshes when the shape allows: a fresh buffer would fault its pages in again
            if self.diff is None or self.diff.shape != self.logits.shape or self.diff.dtype != diff.dtype:
                self.diff = diff.new_zeros(self.logits.shape)
            self.diff[flat] = diff
        self.known = masked.reshape(batch, -1).clone()
        self.top = torch.full(self.known.shape, math.inf, device=rows.device)
        self.top[self.known] = rows.max(-1).values.float()
        self.seen = tokens.reshape(batch, -1).clone()
        self.guided = diff is not None
        self.full_passes += 1

    def choose(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The block-grid positions a partial pass computes, (B, S): changed tokens first, then the masked ones at
        both ends of the max-logit ranking."""
        batch = tokens.shape[0]
        seq = masked.flatten(1)  # (B, N)
        n = seq.shape[1]
        changed = tokens.reshape(batch, -1) != self.seen  # (B, N)
        top = torch.where(seq, self.top, math.inf)  # decoded positions rank last
        ascending = top.argsort(dim=1).argsort(dim=1)  # (B, N): rank of each masked position's max logit
        masked_count = seq.sum(1, keepdim=True)
        from_end = (masked_count - 1 - ascending).clamp(min=0)  # rank from the most settled masked position
        priority = torch.where(seq, (n - torch.minimum(ascending, from_end)).float(), -1.0)
        priority = torch.where(changed, 2.0 * n, priority)  # (B, N)
        if self.compressed:
            priority = F.max_pool2d(priority.reshape(batch, 1, *self.grid), 2, ceil_mode=True).flatten(1)
        count = self.plan.subset_size(priority.shape[1])
        return priority.topk(count, dim=1).indices.sort(dim=1).values  # (B, S)

    def merge(self, tokens: torch.Tensor, masked: torch.Tensor, rows_chosen: torch.Tensor, positions: torch.Tensor,
              fresh: torch.Tensor) -> torch.Tensor:
        """After a partial pass: write the fresh logits (K, V) at `positions` (flat in (B, h*w)) and return the rows
        of every masked position (M, V) in the sampler's order."""
        batch = tokens.shape[0]
        self.logits[positions] = fresh.to(self.logits.dtype)
        self.top.view(-1)[positions] = fresh.max(-1).values.float()
        covered = covered_tokens(rows_chosen, self.block[1], self.grid, self.compressed)  # (B, S')
        inside = covered >= 0
        flat = (covered + torch.arange(batch, device=covered.device)[:, None] * self.seen.shape[1])[inside]
        self.seen.view(-1)[flat] = tokens.reshape(-1)[flat]
        self.partial_passes += 1
        return self.logits[masked.reshape(-1)]

    def nbytes(self) -> int:
        """Memory the caches hold now (keys and values, logits, difference)."""
        extra = sum(t.untyped_storage().nbytes() for t in (self.logits, self.diff) if t is not None)
        return self.kv.nbytes() + extra


class ModulationCache:
    """Every block's AdaLN modulation for the steps to come, computed a window of steps at a time.

    A modulation is a product of one row per image with a quarter of the transformer's weights, so a pass that
    computes only its own reads all those weights for a row each (about 25 ms a pass for the 1B in bf16 on a 2-core
    EPYC, as much as a tenth of a partial pass). `schedule` is the timestep each step is expected to pass (as the
    pipeline passes it); when a call's timestep is in it, the call and the next ones of the window (`ROWS` rows in
    all) are computed in one product per layer, and later calls look theirs up. A call whose timestep is not in the
    schedule (a callback changed the grid) gets its own computed: nothing is ever looked up for the wrong condition.
    The values are the per-call ones to rounding (a product over more rows may sum in another order).
    """

    ROWS = 64

    def __init__(self, schedule: list[torch.Tensor]):
        self.schedule = [tuple((torch.as_tensor(t).reshape(-1).float() * 1000).tolist()) for t in schedule]
        self.table: dict[tuple, Modulations] = {}
        self.products = 0  # windows computed (each reads every modulation weight once)

    def get(self, model: torch.nn.Module, timestep: torch.Tensor, conditions) -> Modulations:
        """The modulations of a call with `timestep` (R,) or (1,), already scaled by 1000 as the model does, and
        `conditions` (whose `pooled` has the call's R rows)."""
        values = tuple(timestep.tolist())
        key = (id(conditions), values)
        if key not in self.table:
            self._compute(model, values, conditions)
        return self.table.pop(key)

    def _compute(self, model: torch.nn.Module, values: tuple, conditions) -> None:
        rows = conditions.pooled.shape[0]
        expanded = [t * (len(values) // len(t)) if len(t) < len(values) else t for t in self.schedule]
        ahead = [values]
        if values in expanded:
            start = expanded.index(values) + 1
            ahead += [t for t in expanded[start:] if (id(conditions), t) not in self.table and t != values]
        ahead = list(dict.fromkeys(ahead))[:max(1, self.ROWS // rows)]
        dtype = conditions.pooled.dtype
        time = model.time_text_embed.time
        temb = torch.cat([time(torch.tensor(t, device=conditions.pooled.device), dtype) + conditions.pooled
                          for t in ahead])  # (K * R, D)
        layers = [m for m in model.modules() if isinstance(m, AdaLNZero)]
        computed = Modulations.compute(layers, temb)
        for k, t in enumerate(ahead):
            self.table[(id(conditions), t)] = computed.rows(slice(k * rows, (k + 1) * rows))
        self.products += 1
