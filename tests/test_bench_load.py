"""scripts/bench_load.py: it loads a saved float32 transformer with each loader and reports what it measured."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_load.py"


def test_reports_each_loader_and_only_the_map_leaves_weights_misaligned(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--rounds", "1", "--work", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["copy", "map", "copy-keep-pages"]
    assert rows["copy"]["misaligned"] == rows["copy-keep-pages"]["misaligned"] == 0 < rows["map"]["misaligned"]
    assert all(r["load_s"] > 0 and r["first_forward_s"] > 0 and r["peak_rss_gb"] > 0 for r in rows.values())
    assert done.stdout.splitlines()[0] == "tiny transformer, float32, 1 round(s), medians"


def test_refuses_an_unknown_mode():
    done = subprocess.run([sys.executable, str(SCRIPT), "--modes", "copy,lazy"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--modes copy,lazy: choose from copy, map, copy-keep-pages" in done.stderr
