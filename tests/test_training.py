"""`meissonic train`: the objective's parts, data sources, exact resume, LoRA, checkpoints, DDP, and bad input."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import FIXTURES
from meissonic import MeissonicPipeline
from meissonic.cli import main
from meissonic.training.checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from meissonic.training.data import DataError, open_dataset, prepare_image
from meissonic.training.objective import (
    IGNORE, drop_conditions, mask_rate_timestep, mask_tokens, masked_cross_entropy, sample_mask_ratios,
)
from meissonic.training.train import TrainConfig, TrainingError, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 210, 40)}


def shape_images(n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        image = Image.new("RGB", (80, 64), "white")
        x = int(rng.integers(0, 40))
        ImageDraw.Draw(image).ellipse([x, 12, x + 32, 44], fill=COLOURS[name])
        yield image, f"a {name} circle"


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shapes.parquet"
    rows = [(png(img), cap) for img, cap in shape_images(32)]
    table = pa.table({"image": [{"bytes": b, "path": None} for b, _ in rows], "caption": [c for _, c in rows],
                      "aesthetic_score": [5.0 + i % 3 for i in range(len(rows))]})
    pq.write_table(table, path, row_group_size=10)
    return path


def config(data, out, **kw):
    base = dict(data=str(data), out=out, preset="tiny", resolution=64, batch_size=4, max_steps=6,
                learning_rate=3e-3, log_every=1, checkpoint_every=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- objective


def test_mask_tokens_masks_the_asked_share_and_labels_only_masked():
    tokens = torch.randint(0, 50, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    ratios = torch.tensor([1.0, 0.5, 0.0])
    inputs, labels, share = mask_tokens(tokens, ratios, 99, torch.Generator().manual_seed(1))
    masked = inputs == 99
    assert masked.flatten(1).sum(1).tolist() == [64, 32, 1]  # at least one token
    assert torch.equal(labels[masked], tokens[masked]) and (labels[~masked] == IGNORE).all()
    assert torch.equal(inputs[~masked], tokens[~masked])
    assert share.tolist() == [1.0, 0.5, 1 / 64]


def test_mask_ratios_follow_the_cosine_schedule():
    ratios = sample_mask_ratios(100_000, torch.Generator().manual_seed(0), min_ratio=0.1)
    assert ratios.min() >= 0.1 and ratios.max() <= 1
    # P(cos(pi/2 u) > 0.5) = P(u < 2/3)
    assert abs((ratios > 0.5).float().mean().item() - 2 / 3) < 0.01
    # power p: P(cos(pi/2 u^p) > 0.95) = P(u < (2/pi acos 0.95)^(1/p)): 20% at p=1, 45% at p=2
    for power, share in ((1.0, 0.2022), (2.0, 0.4496)):
        ratios = sample_mask_ratios(100_000, torch.Generator().manual_seed(0), power=power)
        assert abs((ratios > 0.95).float().mean().item() - share) < 0.01
    paper = sample_mask_ratios(8, torch.Generator().manual_seed(3))
    assert torch.equal(paper, sample_mask_ratios(8, torch.Generator().manual_seed(3), power=1.0))


def test_condition_dropout_rate_is_what_was_asked():
    hidden, pooled = torch.randn(20_000, 3, 4), torch.randn(20_000, 4)
    empty_hidden, empty_pooled = torch.zeros(1, 3, 4), torch.zeros(1, 4)
    for p in (0.0, 0.1, 0.3, 1.0):
        h, q, dropped = drop_conditions(hidden, pooled, empty_hidden, empty_pooled, p, torch.Generator().manual_seed(2))
        assert abs(dropped.float().mean().item() - p) < 0.01
        assert (h[dropped] == 0).all() and (q[dropped] == 0).all()
        assert torch.equal(h[~dropped], hidden[~dropped]) and torch.equal(q[~dropped], pooled[~dropped])


def test_mask_rate_timestep_matches_the_sampler_conventions():
    share = torch.tensor([1.0, 0.5, 0.01])
    assert torch.equal(mask_rate_timestep(share, "mask_rate", 64), share)
    steps = mask_rate_timestep(share, "step_index", 64)
    assert steps[0] == 63 and 0 <= steps[2] < 2  # fully masked = first step; nearly done = last steps
    assert steps[1] == 63 - round(64 * 2 / 3)  # cos(pi/2 * i/64) = 0.5 at i = 64 * 2/3


def test_masked_cross_entropy_is_the_mean_over_masked_tokens_only():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (3, 4, 5), generator=gen)
    _, labels, _ = mask_tokens(tokens, torch.tensor([1.0, 0.5, 0.05]), 7, gen)
    logits = torch.randn(3, 7, 4, 5, generator=gen, requires_grad=True)
    loss = masked_cross_entropy(logits, labels)
    by_hand = [-logits[b, :, i, j].log_softmax(0)[labels[b, i, j]] for b, i, j in (labels != IGNORE).nonzero()]
    assert len(by_hand) == 20 + 10 + 1
    assert torch.allclose(loss, torch.stack(by_hand).mean())
    loss.backward()  # unmasked positions get no gradient
    assert (logits.grad.permute(0, 2, 3, 1)[labels == IGNORE] == 0).all()
    assert (logits.grad.permute(0, 2, 3, 1)[labels != IGNORE] != 0).any(dim=1).all()
    half = masked_cross_entropy(logits.detach().bfloat16(), labels)  # promoted to float32 inside
    assert half.dtype == torch.float32 and abs(half.item() - loss.item()) < 0.05


# ---------------------------------------------------------------------------------------------- data


def test_parquet_image_folder_and_saved_dataset_read_alike(parquet, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (image, caption) in enumerate(shape_images(5)):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    saved = tmp_path / "saved"  # the layout `datasets.Dataset.save_to_disk` writes: arrow stream files + state.json
    saved.mkdir()
    table = pq.read_table(parquet)
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text("{}")
    for source, n in [(parquet, 32), (str(parquet.parent / "*.parquet"), 32), (parquet.parent, 32), (folder, 5),
                      (saved, 32)]:
        data = open_dataset(source)
        assert len(data) == n
        sample = data[n - 1]
        assert sample.image.mode == "RGB" and sample.caption.startswith("a ")
    assert open_dataset(parquet)[1].score == 6.0 and open_dataset(folder)[0].score == 6.0


def test_prepare_image_resizes_crops_and_reports_micro_conditions():
    image = Image.new("RGB", (200, 100), "red")
    pixels, micro = prepare_image(image, 64, center=True)
    assert pixels.shape == (3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    assert micro.tolist() == [200, 100, 0, 32]  # orig width, height, crop top, crop left (128x64 resized)


def test_bad_data_is_named(parquet, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "none")
    with pytest.raises(DataError, match="has no column 'text'"):
        open_dataset(parquet, caption_column="text")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(DataError, match="no caption .txt"):
        open_dataset(tmp_path / "imgs")
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"image": [b"not an image"], "caption": ["x"]}), broken)
    with pytest.raises(DataError, match="not a readable image"):
        open_dataset(broken)[0]


# ---------------------------------------------------------------------------------------------- the loop


def test_loss_falls_and_outputs_a_loadable_pipeline(parquet, tmp_path):
    out = tmp_path / "run"
    train(config(parquet, out, max_steps=40, checkpoint_every=20, validation_every=20,
                 validation_prompts=["a red circle", "a blue circle"], validation_steps=3))
    values = losses(out)
    assert len(values) == 40
    assert np.mean(values[-8:]) < 0.8 * np.mean(values[:4])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(records[0])
    assert (out / "validation" / "step-20.png").is_file() and (out / "validation" / "step-40.png").is_file()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-20", "checkpoint-40"]
    pipe = MeissonicPipeline.from_pretrained(out)
    assert pipe.transformer.config.mask_rate_conditioning == "mask_rate"
    assert pipe.defaults["resolution"] == 64  # samples by default at the size it learnt (the preset says 128)
    code = main(["generate", "a red circle", "--model", str(out), "--out", str(tmp_path / "img"), "--steps", "2",
                 "--seed", "0"])
    assert code == 0
    assert Image.open(tmp_path / "img" / "a-red-circle_0.png").size == (64, 64)


@pytest.mark.exact
def test_resume_repeats_the_uninterrupted_run(parquet, tmp_path):
    kw = dict(max_steps=8, checkpoint_every=3, gradient_accumulation=2, ema_decay=0.9, mixed_precision="bf16",
              lr_scheduler="cosine", warmup_steps=2)
    train(config(parquet, tmp_path / "a", **kw))
    interrupted = tmp_path / "b"
    train(config(parquet, interrupted, **kw))
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-8")  # as if killed after step 6's checkpoint
    shutil.rmtree(interrupted / "transformer")
    train(config(parquet, interrupted, resume="latest", **kw))
    assert losses(tmp_path / "a") == losses(interrupted)
    a = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(interrupted / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_only_adapter_weights(parquet, tiny_folder, tmp_path):
    out = tmp_path / "lora"
    train(config(parquet, out, preset=None, model=str(tiny_folder), lora_rank=4, text_encoder_lora_rank=2,
                 max_steps=4, learning_rate=1e-2))
    text_saved = load_file(out / "checkpoints" / "checkpoint-3" / "text_encoder.safetensors")
    assert text_saved and all("lora_A" in k or "lora_B" in k for k in text_saved)
    assert (out / "lora" / "text_encoder_lora" / "adapter_config.json").is_file()
    saved = load_file(out / "checkpoints" / "checkpoint-3" / "transformer.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    adapter = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert adapter.keys() == saved.keys()
    base = MeissonicPipeline.from_pretrained(tiny_folder)
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    pooled, hidden = base.encode_prompt(["a red circle"])
    plain_text = base.encode_prompt(["a red circle"])[0]
    inputs = dict(hidden_states=torch.full((1, 4, 4), 64), encoder_hidden_states=hidden, pooled_projections=pooled,
                  micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]), timestep=torch.tensor([1.0]))
    with torch.no_grad():
        plain = base.transformer(**inputs)
        base.load_lora(out / "lora")
        with_lora = base.transformer(**inputs)
    assert (plain - with_lora).abs().max() > 1e-3
    assert all(p.data_ptr() % 64 == 0 for p in [*base.transformer.parameters(), *base.text_encoder.parameters()])
    assert (base.encode_prompt(["a red circle"])[0] - plain_text).abs().max() > 1e-4  # text adapter loaded too
    base.transformer.disable_lora()
    after = {k.replace(".base_layer", ""): v for k, v in base.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fine_tuning_a_released_layout_keeps_its_convention(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, (image, caption) in enumerate(shape_images(4)):
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    out = tmp_path / "ft"
    train(config(data, out, preset=None, model=str(FIXTURES / "reference-pipeline" / "nods"), max_steps=2,
                 resolution=32, batch_size=2, train_text_encoder=True, gradient_checkpointing=True))
    pipe = MeissonicPipeline.from_pretrained(out)
    assert pipe.transformer.config.mask_rate_conditioning == "step_index"
    released = MeissonicPipeline.from_pretrained(FIXTURES / "reference-pipeline" / "nods")
    trained_te = pipe.text_encoder.state_dict()
    assert any(not torch.equal(v, trained_te[k]) for k, v in released.text_encoder.state_dict().items())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(parquet, tmp_path, monkeypatch):
    import meissonic.training.train as loop

    real = loop.masked_cross_entropy
    calls = []

    def poisoned(logits, labels):
        calls.append(1)
        value = real(logits, labels)
        return value * float("nan") if len(calls) > 4 else value

    monkeypatch.setattr(loop, "masked_cross_entropy", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became nan at step 5"):
        train(config(parquet, out, max_steps=8, checkpoint_every=3))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-3"]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    def write(tag):
        return lambda folder: (folder / "weights.bin").write_text(tag)

    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, write(str(step)), {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    def dies(folder):
        (folder / "weights.bin").write_text("half")
        raise KeyboardInterrupt  # killed while saving

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, dies, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-3"
    assert (tmp_path / "checkpoint-3" / "weights.bin").read_text() == "3"
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("extra,message", [
    (["--resolution", "60"], "--resolution 60: must be a multiple of 16"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--cond-dropout", "2"], "--cond-dropout and --min-mask-rate must lie in [0, 1]"),
    (["--preset", "huge"], "preset 'huge' is not one of"),
    (["--caption-column", "text"], "has no column 'text'"),
    (["--text-encoder-lr", "1e-4"], "--text-encoder-lr goes with --train-text-encoder"),
    (["--train-text-encoder", "--text-encoder-lr", "0"], "--text-encoder-lr 0.0: must be positive"),
])
def test_bad_train_options_exit_2(capsys, parquet, tmp_path, extra, message):
    argv = ["train", "--data", str(parquet), "--out", str(tmp_path / "o"), "--preset", "tiny", "--max-steps", "1",
            "--resolution", "32", *extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_train_command_without_model_or_preset(capsys, parquet, tmp_path):
    assert main(["train", "--data", str(parquet), "--out", str(tmp_path / "o")]) == 2
    assert "give --model" in capsys.readouterr().err


def test_two_process_ddp_on_cpu(parquet, tmp_path):
    """torchrun with 2 gloo ranks: both train in step (DDP), rank 0 alone writes checkpoints and the model."""
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "meissonic", "train", "--data", str(parquet), "--out", str(out), "--preset", "tiny",
           "--resolution", "32", "--batch-size", "2", "--max-steps", "4", "--checkpoint-every", "2",
           "--log-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["processes"] == 2 for r in records)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    MeissonicPipeline.from_pretrained(out)


def test_pre_encoding_cache_is_built_once_reused_and_checked(parquet, tmp_path):
    from meissonic.training.cache import EncodedCache, cache_identity, fingerprint
    from meissonic.training.data import prepare_image as prep
    from meissonic.vq import encode_image

    cache = tmp_path / "cache"
    out = tmp_path / "cached"
    train(config(parquet, out, cache=cache, center_crop=True, max_steps=30, checkpoint_every=30))
    values = losses(out)
    assert np.mean(values[-6:]) < 0.8 * np.mean(values[:3])
    stamp = (cache / "cache.json").stat().st_mtime_ns
    train(config(parquet, tmp_path / "again", cache=cache, center_crop=True, max_steps=2))
    assert (cache / "cache.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(TrainingError, match="resolution differ"):
        train(config(parquet, tmp_path / "other", cache=cache, center_crop=True, resolution=32, max_steps=1))
    trained_text = tmp_path / "te"  # tokens from the cache, text encoded live (the encoder is being trained)
    train(config(parquet, trained_text, cache=cache, center_crop=True, train_text_encoder=True, max_steps=2))
    train(config(parquet, trained_text, cache=cache, center_crop=True, train_text_encoder=True, max_steps=4,
                 resume="latest"))  # the resumed text encoder differs from the cache's; its outputs are not used
    assert len(losses(trained_text)) == 4
    pipe = MeissonicPipeline.from_pretrained(out)  # same VQ and text encoder as the preset run
    identity = cache_identity(str(parquet), 64, True, 0, 32, fingerprint(pipe.vqvae), fingerprint(pipe.text_encoder))
    stored = EncodedCache(cache, identity)
    sample = open_dataset(parquet)[5]
    tokens = encode_image(pipe.vqvae, prep(sample.image, 64, center=True)[0][None])
    assert torch.equal(stored[5][0].long(), tokens[0])
    half = tmp_path / "bf16-cache"  # built under the run's bf16 autocast: integer tokens stay integers
    train(config(parquet, tmp_path / "bf16", cache=half, center_crop=True, mixed_precision="bf16", max_steps=1))
    assert EncodedCache(half, json.loads((half / "cache.json").read_text()))[5][0].dtype == torch.int32


def test_train_with_a_tokenizer_from_train_vq(parquet, tmp_path):
    from meissonic.training.vq_train import VQTrainConfig, train_vq

    train_vq(VQTrainConfig(data=str(parquet), out=tmp_path / "vq", preset="tiny", resolution=64, batch_size=4,
                           max_steps=3, progress=False))
    out = tmp_path / "run"
    train(config(parquet, out, vqvae=str(tmp_path / "vq"), max_steps=2))
    trained = load_file(tmp_path / "vq" / "vqvae" / "diffusion_pytorch_model.safetensors")
    used = load_file(out / "vqvae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(trained[k], used[k]) for k in trained)
    with pytest.raises(TrainingError, match="codebook_size=64 does not match vqvae num_vq_embeddings=100"):
        train(config(parquet, tmp_path / "bad", vqvae=str(FIXTURES / "reference-pipeline" / "ds" / "vqvae")))


def test_real_datasets_save_to_disk_folder(parquet, tmp_path):
    """With the `datasets` package installed: its own save_to_disk output (Image feature, DatasetDict) reads."""
    datasets = pytest.importorskip("datasets")
    images = [img for img, _ in shape_images(6)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": [f"c{i}" for i in range(6)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    for folder in ("one", "dict"):
        data = open_dataset(tmp_path / folder)
        assert len(data) == 6 and data[4].caption == "c4" and data[4].image.size == (80, 64)


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(parquet, tmp_path):
    pytest.importorskip("peft")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match="--use-8bit-adam needs bitsandbytes"):
        train(config(parquet, tmp_path / "o", use_8bit_adam=True, max_steps=1))


def test_ema_covers_a_trained_text_encoder(parquet, tmp_path):
    # the final model pairs the EMA transformer with the EMA text encoder, not with the last raw encoder weights
    out = tmp_path / "ema-te"
    train(config(parquet, out, max_steps=3, checkpoint_every=3, ema_decay=0.9, train_text_encoder=True))
    raw = load_file(out / "checkpoints" / "checkpoint-3" / "text_encoder.safetensors")
    final = MeissonicPipeline.from_pretrained(out).text_encoder.state_dict()
    from meissonic.presets import build_pipeline

    start = build_pipeline("tiny", seed=0).text_encoder.state_dict()
    moved = [k for k in raw if not torch.equal(raw[k], start[k])]
    assert moved
    assert all(not torch.equal(final[k], raw[k]) and not torch.equal(final[k], start[k]) for k in moved)


def test_text_encoder_lr_sets_how_fast_the_text_encoder_moves(parquet, tmp_path):
    """Its own learning rate: at 1e-9 the text encoder stays put while the transformer (3e-3) moves."""
    from meissonic.presets import build_pipeline

    start = build_pipeline("tiny", seed=0)
    out = tmp_path / "slow-text"
    train(config(parquet, out, max_steps=3, checkpoint_every=3, train_text_encoder=True, text_encoder_lr=1e-9))
    ckpt = out / "checkpoints" / "checkpoint-3"
    text = load_file(ckpt / "text_encoder.safetensors")
    text_start = start.text_encoder.state_dict()
    assert max((text[k].float() - text_start[k].float()).abs().max().item() for k in text) < 1e-6
    moved = load_file(ckpt / "transformer.safetensors")
    begun = start.transformer.state_dict()
    assert max((moved[k].float() - begun[k].float()).abs().max().item() for k in moved) > 1e-3
    groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["initial_lr"] for g in groups] == [3e-3, 1e-9]
