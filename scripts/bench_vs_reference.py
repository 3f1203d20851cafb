"""Ours against the reference implementation (github viiika/Meissonic, its `src/`), end to end, on the same weights.

Both pipelines load one folder of random weights written in the released layout (a mid-size Meissonic by default:
2 double + 4 single blocks at width 1024 with the 2x feature compression and 8192 codes, a small f=16 VQ with 8192
codes, a 2-layer CLIP text encoder at width 1024) and make the same image: same prompt, negative prompt, size, steps,
guidance and seed. Each runs in its own process, loaded and warmed up once; images alternate between the two (ours
first in even rounds, the reference first in odd ones) so that a change in the machine's speed hits both. Printed per
image: seconds, the transformer's share (its calls timed one by one), the rest (text encoding, sampler, VQ decode),
and the ratio reference / ours (above 1: ours is faster), median and range over the rounds; and the share of tokens
both drew alike (the same weights and seed give the same tokens, up to near-ties that float rounding flips).

The reference is imported from a folder you name, never copied here, and runs in its own virtual environment: it
breaks on current diffusers. Set it up once:

    git clone https://github.com/viiika/Meissonic /opt/meissonic-ref
    python -m venv /opt/refenv
    /opt/refenv/bin/pip install torch==2.13.0 diffusers==0.37.1 transformers==5.24.0 accelerate safetensors

then:

    python scripts/bench_vs_reference.py --reference /opt/meissonic-ref --reference-python /opt/refenv/bin/python
    python scripts/bench_vs_reference.py ... --dtype bf16 --rounds 3 --json rows.json
    python scripts/bench_vs_reference.py ... --profile     # also torch.profiler's top operators for one image each
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("fp32", "bf16")
MARK = "@@bench "  # prefix of the lines a worker answers with (libraries may print other lines)
MID_SIZE = {"num_layers": 2, "num_single_layers": 4}  # the blocks of the mid-size transformer
SMALL_VQ = {"block_out_channels": [16, 32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8}  # f=16, 8192 codes
TEXT_LAYERS = 2


# --------------------------------------------------------------------------------------------------- the weights
def write_weights(folder: Path, seed: int, blocks: dict) -> None:
    """Random weights of the mid-size configuration, written by our pipeline in the released layout."""
    from dataclasses import replace

    from diffusers import VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from meissonic.presets import assemble_pipeline, get_preset, seeded_init
    from meissonic.transformer import MeissonicTransformer

    preset = get_preset("meissonic")
    preset = replace(preset, transformer={**preset.transformer, **blocks}, vqvae={**preset.vqvae, **SMALL_VQ},
                     text_encoder={**preset.text_encoder, "num_hidden_layers": TEXT_LAYERS})
    with seeded_init(seed):
        transformer = MeissonicTransformer(**preset.transformer)
        vqvae = VQModel(**preset.vqvae)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder))
    assemble_pipeline(preset, transformer, vqvae, text_encoder).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------- a worker
def load(kind: str, folder: Path, dtype, reference: str | None):
    if kind == "ours":
        from meissonic.pipeline import MeissonicPipeline

        return MeissonicPipeline.from_pretrained(folder, torch_dtype=dtype)
    sys.path.insert(0, reference)
    from diffusers import VQModel
    from src.pipeline import Pipeline
    from src.scheduler import Scheduler
    from src.transformer import Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    return Pipeline(
        VQModel.from_pretrained(folder / "vqvae", torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
        transformer=Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
        scheduler=Scheduler.from_pretrained(folder / "scheduler"),
    )


def worker(args) -> None:
    """Load one pipeline, warm it up, then make one image per `run` line read from stdin (`profile`: under
    torch.profiler; `quit`: stop), answering each with a JSON line."""
    import torch

    def say(**fields):
        print(MARK + json.dumps(fields), flush=True)

    start = time.perf_counter()
    pipe = load(args.worker, Path(args.folder), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype[0]],
                args.reference)
    pipe.set_progress_bar_config(disable=True)
    passes: list[float] = []
    forward = pipe.transformer.forward

    def timed(*a, **kw):
        begin = time.perf_counter()
        out = forward(*a, **kw)
        passes.append(time.perf_counter() - begin)
        return out

    pipe.transformer.forward = timed
    last: list = []

    def image(steps: int) -> dict:
        passes.clear()
        last.clear()
        begin = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.size, width=args.size,
                 num_inference_steps=steps, guidance_scale=args.guidance, output_type="np",
                 generator=torch.Generator().manual_seed(args.seed),
                 callback=lambda step, timestep, tokens: last.append(tokens.flatten().tolist()))
        return {"image": time.perf_counter() - begin, "passes": list(passes), "tokens": last[-1] if last else []}

    loaded = time.perf_counter() - start
    image(min(2, args.steps))  # warm-up: first-call costs (allocations, kernel choice) left out of the timings
    say(ready=True, load=loaded, threads=torch.get_num_threads(), versions={
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__})
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            say(**image(args.steps))
        elif command == "profile":
            from torch.profiler import profile

            with profile() as prof:
                image(args.steps)
            say(table=prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        elif command == "quit":
            return


# --------------------------------------------------------------------------------------------------- the driver
class Worker:
    def __init__(self, kind: str, python: str, args, folder: Path, dtype: str):
        command = [python, str(Path(__file__).resolve()), "--worker", kind, "--folder", str(folder), "--dtype", dtype,
                   "--reference", args.reference, "--size", str(args.size), "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--seed", str(args.seed), "--prompt", args.prompt,
                   "--negative-prompt", args.negative_prompt, "--profile-rows", str(args.profile_rows)]
        self.kind = kind
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        code = self.process.wait()
        raise SystemExit(f"error: the {self.kind} worker stopped (exit code {code}); see its output above")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def compare(args, folder: Path, dtype: str) -> dict:
    workers = {"ours": Worker("ours", sys.executable, args, folder, dtype),
               "reference": Worker("reference", args.reference_python, args, folder, dtype)}
    try:
        ready = {kind: w.answer() for kind, w in workers.items()}
        runs: dict[str, list[dict]] = {"ours": [], "reference": []}
        for round_ in range(args.rounds):
            for kind in (("ours", "reference") if round_ % 2 == 0 else ("reference", "ours")):
                runs[kind].append(workers[kind].ask("run"))
                print(f"  {dtype} round {round_ + 1} {kind:<9} {runs[kind][-1]['image']:.2f} s", flush=True)
        tables = {kind: w.ask("profile")["table"] for kind, w in workers.items()} if args.profile else {}
    finally:
        for w in workers.values():
            w.close()
    row = {"dtype": dtype, "size": args.size, "steps": args.steps, "guidance": args.guidance,
           "threads": ready["ours"]["threads"], "versions": {k: r["versions"] for k, r in ready.items()}}
    for kind, results in runs.items():
        row[kind] = {"image": [r["image"] for r in results],
                     "transformer": [sum(r["passes"]) for r in results],
                     "pass": [sum(r["passes"]) / len(r["passes"]) for r in results],
                     "rest": [r["image"] - sum(r["passes"]) for r in results]}
    row["ratio"] = {what: [ref / ours for ref, ours in zip(row["reference"][what], row["ours"][what])]
                    for what in ("image", "transformer", "pass", "rest")}
    tokens = [runs[kind][0]["tokens"] for kind in ("ours", "reference")]
    row["same_tokens"] = sum(a == b for a, b in zip(*tokens)) / max(len(tokens[0]), 1)
    row["profiles"] = tables
    return row


def report(row: dict) -> None:
    print(f"\n{row['dtype']}, {row['size']} px, {row['steps']} steps, guidance {row['guidance']}, "
          f"{row['threads']} threads: seconds per image, median (range) of {len(row['ours']['image'])} rounds")
    print(f"{'':<22}{'ours':>20}{'reference':>20}{'reference / ours':>24}")
    for what, name in (("image", "image"), ("transformer", "transformer calls"), ("pass", "one transformer call"),
                       ("rest", "rest (text, sampler, VQ)")):
        print(f"{name:<22}{spread(row['ours'][what]):>20}{spread(row['reference'][what]):>20}"
              f"{spread(row['ratio'][what]) + 'x':>24}")
    print(f"tokens drawn alike: {row['same_tokens']:.1%}")
    for kind, table in row["profiles"].items():
        print(f"\ntorch.profiler, one image, {kind}:\n{table}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="a checkout of github viiika/Meissonic (holds src/)")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="the python of the reference's own environment (default: this one)")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=DTYPES)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photo of a cat sitting on a red sofa")
    parser.add_argument("--negative-prompt", default="worst quality, low quality, blurry")
    parser.add_argument("--folder", help="where the random weights are written (default: a temporary folder); "
                                         "a folder that already holds a model_index.json is used as it is")
    parser.add_argument("--single-layers", type=int, default=MID_SIZE["num_single_layers"])
    parser.add_argument("--double-layers", type=int, default=MID_SIZE["num_layers"])
    parser.add_argument("--profile", action="store_true", help="also profile one image of each with torch.profiler")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not (Path(args.reference) / "src" / "pipeline.py").is_file():
        parser.error(f"--reference {args.reference}: no src/pipeline.py there; give a checkout of viiika/Meissonic")
    if not Path(args.reference_python).is_file():
        parser.error(f"--reference-python {args.reference_python}: no such file")
    if args.size != 1024:  # its pipeline places the compressed grid's positions right only when height == 1024
        parser.error(f"--size {args.size}: the reference's pipeline runs a model with feature compression at 1024 only")
    for name in ("steps", "rounds", "single_layers", "double_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="meissonic-vs-reference-") as scratch:
        folder = Path(args.folder or scratch)
        if not (folder / "model_index.json").is_file():
            print(f"writing random weights to {folder}", flush=True)
            write_weights(folder, args.seed, {"num_layers": args.double_layers,
                                              "num_single_layers": args.single_layers})
        rows = [compare(args, folder, dtype) for dtype in args.dtype]
    for row in rows:
        report(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
