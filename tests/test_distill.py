"""`meissonic distill`: the divergence gradients, the loss, a whole run to a one-step student, exact resume, LoRA,
prompts sources and bad input."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from meissonic import MeissonicPipeline
from meissonic.cli import main
from meissonic.one_step import OneStep
from meissonic.training.data import DataError, read_prompts
from meissonic.training.distill import (
    DistillConfig, TrainingError, distill, distribution_matching_loss, divergence_gradient,
)

PROMPTS = ["a red circle", "a blue square on the left", "a green star at the top", "a yellow diamond"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def config(teacher, data, out, **kw):
    base = dict(model=str(teacher), data=str(data), out=out, resolution=64, batch_size=2, max_steps=4,
                learning_rate=1e-3, log_every=1, checkpoint_every=2, progress=False)
    base.update(kw)
    return DistillConfig(**base)


def student_weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jeffreys"])
def test_divergence_gradients_are_the_divergences_derivatives(kind):
    """g is d/da of the divergence between p_teacher and p_aux = softmax(a), taken by autograd: the student's logits
    move the way that divergence's gradient says the auxiliary model's distribution would have to."""
    gen = torch.Generator().manual_seed(0)
    teacher, aux = torch.randn(6, 11, generator=gen) * 2, torch.randn(6, 11, generator=gen) * 2
    a = aux.clone().requires_grad_(True)
    log_t, log_a = F.log_softmax(teacher, -1), F.log_softmax(a, -1)
    forward = (log_t.exp() * (log_t - log_a)).sum()  # KL(p_t || p_a)
    reverse = (log_a.exp() * (log_a - log_t)).sum()  # KL(p_a || p_t)
    value = {"fkl": forward, "rkl": reverse, "jeffreys": 0.7 * forward + 0.3 * reverse}[kind]
    (expected,) = torch.autograd.grad(value, a)
    got = divergence_gradient(teacher, aux, kind, beta=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # float32 rounding of two routes


def test_divergence_gradient_vanishes_where_the_models_agree():
    logits = torch.randn(5, 9)
    for kind in ("fkl", "rkl", "jeffreys"):
        assert divergence_gradient(logits, logits.clone(), kind).abs().max() < 1e-6


def test_distribution_matching_loss_hands_the_student_g_over_the_batch():
    z = torch.randn(7, 13, requires_grad=True)
    g = torch.randn(7, 13)
    distribution_matching_loss(z, g, batch=2).backward()
    torch.testing.assert_close(z.grad, g / 2)


# ---------------------------------------------------------------------------------------------- whole runs


def test_distill_writes_a_one_step_student(tiny_folder, prompts_file, tmp_path):
    out = tmp_path / "student"
    teacher_before = student_weights(tiny_folder)
    distill(config(tiny_folder, prompts_file, out, validation_every=2, validation_prompts=PROMPTS[:2],
                   ema_decay=0.5, sample_mask_ratio=0.6))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "kl", "aux_loss", "grad_norm", "aux_grad_norm", "lr", "samples_per_s"} <= set(records[0])
    assert all(r["aux_loss"] > 0 for r in records)
    for name in ("teacher.png", "step-2.png", "step-4.png"):
        assert (out / "validation" / name).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # the teacher's folder is untouched; the student moved, but not its frozen embedding and head
    after = student_weights(tiny_folder)
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    student = student_weights(out)
    moved = [k for k in student if not torch.equal(student[k], teacher_before[k])]
    assert moved and not any(k.startswith(("embed.", "mlm_layer.")) for k in moved)
    pipe = MeissonicPipeline.from_pretrained(out)
    assert pipe.one_step_mode == OneStep(mask_ratio=0.6, embedding_noise=0.1)
    images = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert images[0].size == (64, 64) and pipe.last_work == {"passes": 1.0}
    code = main(["generate", "a red circle", "--model", str(out), "--out", str(tmp_path / "img"), "--seed", "0"])
    assert code == 0 and (tmp_path / "img" / "a-red-circle_0.png").is_file()


@pytest.mark.exact
def test_resume_repeats_the_uninterrupted_run(tiny_folder, prompts_file, tmp_path):
    kw = dict(max_steps=5, checkpoint_every=2, ema_decay=0.9, aux_rounds=2, divergence="jeffreys",
              lr_scheduler="cosine", warmup_steps=1, mixed_precision="bf16", gradient_accumulation=2)
    distill(config(tiny_folder, prompts_file, tmp_path / "a", **kw))
    interrupted = tmp_path / "b"
    distill(config(tiny_folder, prompts_file, interrupted, **kw))
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-5")  # as if killed after step 4's checkpoint
    shutil.rmtree(interrupted / "transformer")
    distill(config(tiny_folder, prompts_file, interrupted, resume="latest", **kw))
    lines = [(f / "metrics.jsonl").read_text().splitlines() for f in (tmp_path / "a", interrupted)]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in run] for run in lines]
    assert strip[0] == strip[1]
    a, b = student_weights(tmp_path / "a"), student_weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_on_cpu(tiny_folder, prompts_file, tmp_path):
    """torchrun with 2 gloo ranks: both models train in step (DDP), rank 0 alone writes checkpoints and the student."""
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
           "-m", "meissonic", "distill", "--teacher", str(tiny_folder), "--data", str(prompts_file), "--out", str(out),
           "--resolution", "64", "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "2",
           "--log-every", "1", "--gradient-accumulation", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["processes"] == 2 for r in records)
    assert (out / "checkpoints" / "checkpoint-2" / "aux.safetensors").is_file()
    assert MeissonicPipeline.from_pretrained(out).one_step_mode is not None


def test_lora_student_is_an_adapter_that_samples_in_one_step(tiny_folder, prompts_file, tmp_path):
    out = tmp_path / "lora"
    distill(config(tiny_folder, prompts_file, out, lora_rank=4, max_steps=2, learning_rate=1e-2))
    saved = load_file(out / "checkpoints" / "checkpoint-2" / "student.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    assert not (out / "transformer").exists()
    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    assert pipe.one_step_mode is None
    pipe.load_lora(out / "lora")
    assert pipe.one_step_mode == OneStep(mask_ratio=0.5, embedding_noise=0.1)
    pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent")
    assert pipe.last_work == {"passes": 1.0}


# ---------------------------------------------------------------------------------------------- input


def test_prompts_come_from_text_files_and_captions(prompts_file, tmp_path):
    assert read_prompts(prompts_file) == PROMPTS  # the blank line dropped
    table = pa.table({"image": [{"bytes": b"", "path": None}] * 3, "caption": ["one", "", "three"]})
    pq.write_table(table, tmp_path / "captions.parquet")
    assert read_prompts(tmp_path / "captions.parquet") == ["one", "three"]  # images never decoded
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_a_student_cannot_be_a_teacher(tiny_folder, prompts_file, tmp_path):
    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_one_step_mode(OneStep())
    pipe.save_pretrained(tmp_path / "student")
    with pytest.raises(TrainingError, match="one-step student"):
        distill(config(tmp_path / "student", prompts_file, tmp_path / "out"))


@pytest.mark.parametrize("extra, message", [
    (["--jeffreys-beta", "2"], "--jeffreys-beta 2.0"),
    (["--mask-ratio", "1.5"], "mask_ratio=1.5"),
    (["--guidance-scale", "0.5"], "--guidance-scale 0.5"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--gradient-accumulation", "0"], "--gradient-accumulation 0"),
    (["--resolution", "70"], "--resolution 70"),
    (["--lora-rank", "4", "--train-embeddings"], "--train-embeddings"),
])
def test_bad_distill_options_exit_2(capsys, tiny_folder, prompts_file, tmp_path, extra, message):
    code = main(["distill", "--teacher", str(tiny_folder), "--data", str(prompts_file), "--out",
                 str(tmp_path / "o"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_prompts_file_exits_2(capsys, tiny_folder, tmp_path):
    code = main(["distill", "--teacher", str(tiny_folder), "--data", str(tmp_path / "none.txt"), "--out",
                 str(tmp_path / "o")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- using a student


@pytest.fixture(scope="module")
def compact_student(tiny_folder, tmp_path_factory):
    """A student folder: a transformer and student.json naming its teacher's folder (the form demo-1step ships in)."""
    from meissonic.presets import build_pipeline

    folder = tmp_path_factory.mktemp("compact") / "tiny-1step"
    build_pipeline("tiny", seed=3).transformer.save_pretrained(folder / "transformer")
    (folder / "student.json").write_text(json.dumps({"base_model": str(tiny_folder),
                                                     "one_step": {"mask_ratio": 0.4, "embedding_noise": 0.2}}))
    return folder


