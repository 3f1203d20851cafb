"""Properties of the pure MaskGIT sampler: known tokens kept, schedule followed, determinism, guidance."""

import math

import pytest
import torch

from meissonic.sampler import decode, guided_logits, masked_count, temperature_schedule

MASK = 10
VOCAB = 10


def random_logits(seed=0, scale=3.0):
    """A logits function that ignores its input: fixed random logits per call (deterministic per step)."""

    def fn(tokens, step):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        b, h, w = tokens.shape
        return scale * torch.randn(b, VOCAB, h, w, generator=g)

    return fn


def recording(fn, log):
    def wrapped(tokens, step):
        log.append(tokens.clone())
        return fn(tokens, step)

    return wrapped


def test_all_masked_becomes_all_filled():
    tokens = torch.full((2, 6, 5), MASK)
    out = decode(tokens, random_logits(), MASK, 8, generator=torch.Generator().manual_seed(0))
    assert out.shape == tokens.shape
    assert (out != MASK).all() and (out < VOCAB).all()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 4, 12])
def test_masked_count_follows_schedule(schedule, steps):
    tokens = torch.full((1, 8, 8), MASK)
    seen = []
    decode(tokens, recording(random_logits(), seen), MASK, steps, schedule=schedule,
           generator=torch.Generator().manual_seed(1))
    counts = [int((t == MASK).sum()) for t in seen]
    assert counts[0] == 64
    for i in range(1, steps):  # input of step i = what step i-1 left masked
        progress = torch.tensor(i / steps)  # float32, as the reference scheduler computes it
        share = torch.cos(progress * math.pi / 2) if schedule == "cosine" else 1 - progress
        expected = max(1, min(counts[i - 1] - 1, math.floor(64 * share)))
        assert counts[i] == expected, (i, counts)


def test_masked_count_matches_reference_formula():
    # floor(4096 * cos(pi/2 * (i+1)/64)) for the first steps of a 64-step 1024 px run: 2, 3, 7, 8, 11 unmasked
    counts = [int(masked_count(4096, torch.tensor([1.0]), i, 64, "cosine")) for i in range(5)]
    assert [4096 - counts[0]] + [counts[i] - counts[i + 1] for i in range(4)] == [2, 3, 7, 8, 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_known_tokens_never_change(dtype):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 8, 8), generator=g)
    known = torch.rand(2, 8, 8, generator=g) < 0.5
    tokens[~known] = MASK
    seen = []

    def logits(t, step):  # confident wrong guesses everywhere, in low precision: known tokens must still survive
        return (random_logits(step, scale=30.0)(t, step)).to(dtype)

    out = decode(tokens, recording(logits, seen), MASK, 6, temperature=(5.0, 1.0), generator=g)
    assert torch.equal(out[known], tokens[known])
    for grid in seen:  # at every step, the originally known tokens are in place
        assert torch.equal(grid[known], tokens[known])


def test_partial_grid_schedule_counts_from_unknown_tokens():
    tokens = torch.zeros(1, 8, 8, dtype=torch.long)
    tokens[0, :4] = MASK  # 32 unknown
    seen = []
    decode(tokens, recording(random_logits(), seen), MASK, 4, generator=torch.Generator().manual_seed(0))
    assert [int((t == MASK).sum()) for t in seen] == [32, math.floor(32 * math.cos(math.pi / 8)),
                                                       math.floor(32 * math.cos(math.pi / 4)),
                                                       math.floor(32 * math.cos(3 * math.pi / 8))]


@pytest.mark.exact
def test_same_generator_seed_same_result_and_different_seed_differs():
    tokens = torch.full((2, 8, 8), MASK)
    run = lambda seed: decode(tokens, random_logits(), MASK, 6, generator=torch.Generator().manual_seed(seed))  # noqa
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.exact
def test_one_generator_per_image_makes_images_independent_of_batch():
    def logits(tokens, step):  # per-image deterministic logits, independent of batch position
        return torch.stack([random_logits(int(t.sum()) % 97)(t[None], step)[0] for t in tokens])

    alone = decode(torch.full((1, 6, 6), MASK), logits, MASK, 5, generator=[torch.Generator().manual_seed(11)])
    batch = decode(torch.full((3, 6, 6), MASK), logits, MASK, 5,
                   generator=[torch.Generator().manual_seed(s) for s in (7, 11, 13)])
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])


