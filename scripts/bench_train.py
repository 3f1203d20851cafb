"""Training speed of `meissonic train` or `train-vq` in each mixed precision, on a preset's architecture, in one run.

Each precision trains a fresh model of the preset for a few steps on a small generated shapes set (the real command,
in a subprocess, with the demo recipe's options) and reports the median samples per second of the steps after the
first few, from the run's metrics.jsonl. Compare the ratios, which hold on a noisy machine, not the absolute figures.
Usage:

    python scripts/bench_train.py                                  # demo preset, batch 32, 128 px: no vs bf16
    python scripts/bench_train.py --stage vq                       # the tokenizer (train-vq), 64-pixel crops
    python scripts/bench_train.py --preset tiny --batch-size 8 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = [sys.executable, "-m", "meissonic"]


def quiet(command: list[str]) -> None:
    """Run a meissonic command, showing its output only when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[2:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def run_precision(work: Path, data: Path, args, precision: str) -> dict:
    out = work / f"{args.stage}-{precision}"
    common = ["--data", str(data), "--out", str(out), "--preset", args.preset, "--resolution", str(args.resolution),
              "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--learning-rate", "1e-3",
              "--mixed-precision", precision, "--log-every", "1", "--checkpoint-every", str(args.steps)]
    if args.stage == "transformer":  # the demo recipe's options: text encoder trained, EMA, token cache
        quiet(CLI + ["train", *common, "--train-text-encoder", "--cache", str(work / "cache"), "--ema-decay", "0.999"])
    else:  # the demo recipe's tokenizer options: 64-pixel crops, EMA codebook
        quiet(CLI + ["train-vq", *common, "--crop-size", str(args.crop_size), "--codebook-ema", "0.99"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["step"] > args.warmup]
    median = statistics.median(rates)
    return {"precision": precision, "steps_timed": len(rates), "samples_per_s": median,
            "seconds_per_step": args.batch_size / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["transformer", "vq"], default="transformer",
                        help="time `meissonic train` (transformer and text encoder) or `meissonic train-vq`")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--crop-size", type=int, default=64, help="train-vq's crops (--stage vq)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="steps per precision (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16", "fp16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps}: must exceed --warmup {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.parquet"
        quiet(CLI + ["data", "shapes", "--num", str(max(args.batch_size * 2, 64)), "--seed", "0", "--out", str(data)])
        rows = [run_precision(work, data, args, p) for p in args.precisions]
    base = rows[0]["samples_per_s"]
    what = "text encoder trained" if args.stage == "transformer" else f"tokenizer, {args.crop_size}-pixel crops"
    print(f"{args.preset} {args.stage}, batch {args.batch_size}, {args.resolution} px, {what}, "
          f"median of {rows[0]['steps_timed']} steps")
    print(f"{'precision':>9} {'samples/s':>9} {'s/step':>7} {'vs ' + args.precisions[0]:>8}")
    for r in rows:
        print(f"{r['precision']:>9} {r['samples_per_s']:9.1f} {r['seconds_per_step']:7.3f} "
              f"{r['samples_per_s'] / base:7.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
