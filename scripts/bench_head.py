"""The masked-only output head against the full one: the head alone at several shares of positions asked for, one
transformer call (plain, `logits_for=`, `cache=`, both) at the issue's mid-size setting, and the sampler alone (8 steps
on fixed logits: the reference scheduler's multinomial over the whole grid, ours with torch's `exponential_`, ours).
Compare the rows of one run.

    python scripts/bench_head.py                       # width 1024, 8192 codes, 2 x 64 x 64 positions, fp32
    python scripts/bench_head.py --no-call --no-sampler --width 64 --codes 128 --grid 8 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best(fn, repeat: int) -> float:
    """Fastest of `repeat` timed runs after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def head_rows(args, generator: torch.Generator) -> list[dict]:
    """For each share: the full head and the masked-only one timed in alternation (each the fastest of `repeat`), so
    that both see the same machine; `speedup` is full / masked-only."""
    from meissonic.layers import TokenHead

    head = TokenHead(args.width, args.codes, 1e-6).eval().to(DTYPES[args.dtype])
    x = torch.randn(args.batch, args.width, args.grid, args.grid, generator=generator).to(DTYPES[args.dtype])
    rows = []
    for share in args.shares:
        where = torch.rand(args.batch, args.grid, args.grid, generator=generator) < share
        where.view(-1)[0] = True  # at least one position asked for
        full, part = [], []
        for _ in range(args.repeat):
            full.append(best(lambda: head(x), 1))
            part.append(best(lambda: head(x, where), 1))
        rows.append({"what": "head", "share": share, "path": "masked-only", "seconds": min(part),
                     "full_seconds": min(full), "speedup": min(full) / min(part)})
    return rows


def call_rows(args, generator: torch.Generator) -> list[dict]:
    from meissonic.presets import get_preset
    from meissonic.transformer import ConditionCache, MeissonicTransformer

    config = {**get_preset("meissonic").transformer, "num_layers": 2, "num_single_layers": 4}
    with torch.device("meta"):
        model = MeissonicTransformer(**config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.normal_(0, 0.02, generator=generator)
    model, dtype = model.to(DTYPES[args.dtype]), DTYPES[args.dtype]
    cfg = model.config
    ids = torch.randint(0, cfg.codebook_size, (2, 64, 64), generator=generator)
    masked = torch.rand(2, 64, 64, generator=generator) < 0.6  # the logits_for rows come compact, (M, V)
    ids[masked] = model.mask_token_id
    kw = dict(hidden_states=ids,
              encoder_hidden_states=torch.randn(2, 77, cfg.joint_attention_dim, generator=generator).to(dtype),
              pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=generator).to(dtype),
              micro_conds=torch.tensor([[1024.0, 1024, 0, 0, 6]]).expand(2, -1), timestep=torch.tensor([0.6]))
    cache = ConditionCache()
    calls = {"plain": {}, "logits_for": {"logits_for": masked}, "cache": {"cache": cache},
             "cache+logits_for": {"cache": cache, "logits_for": masked}}
    return [{"what": "call", "share": 0.6, "path": name, "seconds": best(lambda: model(**kw, **extra), args.repeat)}
            for name, extra in calls.items()]


