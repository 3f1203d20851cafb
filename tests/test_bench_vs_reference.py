"""scripts/bench_vs_reference.py: its workers, its driver and its argument errors. The reference itself needs its own
environment (diffusers 0.37.1), so the driver is run here against a stand-in reference folder whose `src/` modules are
this project's classes under the reference's names: the plumbing (processes, alternation, timing, token comparison,
report) is the real one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_reference.py"
MARK = "@@bench "


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    (root / "src").mkdir()
    (root / "src" / "pipeline.py").write_text("from meissonic.pipeline import MeissonicPipeline as Pipeline\n")
    (root / "src" / "scheduler.py").write_text("from meissonic.pipeline import MeissonicScheduler as Scheduler\n")
    (root / "src" / "transformer.py").write_text(
        "from meissonic.transformer import MeissonicTransformer as Transformer2DModel\n")
    return root


def _run(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, **kw)


def test_a_worker_warms_up_then_answers_each_run_with_its_timings_and_tokens(tiny_folder, stand_in):
    done = _run("--worker", "ours", "--folder", str(tiny_folder), "--reference", str(stand_in), "--steps", "3",
                input="run\nquit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line[len(MARK):]) for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert [sorted(a) for a in answers] == [["load", "ready", "threads", "versions"], ["image", "passes", "tokens"]]
    run = answers[1]
    assert len(run["passes"]) == 3 and 0 < sum(run["passes"]) < run["image"]
    assert len(run["tokens"]) == 64 * 64 and 64 not in run["tokens"]  # 1024 px at f=16, every token drawn


def test_the_driver_alternates_two_workers_and_reports_ratios(tiny_folder, stand_in, tmp_path):
    rows = tmp_path / "rows.json"
    done = _run("--reference", str(stand_in), "--folder", str(tiny_folder), "--steps", "2", "--rounds", "2",
                "--json", str(rows))
    assert done.returncode == 0, done.stderr[-2000:]
    order = [line.split()[3] for line in done.stdout.splitlines() if line.startswith("  fp32 round")]
    assert order == ["ours", "reference", "reference", "ours"]
    (row,) = json.loads(rows.read_text())
    for kind in ("ours", "reference"):
        assert len(row[kind]["image"]) == 2 and all(t > 0 for t in row[kind]["transformer"])
    assert row["ratio"]["image"] == [r / o for r, o in zip(row["reference"]["image"], row["ours"]["image"])]
    assert row["same_tokens"] == 1.0  # the same code, weights and seed in two processes
    assert "reference / ours" in done.stdout and "tokens drawn alike: 100.0%" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--reference", "{missing}"], "no src/pipeline.py there"),
    (["--reference", "{stand_in}", "--size", "512"], "--size 512: the reference's pipeline runs"),
    (["--reference", "{stand_in}", "--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--reference", "{stand_in}", "--reference-python", "{missing}/python"], "no such file"),
])
def test_bad_arguments_are_refused_in_one_line(args, message, stand_in, tmp_path):
    args = [a.format(missing=tmp_path / "nowhere", stand_in=stand_in) for a in args]
    done = _run(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