def test_a_student_folder_loads_its_teacher_with_its_transformer(compact_student, tiny_folder):
    pipe = MeissonicPipeline.from_pretrained(compact_student)
    teacher = MeissonicPipeline.from_pretrained(tiny_folder)
    assert pipe.one_step_mode == OneStep(mask_ratio=0.4, embedding_noise=0.2)
    mine = load_file(compact_student / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, mine[k]) for k, v in pipe.transformer.state_dict().items())
    assert all(torch.equal(v, teacher.text_encoder.state_dict()[k]) for k, v in pipe.text_encoder.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    pipe("x", generator=torch.Generator().manual_seed(0), output_type="latent")
    assert pipe.last_work == {"passes": 1.0}
    (compact_student.parent / "broken").mkdir()
    (compact_student.parent / "broken" / "student.json").write_text("{}")
    with pytest.raises(ValueError, match="no transformer/config.json"):
        MeissonicPipeline.from_pretrained(compact_student.parent / "broken")


def test_the_shipped_student_is_a_student_of_the_demo():
    from meissonic.loading import student_folder

    folder = student_folder("demo-1step")
    spec = json.loads((folder / "student.json").read_text())
    assert spec["base_model"] == "demo" and OneStep.from_dict(spec["one_step"])
    pipe = MeissonicPipeline.from_pretrained("demo-1step")
    assert pipe.one_step_mode is not None and pipe.defaults["resolution"] == 128


def test_the_ui_offers_one_step_beside_the_speed_levels(tiny_folder, compact_student):
    from meissonic.cli_common import UsageError, load_student
    from meissonic.ui import Settings, Studio, UserError

    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    student = load_student(pipe, str(compact_student), None)
    assert student.text_encoder is pipe.text_encoder and student.vqvae is pipe.vqvae  # only the transformer loaded
    student.set_progress_bar_config(disable=True)
    studio = Studio(pipe, "tiny", student)
    assert studio.speeds == ["exact", "fast", "fastest", "one-step"]
    settings = Settings(randomize=False, seed=5, width=32, height=32, speed="one-step", num_images=2)
    steps = []
    images, seed = studio.make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0), settings,
                               on_step=lambda step, total, tokens: steps.append((step, total)))
    assert len(images) == 2 and images[0].size == (32, 32) and student.last_work == {"passes": 1.0}
    expected = student("x", height=32, width=32, generator=torch.Generator().manual_seed(5)).images[0]
    assert list(images[0].getdata()) == list(expected.getdata())  # image i from seed + i, as the command line
    with pytest.raises(UserError, match="from text only"):
        studio.make("Image to image", "x", images[0], None, 0.5, (0, 0, 0, 0), settings)
    assert Studio(student, "student").speeds == ["one-step"]  # a student alone samples in one step only
    with pytest.raises(UserError, match="not available here"):
        Studio(pipe, "tiny").make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0), settings)
    with pytest.raises(UsageError, match="not a one-step student"):
        load_student(pipe, str(tiny_folder), None)


def test_bench_times_a_student_against_its_teachers_exact_row(capsys, tiny_folder, compact_student, tmp_path):
    code = main(["bench", "--model", str(tiny_folder), "--student", str(compact_student), "--dtypes", "fp32",
                 "--steps", "3", "--resolution", "64", "--json", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["speed"] for r in rows] == ["exact", "one-step"]
    exact, student = rows
    assert exact["passes"] == 6 and student["passes"] == 1 and student["steps"] == 1
    assert student["compute_vs_exact"] == pytest.approx(1 / 6)
    assert student["time_vs_exact"] and student["total_vs_exact"] and student["tokens_as_exact"] is None
    assert "| one-step | fp32 | none | 1.0 | 17% |" in out
    assert main(["bench", "--model", str(tiny_folder), "--student", str(compact_student), "--speeds", "fast"]) == 2
    assert "keep exact in --speeds" in capsys.readouterr().err
