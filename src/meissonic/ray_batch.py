"""Offline batch generation on Ray Data: `meissonic generate --prompts-file F --ray` (and the edit commands).

The prompts become a Ray dataset of (number, prompt) rows; `map_batches` runs them through a pool of
`--ray-workers` actors, each loading the model once (with the `build` it is given: the CLI's own loop body,
`cli_images.Maker`, which imports this module, so it is passed in rather than imported) and writing its
PNGs into `--out`. An image's seed follows its prompt's number (seed + number * num_images + i), so the images do not
depend on how the rows were sharded, and its file name (prompt slug and seed) is known in advance: a rerun skips
the prompts whose images are all there. `metadata.jsonl` (one line per image, in prompt order: file and
parameters, read back from each PNG) is rewritten at the end, so it also covers the images of earlier runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .cli_common import UsageError, reason
from .outputs import png_name, prompt_seeds

METADATA = "metadata.jsonl"


def expected_files(out: Path, number: int, prompt: str, seed: int, num_images: int) -> list[Path]:
    return [out / png_name(prompt, s) for s in prompt_seeds(seed, number, num_images)]


class RayWorker:
    """One Ray Data actor: the model loaded once, then batches of rows made and written."""

    def __init__(self, build, device: str, threads: int):
        import torch

        from .cli_common import resolve_device

        torch.set_num_threads(threads)
        self.maker = build(resolve_device(device), quiet=True)

    def __call__(self, batch: dict) -> dict:
        rows = list(zip((int(n) for n in batch["number"]), (str(p) for p in batch["prompt"])))
        paths = self.maker.make_batch(rows, keep_existing=True)
        return {"file": [p.name for p in paths]}


def generate_on_ray(args, build, prompts: list[str]) -> int:
    """`build(device, quiet=True)` loads the model on a worker and returns an object whose `make_batch(rows,
    keep_existing=True)` makes and writes the images of (number, prompt) rows (`cli_images.Maker`)."""
    try:
        import ray
    except ImportError as err:
        raise UsageError(f"--ray needs Ray: pip install 'meissonic[cluster]' ({reason(err)})") from None
    if args.seed is None:
        raise UsageError("--ray needs --seed: fixed seeds make the images independent of the workers, and let a "
                         "rerun skip the ones already written")
    if args.ray_workers < 1:
        raise UsageError(f"--ray-workers {args.ray_workers}: must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [{"number": n, "prompt": p} for n, p in enumerate(prompts)
            if not all(f.exists() for f in expected_files(args.out, n, p, args.seed, args.num_images))]
    command = getattr(args, "verb", "generate")
    print(f"meissonic {command} --ray: {len(prompts)} prompts, {len(prompts) - len(todo)} already done, "
          f"{len(todo)} to make on {args.ray_workers} worker(s)", flush=True)
    if todo:
        ray.init(address=args.ray_address, ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE",
                                                                                                 "0")}})
        cpus = int(ray.available_resources().get("CPU", 1))
        threads = max(1, cpus // args.ray_workers)
        dataset = ray.data.from_items(todo)
        made = dataset.map_batches(RayWorker, fn_constructor_args=(build, args.device, threads),
                                   batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=args.ray_workers),
                                   num_cpus=min(threads, cpus), batch_format="default")
        for row in made.iter_rows():
            print(f"wrote {args.out / row['file']}", flush=True)
        ray.shutdown()
    write_metadata(args.out, prompts, args.seed, args.num_images)
    return 0


def write_metadata(out: Path, prompts: list[str], seed: int, num_images: int) -> Path:
    """`metadata.jsonl` for every image of the prompt list that exists, from the parameters in its PNG; written to
    a temporary file and renamed."""
    from PIL import Image

    lines = []
    for number, prompt in enumerate(prompts):
        for path in expected_files(out, number, prompt, seed, num_images):
            if path.exists():
                with Image.open(path) as image:
                    params = json.loads(image.info.get("parameters", "{}"))
                lines.append(json.dumps({"file": path.name, "number": number, **params}))
    target = out / METADATA
    tmp = out / f".{METADATA}.{os.getpid()}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(target)
    return target
