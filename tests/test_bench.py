"""`meissonic bench`: rows per precision and quantization, each in its own process, with the figures it promises."""

import json

import pytest
import torch

from meissonic.bench import BenchSpec, combine_runs, fixed_inputs, format_table, random_pipeline, run_row, seed_format
from meissonic.cli import main


def test_random_pipeline_is_built_in_the_asked_precision_and_generates():
    pipe = random_pipeline("tiny", torch.bfloat16, torch.device("cpu"))
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in pipe.text_encoder.parameters())
    ids = pipe.text_encoder.text_model.embeddings.position_ids
    assert torch.equal(ids[0], torch.arange(ids.shape[-1]))
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe(prompt="a red circle", num_inference_steps=2, output_type="latent").images
    assert tokens.shape == (1, 8, 8) and (tokens < pipe.transformer.config.codebook_size).all()


def test_random_pipeline_quantized_while_built_is_smaller():
    from meissonic.quantize import weight_bytes

    plain = random_pipeline("small", torch.float32, torch.device("cpu"))
    int8 = random_pipeline("small", torch.float32, torch.device("cpu"), quantize="int8")
    assert weight_bytes(int8.transformer) < 0.4 * weight_bytes(plain.transformer)
    inputs = fixed_inputs(plain.transformer.config, (8, 8), 128, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert torch.isfinite(int8.transformer(**inputs)).all()


def test_one_row_in_process_reports_every_figure():
    row = run_row(BenchSpec(preset="tiny", dtype="fp32", steps=3, device="cpu"))
    for key in ("text_s", "first_step_s", "step_s", "decode_s", "total_s", "peak_rss_gb", "weights_gb"):
        assert row[key] > 0, key
    assert row["total_s"] >= row["text_s"] + row["decode_s"]
    assert row["steps"] == 3 and row["resolution"] == 128


def test_iterations_time_the_same_generation_again_and_report_medians(monkeypatch):
    from meissonic import bench
    from meissonic import pipeline as pipeline_module

    encoded = []
    real = pipeline_module.encode_prompts

    def counting(tokenizer, text_encoder, prompts):
        encoded.append(list(prompts))
        return real(tokenizer, text_encoder, prompts)

    monkeypatch.setattr(pipeline_module, "encode_prompts", counting)
    clock = iter(range(1000))  # every perf_counter call one second later: each part of each iteration takes 1 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    row = run_row(BenchSpec(preset="tiny", dtype="fp32", steps=2, device="cpu", iterations=3))
    assert row["iterations"] == 3
    assert len(encoded) == 3  # the prompt and the empty one encoded anew in each iteration, not read from the cache
    assert row["text_s"] == row["decode_s"] == 1.0 and row["total_s"] == row["text_s"] + row["sample_s"] + 1.0


def test_iterations_must_be_positive_and_keep_the_text_encoder():
    with pytest.raises(ValueError, match="iterations=0"):
        run_row(BenchSpec(preset="tiny", steps=1, device="cpu", iterations=0))
    with pytest.raises(ValueError, match="1 with release_text_encoder"):
        run_row(BenchSpec(preset="tiny", steps=1, device="cpu", iterations=2, release_text_encoder=True))


@pytest.mark.slow
def test_bench_command_rows_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--steps", "2", "--dtypes", "fp32,bf16", "--quantize", "none,int8",
                 "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["quantize"]) for r in rows] == [("fp32", "none"), ("fp32", "int8"), ("bf16", "none"),
                                                          ("bf16", "int8")]
    assert rows[0]["top1_agreement"] == 1.0  # fp32 against its own reference, in another process
    assert all(0 <= r["top1_agreement"] <= 1 for r in rows)
    assert rows[1]["weights_gb"] < rows[0]["weights_gb"] and rows[2]["weights_gb"] < rows[0]["weights_gb"]
    assert "| precision | quantize |" in printed and "FP32: " in printed and "BF16 int8: " in printed


def test_seed_format_and_table():
    row = {"dtype": "bf16", "quantize": "int8", "total_s": 2.314, "peak_rss_gb": 3.21, "text_s": 0.1,
           "step_s": 0.03, "decode_s": 0.4, "weights_gb": 1.0, "top1_agreement": 0.985,
           "release_text_encoder": True, "vq_tile": 32, "compile": False}
    assert seed_format(row) == "BF16 int8: 2.31 s / 3.2 GB"
    table = format_table([row])
    assert "98.5%" in table and "+release TE" in table and "+tile 32" in table


