"""Categorical draws for the masked rows of a grid (meissonic.draws): torch.multinomial's tokens and random stream over
the whole grid, by the fast CPU path and by the plain one."""

import pytest
import torch

from meissonic import draws
from meissonic.draws import CdfDraws, Draws, fast_cpu_stream, make_draws, pick


def _case(seed, rows=600, codes=50, batch=1):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(batch * rows, codes, generator=gen).mul(2).softmax(-1)
    masked = torch.rand(batch, rows, generator=gen) < 0.7
    masked[0, :CHUNK_EDGE] = True  # a whole first chunk masked, the next partly: both chunk paths run
    return probs, masked


CHUNK_EDGE = 64


def test_this_torch_build_takes_the_fast_cpu_path():
    """torch 2.13 (the pinned one) draws exponentials as -log1p(-u) from uniform doubles: the fast path is on. If a
    torch build changes that, the plain exponential_ takes over (still right; only slower) and this test says so."""
    assert fast_cpu_stream(), "this torch build's exponential_ is not -log1p(-uniform double): the fast path is off"


@pytest.mark.exact
@pytest.mark.parametrize("fast", [True, False])
def test_masked_rows_get_the_tokens_of_a_multinomial_over_every_row_and_the_stream_moves_alike(fast, monkeypatch):
    """Bit for bit: the same random bits, the same float32 exponentials (checked over 134 M values on the default,
    AVX2 and AVX-512 kernels), the same division and argmax per row."""
    monkeypatch.setattr(draws, "CHUNK_ROWS", CHUNK_EDGE)
    monkeypatch.setattr(draws, "fast_cpu_stream", lambda: fast)
    for seed in range(3):
        probs, masked = _case(seed)
        reference = torch.Generator().manual_seed(seed + 10)
        expected = torch.multinomial(probs, 1, generator=reference)[:, 0][masked.flatten()]
        ours = torch.Generator().manual_seed(seed + 10)
        drawn = Draws(ours, None)(probs[masked.flatten()], masked)
        assert torch.equal(drawn, expected)
        assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=reference))  # same place after


@pytest.mark.exact
def test_one_generator_per_image_draws_each_image_from_its_own_stream(monkeypatch):
    monkeypatch.setattr(draws, "CHUNK_ROWS", CHUNK_EDGE)
    probs, masked = _case(4, rows=200, batch=2)
    seeds = (7, 8)
    expected = torch.cat([torch.multinomial(probs[b * 200:(b + 1) * 200], 1, generator=torch.Generator().manual_seed(s))
                          [:, 0][masked[b]] for b, s in enumerate(seeds)])
    drawn = Draws(None, [torch.Generator().manual_seed(s) for s in seeds])(probs[masked.flatten()], masked)
    assert torch.equal(drawn, expected)


def test_the_fast_path_skips_the_logarithm_of_known_rows_and_keeps_memory_bounded(monkeypatch):
    """Only masked rows go through the logarithm, and the doubles drawn at a time are CHUNK_ROWS rows, not the grid."""
    monkeypatch.setattr(draws, "CHUNK_ROWS", CHUNK_EDGE)
    seen = []
    transform = draws._log_transform
    monkeypatch.setattr(draws, "_log_transform", lambda u: seen.append(u.shape) or transform(u))
    probs, masked = _case(5)
    Draws(torch.Generator().manual_seed(0), None)(probs[masked.flatten()], masked)
    assert sum(shape[0] for shape in seen) == int(masked.sum())
    assert max(shape[0] for shape in seen) <= CHUNK_EDGE


@pytest.mark.parametrize("fast", [True, False])
def test_an_image_without_masked_rows_draws_no_token_but_moves_its_stream(fast, monkeypatch):
    """As the reference's multinomial over every row: the generator moves by the whole grid's draws anyway."""
    monkeypatch.setattr(draws, "fast_cpu_stream", lambda: fast)
    ours, reference = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    drawn = Draws(ours, None)(torch.zeros(0, 5), torch.zeros(1, 8, dtype=torch.bool))
    torch.multinomial(torch.full((8, 5), 0.2), 1, generator=reference)
    assert drawn.shape == (0,) and drawn.dtype == torch.long
    assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=reference))


def test_the_inverse_cdf_picks_the_token_whose_interval_holds_the_uniform():
    probs = torch.tensor([[0.125, 0.25, 0.0, 0.625]]).expand(6, -1)  # sums exact in binary
    uniform = torch.tensor([[0.0], [0.1249], [0.125], [0.3749], [0.375], [0.9999]], dtype=torch.float64)
    assert pick(probs, uniform).tolist() == [0, 0, 1, 1, 3, 3]  # [0, 1/8) -> 0, [1/8, 3/8) -> 1, none to token 2


def test_cdf_draws_follow_the_distribution_and_never_draw_an_impossible_token():
    """20,000 draws of a fixed distribution: each frequency within 0.015 of its probability (4 standard deviations
    at most; the seed fixes the draws, so this either always passes or never)."""
    probs = torch.tensor([0.05, 0.0, 0.25, 0.4, 0.0, 0.3])
    count = 20_000
    drawn = CdfDraws(torch.Generator().manual_seed(7), None)(probs.expand(count, -1), torch.ones(1, count, dtype=bool))
    frequency = torch.bincount(drawn, minlength=6).float() / count
    assert frequency[1] == 0 and frequency[4] == 0
    torch.testing.assert_close(frequency, probs, atol=0.015, rtol=0)


def test_cdf_draws_take_each_images_numbers_from_its_own_generator():
    probs, masked = _case(3, rows=40, batch=2)
    probs = probs[masked.flatten()]
    together = CdfDraws(None, [torch.Generator().manual_seed(s) for s in (1, 2)])(probs, masked)
    first = int(masked[0].sum())
    alone = [CdfDraws(torch.Generator().manual_seed(s), None)(part, masked[b:b + 1])
             for b, (s, part) in enumerate(zip((1, 2), (probs[:first], probs[first:])))]
    assert torch.equal(together, torch.cat(alone))


def test_make_draws_names_the_methods():
    assert isinstance(make_draws("reference", None, None), Draws)
    assert isinstance(make_draws("cdf", None, None), CdfDraws)
    with pytest.raises(ValueError, match="draws='gumbel' is not one of reference, cdf"):
        make_draws("gumbel", None, None)
