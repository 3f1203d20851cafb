"""Checkpoints that lose nothing: written to a temporary folder and renamed into place (a run killed while saving
leaves the previous checkpoints intact), the last K kept, and `latest` found by step number. Also the run's
`metrics.jsonl`, trimmed on resume so a step is never logged twice."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

PATTERN = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary folders of an interrupted save are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.fullmatch(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(value: str, folder: Path) -> Path | None:
    """`--resume latest` (None when there is no checkpoint yet) or a checkpoint path."""
    if value == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "state.json").is_file():
        raise ValueError(f"--resume {value!r}: not a checkpoint folder (no state.json); use a path or 'latest'")
    return path


def save_checkpoint(folder: Path, step: int, write: Callable[[Path], None], state: dict, keep: int | None) -> Path:
    """Write a checkpoint atomically with `write(tmp_folder)` plus `state.json`, then prune to the last `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{step}"
    tmp = folder / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier run: replace it only now the new one is whole
        old = folder / f".checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep is not None:
        for stale in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (those steps are run, and logged, again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def start_run_folder(out: Path, start_step: int, config_name: str, config: dict) -> None:
    """The main process's part of starting (or resuming) a run: the output folder, `metrics.jsonl` trimmed to the
    step resumed from, and the run's settings written as `config_name`."""
    out.mkdir(parents=True, exist_ok=True)
    truncate_metrics(out / "metrics.jsonl", start_step)
    (out / config_name).write_text(json.dumps(config, indent=2, default=str) + "\n")
