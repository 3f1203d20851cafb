"""scripts/bench_train.py: it times the real training commands in each precision asked and reports what it measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.mark.parametrize("stage", ["transformer", "vq"])
def test_reports_each_precision_from_the_runs_metrics(tmp_path, stage):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--stage", stage, "--preset", "tiny", "--batch-size", "2",
                           "--steps", "4", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["precision"] for r in rows] == ["no", "bf16"]
    for r in rows:
        assert r["steps_timed"] == 3  # steps 2-4: the warm-up step is left out
        assert r["samples_per_s"] > 0
        assert r["seconds_per_step"] == pytest.approx(2 / r["samples_per_s"])
    table = done.stdout.splitlines()
    assert table[0].startswith(f"tiny {stage}, batch 2")
    assert table[2].split()[-1] == "1.00x"  # the first precision is the baseline of the ratio column
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    assert table[3].split()[-1] == f"{ratio:.2f}x"


def test_refuses_fewer_steps_than_the_warm_up():
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--warmup", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--steps 3: must exceed --warmup 5" in done.stderr