def multinomial_over_the_grid(tokens, logits_fn, steps, generator, mask_id):
    """The reference scheduler's step, written out: float32 softmax over every position and code, torch.multinomial
    over every row, confidence over the whole grid."""
    from meissonic.sampler import masked_count, temperature_schedule

    temperatures = temperature_schedule((2.0, 0.0), steps)
    batch, n = tokens.shape[0], tokens[0].numel()
    sample = tokens.reshape(batch, n).clone()
    start = (sample == mask_id).sum(1).float() / n
    for step in range(steps):
        unknown = sample == mask_id
        probs = logits_fn(sample.reshape(tokens.shape), step).permute(0, 2, 3, 1).reshape(batch, n, -1).softmax(-1)
        drawn = torch.multinomial(probs.reshape(batch * n, -1), 1, generator=generator).reshape(batch, n)
        filled = torch.where(unknown, drawn, sample)
        if step == steps - 1:
            return filled.reshape(tokens.shape)
        count = torch.minimum(unknown.sum(1) - 1, masked_count(n, start, step, steps, "cosine").long()).clamp(min=1)
        noise = torch.zeros(batch, n).uniform_(0, 1, generator=generator)
        gumbel = -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))
        chosen = probs.gather(-1, filled[..., None])[..., 0]
        confidence = torch.where(unknown, torch.log(chosen.clamp(min=1e-20)) + temperatures[step] * gumbel, torch.inf)
        ranked = torch.cat([confidence.sort(-1).values, torch.full((batch, 1), torch.inf)], 1)
        sample = torch.where(confidence < ranked.gather(1, count[:, None]), mask_id, filled)


def sampler_rows(args, generator: torch.Generator) -> list[dict]:
    """8 steps of one image on fixed logits (random, one set for all steps): the time of the sampler alone."""
    from meissonic import draws
    from meissonic.sampler import decode

    mask_id, steps = args.codes, 8
    logits = torch.randn(1, args.grid, args.grid, args.codes, generator=generator).mul(3)  # positions-major, as ours
    tokens = torch.full((1, args.grid, args.grid), mask_id)
    grid = lambda t, s: logits.permute(0, 3, 1, 2)  # noqa: E731  (B, V, h, w), for the reference's step
    rows_only = lambda t, s: logits[t == mask_id]  # noqa: E731  (M, V), as our pipeline hands them over
    runs = {"multinomial over the grid": lambda: multinomial_over_the_grid(tokens, grid, steps, seeded(), mask_id),
            "ours, torch's exponential_": lambda: plain(),
            "ours": lambda: decode(tokens, rows_only, mask_id, steps, generator=seeded())}

    def seeded():
        return torch.Generator().manual_seed(args.seed)

    def plain():
        fast, draws.fast_cpu_stream = draws.fast_cpu_stream, lambda: False
        try:
            return decode(tokens, rows_only, mask_id, steps, generator=seeded())
        finally:
            draws.fast_cpu_stream = fast

    outputs = {name: run() for name, run in runs.items()}
    same = all(torch.equal(out, outputs["ours"]) for out in outputs.values())
    return [{"what": "sampler", "share": 1.0, "path": name, "seconds": best(run, args.repeat), "same_tokens": same}
            for name, run in runs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--codes", type=int, default=8192)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.2, 0.6, 0.8, 0.9, 1.0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-call", action="store_true", help="the head alone, not the mid-size transformer call")
    parser.add_argument("--no-sampler", action="store_true", help="not the sampler rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str)
    args = parser.parse_args()
    bad = [s for s in args.shares if not 0 < s <= 1]
    if bad or args.repeat < 1:
        parser.error(f"--shares {bad[0]}: must lie in (0, 1]" if bad else f"--repeat {args.repeat}: must be >= 1")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rows = head_rows(args, generator) + ([] if args.no_call else call_rows(args, generator))
        rows += [] if args.no_sampler else sampler_rows(args, generator)
    print(f"head: width {args.width}, {args.codes} codes, {args.batch} x {args.grid} x {args.grid} positions, "
          f"{args.dtype}, {torch.get_num_threads()} threads, best of {args.repeat}")
    for r in rows:
        if r["what"] == "sampler":
            print(f"sampler, 8 steps: {r['path']:<27} {r['seconds']:8.3f} s  same tokens: {r['same_tokens']}")
            continue
        ratio = f"full {r['full_seconds']:.3f} s: {r['speedup']:.2f}x the full head" if r["what"] == "head" else ""
        print(f"{r['what']:<5} {r['path']:<17} share {r['share']:.2f} {r['seconds']:8.3f} s  {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
