"""What a partial pass (step caching) costs against a full pass, for several subset sizes, at one image size.

The step cache counts a partial pass by its share of the sequence a full pass runs (text + image positions). On a
CPU, a pass also streams every weight from memory whatever its row count, so a small subset costs more than its
share: this prints both, per batch (2: a guided full pass; 1: the one-branch passes between refreshes).

    python scripts/bench_partial.py --preset meissonic --resolution 512 --dtype bf16
    python scripts/bench_partial.py --preset tiny --resolution 256 --shares 0.25 --repeat 1 --json rows.json
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="meissonic", help="an architecture with random weights (meissonic.presets)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.15, 0.25, 0.5, 1.0],
                   help="subset sizes, as shares of the block-grid positions")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if any(not 0 < s <= 1 for s in args.shares):
        p.error(f"--shares {' '.join(map(str, args.shares))}: each must lie in (0, 1]")

    from meissonic.bench import random_pipeline
    from meissonic.step_cache import KVReuse
    from meissonic.transformer import ConditionCache

    dtype = DTYPES[args.dtype]
    pipe = random_pipeline(args.preset, dtype, torch.device("cpu"))
    model, config = pipe.transformer, pipe.transformer.config
    grid = (args.resolution // pipe.vae_scale_factor,) * 2
    block = model.block_grid(*grid)
    positions = block[0] * block[1]
    text = 77
    gen = torch.Generator().manual_seed(0)
    print(f"{args.preset} at {args.resolution} px, {args.dtype}: {positions} block positions + {text} text, "
          f"{torch.get_num_threads()} thread(s)")
    rows = []
    with torch.no_grad():
        for batch in (2, 1):
            ids = torch.full((batch, *grid), model.mask_token_id)
            inputs = dict(encoder_hidden_states=torch.randn(batch, text, config.joint_attention_dim, generator=gen)
                          .to(dtype), pooled_projections=torch.randn(batch, config.pooled_projection_dim,
                                                                     generator=gen).to(dtype),
                          micro_conds=torch.tensor([[args.resolution, args.resolution, 0, 0, 6.0]]).expand(batch, -1),
                          timestep=torch.tensor([0.5]), logits_for=ids == model.mask_token_id)
            kv, cache = KVReuse(), ConditionCache()
            full = best(lambda: model(ids, cache=cache, kv=kv, **inputs), args.repeat)
            print(f"batch {batch}: full pass {full:.3f} s")
            for share in args.shares:
                count = max(1, round(share * positions))
                chosen = torch.stack([torch.randperm(positions, generator=gen)[:count].sort().values
                                      for _ in range(batch)])
                seconds = best(lambda: model(ids, cache=cache, kv=kv, rows=chosen, **inputs), args.repeat)
                row = {"batch": batch, "subset": count, "counted": count / (positions + text),
                       "seconds": seconds, "full_seconds": full, "measured": seconds / full}
                rows.append(row)
                print(f"  {count:5d} positions: {seconds:.3f} s = {row['measured']:.2f} of a full pass; "
                      f"counted as {row['counted']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
