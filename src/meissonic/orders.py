"""Unmasking orders beside the sampler's default (the model's confidence): a Halton order, spread over the grid.

Halton-MaskGIT (Besnier et al., ICLR 2025, arXiv 2503.17076) unmasks positions in the order of a 2-D Halton sequence
(bases 2 and 3) scaled to the token grid, each cell taken at its first visit, the sequence rolled by a random offset
per image: each step's new tokens lie far apart, which suits few steps. No retraining is needed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

ORDERS = ("confidence", "halton")


def _radical_inverse(index: np.ndarray, base: int) -> np.ndarray:
    """Van der Corput: the digits of `index` in `base`, mirrored behind the point (index 1 in base 2 -> 0.5)."""
    result, scale, index = np.zeros(index.shape), 1.0 / base, index.copy()
    while index.any():
        result += scale * (index % base)
        index //= base
        scale /= base
    return result


@functools.lru_cache(maxsize=32)
def _halton_cells(height: int, width: int) -> tuple[int, ...]:
    cells = height * width
    points = np.arange(1, 8 * cells + 1)
    rows = np.minimum((_radical_inverse(points, 3) * height).astype(np.int64), height - 1)
    cols = np.minimum((_radical_inverse(points, 2) * width).astype(np.int64), width - 1)
    flat = rows * width + cols
    _, first = np.unique(flat, return_index=True)
    visited = flat[np.sort(first)]  # each cell at its first visit, in the sequence's order
    missing = np.setdiff1d(np.arange(cells), visited)  # none in practice; kept in raster order if any
    return tuple(np.concatenate([visited, missing]).tolist())


def halton_ranks(height: int, width: int) -> torch.Tensor:
    """(height * width,) long: each position's place in the Halton order (0 = unmasked first)."""
    order = torch.tensor(_halton_cells(height, width))
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def rolled_ranks(height: int, width: int, offsets: torch.Tensor) -> torch.Tensor:
    """(B, N): the Halton ranks rolled by one offset per image (the order starts at another point of the sequence)."""
    cells = height * width
    return (halton_ranks(height, width).to(offsets.device)[None] + offsets[:, None]) % cells
