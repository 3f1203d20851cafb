"""Training faults: a process killed with SIGKILL in the middle of saving a checkpoint, and a full disk while saving.

Resuming after the kill loses no step whose checkpoint completed and repeats the uninterrupted run's losses; a full
disk leaves the previous checkpoint intact and stops with a clear error.
"""

import errno
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from meissonic.training.checkpoint import list_checkpoints
from meissonic.training.train import train
from test_training import config, losses, parquet  # noqa: F401 (the fixture)

# Runs `train` in a child process whose second checkpoint save is killed with SIGKILL after its weight files are
# written into the temporary folder, before state.json and the rename: the worst moment.
KILLER = """
import json, os, signal, sys
import meissonic.training.train as loop
real = loop.save_checkpoint
saves = []

def save_then_die(folder, step, write, state, keep):
    saves.append(step)
    if len(saves) == 2:
        def write_then_die(tmp):
            write(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder, step, write_then_die, state, keep)
    return real(folder, step, write, state, keep)

loop.save_checkpoint = save_then_die
cfg = json.loads(sys.argv[1])
cfg["out"] = __import__("pathlib").Path(cfg["out"])
loop.train(loop.TrainConfig(**cfg))
"""

RUN = dict(max_steps=9, checkpoint_every=3, mixed_precision="bf16", lr_scheduler="cosine", warmup_steps=2)


@pytest.mark.exact
def test_sigkill_while_saving_then_resume_repeats_the_uninterrupted_run(parquet, tmp_path):  # noqa: F811
    train(config(parquet, tmp_path / "whole", **RUN))

    killed = tmp_path / "killed"
    cfg = config(parquet, killed, **RUN)
    args = {k: (str(v) if k == "out" else v) for k, v in vars(cfg).items()}
    child = subprocess.run([sys.executable, "-c", KILLER, json.dumps(args, default=str)], capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == -9, child.stderr  # SIGKILL
    checkpoints = killed / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-3"]  # the whole one survives
    assert any(p.name.startswith(".checkpoint-6.tmp") for p in checkpoints.iterdir())  # the half-written one
    assert len(losses(killed)) >= 6  # steps 4-6 were done but not checkpointed

    train(config(parquet, killed, resume="latest", **RUN))
    assert losses(killed) == losses(tmp_path / "whole")  # steps 4-6 redone exactly, nothing lost or doubled
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    a = load_file(tmp_path / "whole" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(parquet, tmp_path, monkeypatch):  # noqa: F811
    import meissonic.training.train as loop

    real = loop.save_checkpoint
    saves = []

    def disk_full_on_second(folder, step, write, state, keep):
        saves.append(step)
        if len(saves) == 2:
            def write_until_full(tmp):
                (tmp / "partial.bin").write_bytes(b"\0" * 1024)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(folder, step, write_until_full, state, keep)
        return real(folder, step, write, state, keep)

    monkeypatch.setattr(loop, "save_checkpoint", disk_full_on_second)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="No space left on device"):
        train(config(parquet, out, **RUN))
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-3"]
    state = json.loads((checkpoints / "checkpoint-3" / "state.json").read_text())
    assert state["step"] == 3
    monkeypatch.setattr(loop, "save_checkpoint", real)  # space again: the run resumes from the intact checkpoint
    train(config(parquet, out, resume="latest", **RUN))
    assert [p.name for p in list_checkpoints(checkpoints)][-1] == "checkpoint-9"
