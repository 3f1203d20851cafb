"""scripts/bench_head.py: it times the full and the masked-only output head and reports each share asked."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_head.py"


def test_reports_the_full_head_and_each_share(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-call", "--width", "32", "--codes", "64", "--grid", "8",
                           "--shares", "0.1", "0.5", "--repeat", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["path"], r["share"]) for r in rows] == [("masked-only", 0.1), ("masked-only", 0.5)]
    assert all(r["seconds"] > 0 and r["full_seconds"] > 0 for r in rows)
    assert all(r["speedup"] == r["full_seconds"] / r["seconds"] for r in rows)
    assert done.stdout.splitlines()[0].startswith("head: width 32, 64 codes, 2 x 8 x 8 positions")


def test_refuses_a_share_outside_0_to_1():
    done = subprocess.run([sys.executable, str(SCRIPT), "--shares", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--shares 0.0: must lie in (0, 1]" in done.stderr
