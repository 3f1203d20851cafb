"""Loading a transformer folder: seconds to load, seconds of the first forward pass, peak RSS, misaligned weights.

The folder is a preset's transformer with random weights saved in float32 (made once in --work), loaded in float32:
the case where diffusers keeps the file's memory map as the weights. Each row runs in its own process, in
alternating rounds; `copy` is the project's loader (weights copied into memory torch owns, each tensor's file pages
handed back, `loading.owned`), `map` leaves them in the memory map (the loader before), `copy-keep-pages` copies
without handing pages back. Compare rows of one run. Usage:

    python scripts/bench_load.py                          # the 1B architecture (4 GB of float32 weights)
    python scripts/bench_load.py --preset tiny --rounds 1 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("copy", "map", "copy-keep-pages")

MEASURE = """
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
import meissonic.loading as loading
mode, folder = sys.argv[1], sys.argv[2]
if mode == "map":
    loading.owned = lambda tensor, mappings=None: tensor
elif mode == "copy-keep-pages":
    loading._release_file_pages = lambda tensor, mappings: None
from meissonic.transformer import MeissonicTransformer
start = time.perf_counter()
model = MeissonicTransformer.from_pretrained(folder).eval()
loaded = time.perf_counter()
cfg, gen = model.config, torch.Generator().manual_seed(0)
with torch.no_grad():
    model(hidden_states=torch.randint(0, cfg.vocab_size, (1, 16, 16), generator=gen),
          encoder_hidden_states=torch.randn(1, 77, cfg.joint_attention_dim, generator=gen),
          pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
          micro_conds=torch.tensor([[256.0, 256, 0, 0, 6]]), timestep=torch.tensor([3]))
done = time.perf_counter()
print(json.dumps({"load_s": loaded - start, "first_forward_s": done - loaded, "total_s": done - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "misaligned": sum(p.data_ptr() % loading.ALIGNMENT != 0 for p in model.parameters())}))
"""


def make_folder(preset: str, folder: Path) -> None:
    """The preset's transformer, random weights, saved in float32 (skipped when the folder is there already)."""
    if (folder / "config.json").is_file():
        return
    import torch

    from meissonic.presets import get_preset
    from meissonic.transformer import MeissonicTransformer

    with torch.device("meta"):
        model = MeissonicTransformer(**get_preset(preset).transformer)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder)


def measure(mode: str, folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(folder)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="meissonic")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "meissonic-bench-load")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad or args.rounds < 1:
        parser.error(f"--modes {args.modes}: choose from {', '.join(MODES)}" if bad
                     else f"--rounds {args.rounds}: must be at least 1")
    folder = args.work / f"{args.preset}-fp32"
    make_folder(args.preset, folder)
    runs = {mode: [] for mode in modes}
    for round_ in range(args.rounds):  # alternate the order, so that no row always runs on a warmer page cache
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            runs[mode].append(measure(mode, folder))
    rows = [{"mode": mode, **{key: statistics.median(r[key] for r in got) for key in got[0]}, "rounds": len(got)}
            for mode, got in runs.items()]
    print(f"{args.preset} transformer, float32, {args.rounds} round(s), medians")
    print(f"{'mode':<16} {'load s':>7} {'1st fwd s':>9} {'total s':>8} {'peak RSS GB':>11} {'misaligned':>10}")
    for r in rows:
        print(f"{r['mode']:<16} {r['load_s']:>7.2f} {r['first_forward_s']:>9.2f} {r['total_s']:>8.2f} "
              f"{r['peak_rss_gb']:>11.2f} {int(r['misaligned']):>10}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