def test_wrong_number_of_generators_is_refused():
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        decode(torch.full((3, 4, 4), MASK), random_logits(), MASK, 2, generator=[torch.Generator()] * 2)


def test_peaked_logits_are_followed():
    target = torch.randint(0, VOCAB, (1, 5, 5), generator=torch.Generator().manual_seed(0))

    def logits(tokens, step):
        return 50.0 * torch.nn.functional.one_hot(target, VOCAB).permute(0, 3, 1, 2).float()

    out = decode(torch.full((1, 5, 5), MASK), logits, MASK, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, target)


def test_low_temperature_keeps_most_confident():
    """At temperature 0 the tokens kept after step 0 are exactly the most probable ones."""
    conf = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)

    def logits(tokens, step):  # token 0 always; its probability rises with position
        out = torch.zeros(1, VOCAB, 4, 4)
        out[:, 0] = conf
        return out

    seen = []
    decode(torch.full((1, 4, 4), MASK), recording(logits, seen), MASK, 2, temperature=(0.0, 0.0),
           generator=torch.Generator().manual_seed(0))
    kept = (seen[1] != MASK).flatten()
    n = int(kept.sum())
    assert n == 16 - math.floor(16 * math.cos(math.pi / 4))
    assert kept[-n:].all() and not kept[:-n].any()


def test_guided_logits_formula():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(guided_logits(u, c, 1.0), c)
    assert torch.equal(guided_logits(u, c, 9.0), u + 9 * (c - u))


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guidance_in_place_gives_the_same_values(dtype):
    """The pipeline guides in the conditional logits' memory: the same subtraction, product and sum, each rounded
    alike (a sum rounds the same in either order), so bit for bit the out-of-place values."""
    gen = torch.Generator().manual_seed(0)
    uncond, cond = (torch.randn(300, 64, generator=gen).mul(4).to(dtype) for _ in range(2))
    expected = guided_logits(uncond, cond, 9.0)
    out = guided_logits(uncond, cond, 9.0, overwrite=True)
    assert torch.equal(out, expected) and out.data_ptr() == cond.data_ptr()


def test_temperature_schedules():
    assert temperature_schedule((2, 0), 5) == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    assert temperature_schedule(3.0, 3) == pytest.approx([3.0, 1.505, 0.01])
    with pytest.raises(ValueError):
        temperature_schedule((1, 2, 3), 3)


@pytest.mark.parametrize("kw,match", [({"num_steps": 0}, "num_steps=0"), ({"schedule": "exp"}, "schedule='exp'")])
def test_bad_arguments(kw, match):
    args = dict(num_steps=2, schedule="cosine")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        decode(torch.full((1, 2, 2), MASK), random_logits(), MASK, **args)


def test_on_step_can_replace_the_grid():
    forced = torch.zeros(1, 4, 4, dtype=torch.long)

    def on_step(step, tokens):
        return forced if step == 0 else None

    seen = []
    out = decode(torch.full((1, 4, 4), MASK), recording(random_logits(), seen), MASK, 3, on_step=on_step,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[1], forced) and torch.equal(out, forced)


def compact(fn):
    """The same logits function answering with the masked positions' rows only, (M, V)."""

    def wrapped(tokens, step):
        return fn(tokens, step).permute(0, 2, 3, 1)[tokens == MASK]

    return wrapped


