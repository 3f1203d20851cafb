"""scripts/bench_head.py: it times the full and the masked-only output head and reports each share asked."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_head.py"


def test_reports_the_full_head_and_each_share(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-call", "--width", "32", "--codes", "64", "--grid", "8",
                           "--shares", "0.1", "0.5", "--repeat", "1", "--json", str(out), "--no-sampler"],
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


def test_the_sampler_rows_draw_the_same_tokens_three_ways(tmp_path):
    """The reference scheduler's multinomial over the grid, ours with torch's exponential_, ours: one set of tokens."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-call", "--codes", "64", "--grid", "12", "--width", "16",
                           "--shares", "0.5", "--repeat", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [r for r in json.loads(out.read_text()) if r["what"] == "sampler"]
    assert [r["path"] for r in rows] == ["multinomial over the grid", "ours, torch's exponential_", "ours"]
    assert all(r["same_tokens"] and r["seconds"] > 0 for r in rows)
