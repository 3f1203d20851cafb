"""scripts/bench_partial.py: it times a full pass and partial passes of each subset size, per batch."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_partial.py"


def test_reports_each_subset_against_the_full_pass(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--resolution", "256", "--dtype", "fp32",
                           "--shares", "0.25", "1", "--repeat", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    # tiny at 256 px: 16 x 16 tokens, 8 x 8 after the compression; 77 text positions
    assert [(r["batch"], r["subset"]) for r in rows] == [(2, 16), (2, 64), (1, 16), (1, 64)]
    assert all(r["counted"] == r["subset"] / (64 + 77) for r in rows)
    assert all(r["measured"] == r["seconds"] / r["full_seconds"] and r["seconds"] > 0 for r in rows)
    assert done.stdout.startswith("tiny at 256 px, fp32: 64 block positions + 77 text")


def test_refuses_a_share_outside_0_to_1():
    done = subprocess.run([sys.executable, str(SCRIPT), "--shares", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "each must lie in (0, 1]" in done.stderr
