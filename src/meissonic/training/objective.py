"""The masked-token objective of Meissonic (arXiv 2410.08261, after MaskGIT/Muse), as small pure functions.

Per sample: a mask ratio r = cos(pi/2 * u), u ~ U(0, 1), floored at `min_ratio`; round(r * N) tokens (at least one)
are replaced by the mask id; cross-entropy is taken on those tokens only. The mask-rate condition given to the model
is what the sampler will give it for a grid masked that much (see `mask_rate_timestep`), so training and sampling
share one convention, read from the model config. Condition dropout really drops: a dropped sample gets the empty
prompt's embeddings (the reference's dropout keeps the prompt with probability p and is then overwritten).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def sample_mask_ratios(batch: int, generator: torch.Generator, min_ratio: float = 0.0,
                       power: float = 1.0) -> torch.Tensor:
    """(B,) mask ratios cos(pi/2 * u**power), u ~ U(0, 1), at least `min_ratio`.

    power 1 is the paper's cosine schedule; power > 1 trains more often near full masking, where only the prompt
    decides what the first sampling steps draw (power 2: 45% of samples above 95% masked instead of 20%)."""
    u = torch.rand(batch, generator=generator)
    return torch.cos(u.pow(power) * math.pi / 2).clamp(min=min_ratio, max=1.0)


def mask_tokens(tokens: torch.Tensor, ratios: torch.Tensor, mask_token_id: int, generator: torch.Generator):
    """Mask round(ratio * N) random tokens per sample (>= 1). tokens (B, h, w) -> (inputs, labels, masked share)."""
    batch = tokens.shape[0]
    flat = tokens.reshape(batch, -1)  # (B, N)
    n = flat.shape[1]
    counts = (ratios * n).round().clamp(min=1, max=n).long()  # (B,)
    ranks = torch.rand(flat.shape, generator=generator).argsort(dim=1).argsort(dim=1).to(flat.device)  # (B, N)
    masked = ranks < counts.to(flat.device)[:, None]  # exactly counts[b] positions per row
    inputs = torch.where(masked, mask_token_id, flat).reshape(tokens.shape)
    labels = torch.where(masked, flat, IGNORE).reshape(tokens.shape)
    return inputs, labels, counts.float() / n


def mask_rate_timestep(share: torch.Tensor, convention: str, steps: int) -> torch.Tensor:
    """The `timestep` the sampler passes for an input with this masked share (B,).

    "mask_rate": the share itself. "step_index" (released checkpoints): the remaining step index of a `steps`-step
    cosine sampling whose input is masked that much, so fine-tuning a released model keeps its inference convention.
    """
    if convention == "mask_rate":
        return share
    progress = torch.acos(share.clamp(0, 1)) * 2 / math.pi  # share = cos(pi/2 * i / steps) -> i / steps
    index = (progress * steps).round().clamp(0, steps - 1)
    return steps - 1 - index


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over masked tokens. logits (B, V, h, w) float; labels (B, h, w) with IGNORE elsewhere.

    Only the masked positions' rows are gathered (channels last, so each softmax reads contiguous memory) and
    promoted to float32: the same value as `cross_entropy(logits.float(), labels, ignore_index=IGNORE)`, cheaper."""
    taken = labels != IGNORE  # (B, h, w)
    rows = logits.permute(0, 2, 3, 1)[taken]  # (M, V)
    return F.cross_entropy(rows.float(), labels[taken], label_smoothing=label_smoothing)


def drop_conditions(hidden: torch.Tensor, pooled: torch.Tensor, empty_hidden: torch.Tensor,
                    empty_pooled: torch.Tensor, probability: float, generator: torch.Generator):
    """Replace each sample's text conditioning by the empty prompt's with `probability`; returns the drop mask too."""
    dropped = torch.rand(hidden.shape[0], generator=generator) < probability  # (B,)
    keep = (~dropped).to(hidden.device)
    hidden = torch.where(keep[:, None, None], hidden, empty_hidden.to(hidden.dtype).expand_as(hidden))
    pooled = torch.where(keep[:, None], pooled, empty_pooled.to(pooled.dtype).expand_as(pooled))
    return hidden, pooled, dropped