def multinomial_over_the_grid(tokens, logits_fn, steps, generator):
    """The reference scheduler's draw, written out once in scripts/bench_head.py (which times it against ours)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_head.py"
    spec = importlib.util.spec_from_file_location("bench_head", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.multinomial_over_the_grid(tokens, logits_fn, steps, generator, MASK)


@pytest.mark.exact
def test_masked_rows_only_draw_what_a_multinomial_over_the_whole_grid_draws():
    """The sampler divides and takes the argmax on the masked rows only, yet draws the exponentials of a multinomial
    over every row: the same random stream and tokens as the reference's multinomial over the whole grid, whether
    the logits come as a grid or compact. Bit for bit: the same softmax, division and argmax on the same rows."""
    tokens = torch.full((2, 6, 7), MASK)
    tokens[0, :2] = 3  # some known tokens, so that masked and known rows interleave
    expected = multinomial_over_the_grid(tokens, random_logits(4), 5, torch.Generator().manual_seed(9))
    for fn in (random_logits(4), compact(random_logits(4))):
        out = decode(tokens, fn, MASK, 5, generator=torch.Generator().manual_seed(9))
        assert torch.equal(out, expected)
    per_image = [decode(tokens, fn, MASK, 5, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
                 for fn in (random_logits(4), compact(random_logits(4)))]
    assert torch.equal(per_image[0], per_image[1]) and (per_image[0][0, :2] == 3).all()


@pytest.mark.parametrize("bad, match", [
    (lambda t, s: torch.zeros(3, VOCAB), "compact logits have 3 rows for 32 masked positions"),
    (lambda t, s: torch.zeros(1, VOCAB, 4, 4), r"logits of shape \(1, 10, 4, 4\)"),
    (lambda t, s: torch.full((2, VOCAB, 4, 4), float("nan")), "nan or inf"),
])
def test_logits_of_the_wrong_shape_or_not_finite_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        decode(torch.full((2, 4, 4), MASK), bad, MASK, 2, generator=torch.Generator().manual_seed(0))


def test_halton_ranks_are_a_permutation_spread_over_the_grid():
    from meissonic.orders import halton_ranks

    for height, width in ((8, 8), (5, 7), (64, 64)):
        ranks = halton_ranks(height, width)
        assert sorted(ranks.tolist()) == list(range(height * width))
    first = torch.argsort(halton_ranks(8, 8))[:16]  # a quarter of the grid: 3 to 5 in each quadrant (raster: 8, 8, 0, 0)
    quadrants = torch.bincount(torch.tensor([int(i) // 8 // 4 * 2 + int(i) % 8 // 4 for i in first]), minlength=4)
    assert quadrants.min() >= 3 and quadrants.max() <= 5


def test_halton_order_keeps_the_earliest_positions_of_each_images_rolled_order():
    """Each step keeps the drawn tokens at the unknown positions earliest in the image's rolled Halton order, as many
    as the schedule says; the roll is drawn from each image's own generator."""
    from meissonic.orders import rolled_ranks

    seen = []
    gens = [torch.Generator().manual_seed(s) for s in (3, 5)]
    decode(torch.full((2, 6, 6), MASK), recording(random_logits(1), seen), MASK, 4, generator=gens, order="halton")
    offsets = torch.cat([torch.randint(0, 36, (1,), generator=torch.Generator().manual_seed(s)) for s in (3, 5)])
    ranks = rolled_ranks(6, 6, offsets)
    assert not torch.equal(ranks[0], ranks[1])
    for step in range(1, 4):
        kept = (seen[step] != MASK).flatten(1)
        for b in range(2):
            count = int(kept[b].sum())
            assert count == 36 - masked_count(36, torch.tensor([1.0]), step - 1, 4, "cosine").long().item()
            assert set(torch.argsort(ranks[b])[:count].tolist()) == set(kept[b].nonzero()[:, 0].tolist())


def test_halton_order_keeps_known_tokens_and_refuses_unknown_orders():
    tokens = torch.full((1, 5, 5), MASK)
    tokens[0, 0] = 4
    out = decode(tokens, random_logits(), MASK, 3, generator=torch.Generator().manual_seed(0), order="halton")
    assert (out[0, 0] == 4).all() and (out != MASK).all()
    with pytest.raises(ValueError, match="order='random' is not one of confidence, halton"):
        decode(tokens, random_logits(), MASK, 3, order="random")


def test_arccos_schedule_is_halton_maskgits():
    from meissonic.sampler import arccos_schedule

    progress = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(arccos_schedule(progress), torch.tensor([1.0, 2 / 3, 0.0]))
