"""Peak memory and time of decoding one image whole and in tiles, with the released Meissonic tokenizer architecture.

Random weights (the architecture is what costs memory); fp32 on CPU. Each configuration runs in a fresh subprocess so
that the peak resident set size (`ru_maxrss`) is its own. Usage:

    nice -n 19 python scripts/bench_vq_tiling.py                      # 1024 px (64x64 tokens): whole, tile 32, tile 16
    nice -n 19 python scripts/bench_vq_tiling.py --tokens 128 --tiles 32 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(preset: str, tokens: int, tile: int | None) -> dict:
    """Build the preset's tokenizer, decode one random (1, tokens, tokens) grid; peak RSS in MiB before and after."""
    import torch
    from diffusers import VQModel

    from meissonic.presets import get_preset, seeded_init
    from meissonic.vq import decode_tokens, tile_layout

    with seeded_init(0):
        vqvae = VQModel(**get_preset(preset).vqvae).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vqvae.config.num_vq_embeddings, (1, tokens, tokens), generator=generator)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    start = time.perf_counter()
    image = decode_tokens(vqvae, ids, tile=tile)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    layout = tile_layout(tokens, tile, tile // 4) if tile and tokens > tile else (tokens, [0])
    return {
        "tile": tile, "tiles": len(layout[1]) ** 2, "tile_tokens": layout[0], "shape": list(image.shape),
        "rss_before_mib": round(before), "peak_rss_mib": round(peak), "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="meissonic")
    parser.add_argument("--tokens", type=int, default=64, help="tokens a side (64: 1024 px with f=16)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[32, 16], help="tile sizes besides the whole decode")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one configuration
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None or args.whole:
        print(json.dumps(measure(args.preset, args.tokens, None if args.whole else args.one)))
        return
    print(f"{args.preset} tokenizer, {args.tokens}x{args.tokens} tokens, fp32, CPU")
    print(f"{'tile':>6} {'tiles':>5} {'tile tokens':>11} {'RSS before MiB':>14} {'peak RSS MiB':>12} {'seconds':>8}")
    for tile in [None, *args.tiles]:
        child = [sys.executable, __file__, "--preset", args.preset, "--tokens", str(args.tokens)]
        child += ["--whole"] if tile is None else ["--one", str(tile)]
        result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(
            f"{str(tile or 'whole'):>6} {result['tiles']:>5} {result['tile_tokens']:>11} "
            f"{result['rss_before_mib']:>14} {result['peak_rss_mib']:>12} {result['seconds']:>8}",
            flush=True,
        )


if __name__ == "__main__":
    main()