def test_repeated_rounds_take_medians_and_per_round_ratios():
    def run(step_s, rss, round_):
        return {"dtype": "fp32", "quantize": "none", "round": round_, "build_s": 1.0, "text_s": 0.1,
                "first_step_s": step_s, "step_s": step_s, "sample_s": 3 * step_s, "decode_s": 0.4,
                "total_s": 0.5 + 3 * step_s, "peak_rss_gb": rss, "weights_gb": 1.0, "top1_agreement": None,
                "release_text_encoder": False, "vq_tile": None, "compile": False}

    # the machine was slow in round 2 for both rows: each round's ratio holds, the times' ratio would not
    base = [run(1.0, 2.0, 1), run(3.0, 2.2, 2), run(1.2, 2.1, 3)]
    fast = [run(0.5, 1.0, 1), run(1.0, 1.3, 2), run(0.8, 1.1, 3)]
    rows = [combine_runs(base, base), combine_runs(fast, base)]
    assert rows[1]["step_s"] == 0.8 and rows[1]["total_s"] == 0.5 + 3 * 0.8  # medians
    assert rows[1]["peak_rss_gb"] == 1.3 and rows[0]["peak_rss_gb"] == 2.2  # the largest peak
    assert rows[1]["step_speedups"] == pytest.approx([2.0, 3.0, 1.5]) and rows[0]["step_speedups"] == [1.0, 1.0, 1.0]
    assert len(rows[1]["runs"]) == 3 and "round" not in rows[1]
    table = format_table(rows)
    assert "| 2.00x (1.50-3.00) |" in table and "| 1.00x (1.00-1.00) |" in table


@pytest.mark.slow
def test_bench_repeat_interleaves_rounds(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--steps", "2", "--dtypes", "fp32,bf16", "--repeat", "2",
                 "--iterations", "2", "--no-agreement", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    order = [line.split(":")[0].strip() + " " + line.split(":")[1].strip()
             for line in printed.splitlines() if line.strip().startswith("round ")]
    assert order == ["round 1/2 FP32", "round 1/2 BF16", "round 2/2 BF16", "round 2/2 FP32"]
    rows = json.loads(out.read_text())["rows"]
    assert [len(r["runs"]) for r in rows] == [2, 2] and len(rows[1]["step_speedups"]) == 2
    assert "medians of 2 interleaved rounds, each the median of 2 generations" in printed
    assert all(run["iterations"] == 2 for row in rows for run in row["runs"])
    assert "CPU matmul 256x1024x4096: fp32 " in printed  # what --dtype auto weighs on this CPU


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat 0 and --iterations 1: must be at least 1"),
    (["--iterations", "0"], "--repeat 1 and --iterations 0: must be at least 1"),
    (["--iterations", "2", "--release-text-encoder"], "--iterations with --release-text-encoder"),
    (["--dtypes", "fp64"], "--dtypes 'fp64': choose from fp32, bf16, fp16"),
    (["--quantize", "int3"], "--quantize 'int3': choose from none, int8, int8-dynamic, fp8, int4"),
    (["--dtypes", "fp16", "--device", "cpu"], "fp16 on CPU"),
    (["--resolution", "100"], "--resolution 100: must be a positive multiple of 16"),
    (["--preset", "huge"], "--preset 'huge': choose from"),
    (["--offload", "model", "--device", "cpu"], "--offload model: needs a CUDA GPU"),
])
def test_bench_errors_are_one_line(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_speed_rows_compare_with_the_exact_row_of_their_precision():
    from meissonic.bench import _against_exact, speed_table

    def row(speed, dtype, passes, times):
        runs = [{"sample_s": t, "total_s": t + 1} for t in times]
        return {"speed": speed, "dtype": dtype, "quantize": "none", "passes": passes, "sample_s": times[0],
                "total_s": times[0] + 1, "cache_mb": 0 if speed == "exact" else 12.0, "peak_rss_gb": 1.0,
                "tokens_as_exact": None, "runs": runs}

    rows = [row("exact", "fp32", 64.0, [10.0, 20.0]), row("fast", "fp32", 25.6, [5.0, 8.0]),
            row("exact", "bf16", 64.0, [4.0, 4.0]), row("fast", "bf16", 25.6, [2.0, 3.0])]
    _against_exact(rows)
    assert rows[1]["compute_vs_exact"] == pytest.approx(0.4) and rows[1]["time_vs_exact"] == [0.5, 0.4]
    assert rows[3]["time_vs_exact"] == [0.5, 0.75]  # against bf16's exact, not the first row
    assert rows[3]["total_vs_exact"] == [3 / 5, 4 / 5]  # text and decode included
    table = speed_table(rows)
    assert "| fast | bf16 | none | 25.6 | 40% | 2.00 | 62% (50-75%) |" in table
    assert "| exact | fp32 | none | 64.0 | 100% | 10.00 | 100% (100-100%) |" in table
