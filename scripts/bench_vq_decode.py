"""Time and peak memory of the VQ decode as diffusers' `VQModel` runs it (channels-last) against the decoder
`MeissonicPipeline` sets up (`meissonic.vq.speed_up_decoding`: folded upsamplers, in-place resnets).

Each variant runs in a fresh process per round (its peak resident set size is its own), rounds interleaved with the
order alternating; a process decodes once untimed, then times --decodes decodes and reports their median. Usage:

    python scripts/bench_vq_decode.py                                   # the demo's tokenizer, 128 px
    python scripts/bench_vq_decode.py --preset meissonic --resolution 512 --decodes 1 --rounds 2   # released, random
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("plain", "fast")


def measure(model: str | None, preset: str | None, resolution: int, decodes: int, variant: str) -> dict:
    import torch
    from diffusers import VQModel

    from meissonic.loading import demo_model_folder
    from meissonic.presets import get_preset, seeded_init
    from meissonic.vq import decode_tokens, downscale_factor, speed_up_decoding

    if preset is not None:
        with seeded_init(0):
            vqvae = VQModel(**get_preset(preset).vqvae).eval()
    else:
        folder = demo_model_folder() if model == "demo" else model
        vqvae = VQModel.from_pretrained(f"{folder}/vqvae", torch_dtype=torch.float32).eval()
    if variant == "fast":
        speed_up_decoding(vqvae)  # channels-last too
    else:
        vqvae.to(memory_format=torch.channels_last)
    grid = resolution // downscale_factor(vqvae)
    ids = torch.randint(0, vqvae.config.num_vq_embeddings, (1, grid, grid), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    decode_tokens(vqvae, ids)  # untimed: oneDNN builds its kernels; the peak of one decode
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(decodes):
        start = time.perf_counter()
        decode_tokens(vqvae, ids)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "decode_peak_mib": peak - before, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a pipeline folder, or demo (its trained tokenizer)")
    parser.add_argument("--preset", help="a named architecture with random weights instead (e.g. meissonic)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--decodes", type=int, default=50, help="timed decodes a process (the median is reported)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.preset, args.resolution, args.decodes, args.child)))
        return
    name = f"{args.preset} (random weights)" if args.preset else args.model
    print(f"VQ decode, {name}, {args.resolution} px, fp32, CPU; {args.rounds} rounds, each variant in its own process")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            child = [sys.executable, __file__, "--child", variant, "--resolution", str(args.resolution),
                     "--decodes", str(args.decodes), "--model", args.model]
            child += ["--preset", args.preset] if args.preset else []
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    ratios = [f["seconds"] / p["seconds"] for p, f in zip(results["plain"], results["fast"])]
    for variant in VARIANTS:
        runs = results[variant]
        ms = statistics.median(r["seconds"] for r in runs) * 1e3
        peak = max(r["decode_peak_mib"] for r in runs)
        print(f"  {variant:>5}: {ms:9.1f} ms a decode (median of rounds), decode peak +{peak:.0f} MiB")
    print(f"  fast / plain: {statistics.median(ratios):.3f} (per round {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
