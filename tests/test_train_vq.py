"""`meissonic train-vq`: reconstruction improves, codebook statistics, exact resume, fine-tuning, bad input."""

import json

import pytest
import torch
from diffusers import VQModel

from conftest import FIXTURES
from meissonic.cli import main
from meissonic.training.data import open_dataset
from meissonic.training.train import TrainingError
from meissonic.training.vq_train import (
    VQTrainConfig,
    codebook_stats,
    colour_whitening,
    evaluate_vq,
    hard_pixel_loss,
    rotate_hues,
    train_vq,
    vq_forward,
)
from test_training import parquet  # noqa: F401  (the shared data fixture)


def config(data, out, **kw):
    base = dict(data=str(data), out=out, preset="tiny", resolution=64, batch_size=4, max_steps=40,
                learning_rate=1e-3, log_every=1, checkpoint_every=20, progress=False)
    base.update(kw)
    return VQTrainConfig(**base)


def test_training_reduces_reconstruction_error(parquet, tmp_path):  # noqa: F811
    out = tmp_path / "vq"
    train_vq(config(parquet, out, reset_dead_every=10, disc_weight=0.1, disc_start=20))
    dataset = open_dataset(parquet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = VQModel(**json.loads((out / "vqvae" / "config.json").read_text()))
    before = evaluate_vq(untrained.eval(), dataset, 64, torch.device("cpu"))
    after = json.loads((out / "vq_report.json").read_text())
    assert after["mse"] < 0.5 * before["mse"]
    assert 0 < after["codebook_usage"] <= 1 and after["perplexity"] >= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["disc"] > 0 and {"mse", "psnr", "codebook_usage", "commit"} <= set(records[0])
    VQModel.from_pretrained(out / "vqvae")


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert stats["codebook_usage"] == 0.5 and abs(stats["perplexity"] - 2.0) < 1e-6


def test_resume_repeats_the_uninterrupted_run(parquet, tmp_path):  # noqa: F811
    kw = dict(max_steps=6, checkpoint_every=3, disc_weight=0.1, disc_start=2, reset_dead_every=2, hue_jitter=0.5,
              whitened_weight=0.05, hard_pixel_weight=1.0)
    train_vq(config(parquet, tmp_path / "a", **kw))
    train_vq(config(parquet, tmp_path / "b", **dict(kw, max_steps=3)))
    train_vq(config(parquet, tmp_path / "b", resume="latest", **kw))
    read = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")


def test_fine_tunes_a_pipeline_folders_tokenizer(parquet, tmp_path):  # noqa: F811
    out = tmp_path / "ft"
    train_vq(config(parquet, out, preset=None, model=str(FIXTURES / "reference-pipeline" / "ds"), max_steps=2))
    assert VQModel.from_pretrained(out / "vqvae").config.num_vq_embeddings == 100


def test_images_without_captions_are_enough(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    train_vq(config(tmp_path / "imgs", tmp_path / "out", max_steps=2, batch_size=2))
    assert (tmp_path / "out" / "vqvae" / "config.json").is_file()


def test_bad_options(capsys, parquet, tmp_path):  # noqa: F811
    with pytest.raises(TrainingError, match="give --model"):
        train_vq(config(parquet, tmp_path / "x", preset=None))
    code = main(["train-vq", "--data", str(parquet), "--out", str(tmp_path / "y"), "--preset", "tiny",
                 "--resolution", "40"])
    assert code == 2 and "--resolution 40: must be a multiple of 16" in capsys.readouterr().err
    code = main(["train-vq", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "z"), "--preset", "tiny"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["train-vq", "--data", str(parquet), "--out", str(tmp_path / "z"), "--model", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "no such folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code = main(["train-vq", "--data", str(parquet), "--out", str(tmp_path / "z"), "--model", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load a VQModel" in err and len(err.strip().splitlines()) == 1


def test_crops_and_codebook_init(parquet, tmp_path):  # noqa: F811
    spread = {}
    for init in (False, True):
        out = tmp_path / f"crops-{init}"
        train_vq(config(parquet, out, resolution=64, crop_size=32, init_codebook=init, max_steps=2))
        spread[init] = VQModel.from_pretrained(out / "vqvae").quantize.embedding.weight.std().item()
    assert spread[True] > 5 * spread[False]  # codes taken from encoder outputs, not diffusers' uniform(+-1/K)
    with pytest.raises(TrainingError, match="--crop-size 48: must be a multiple of 16, at most --resolution"):
        train_vq(config(parquet, tmp_path / "x", resolution=32, crop_size=48))


def test_codebook_ema_moves_codes_without_the_optimizer_and_resumes(parquet, tmp_path):  # noqa: F811
    kw = dict(max_steps=4, checkpoint_every=2, codebook_ema=0.9, reset_dead_every=2)
    train_vq(config(parquet, tmp_path / "a", **kw))
    train_vq(config(parquet, tmp_path / "b", **dict(kw, max_steps=2)))
    train_vq(config(parquet, tmp_path / "b", resume="latest", **kw))
    read = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = VQModel(**json.loads((tmp_path / "a" / "vqvae" / "config.json").read_text()))
    trained = VQModel.from_pretrained(tmp_path / "a" / "vqvae")
    assert not torch.equal(start.quantize.embedding.weight, trained.quantize.embedding.weight)


def test_hue_rotation_keeps_greys_and_brightness_and_moves_colours():
    rgb = torch.tensor([[220, 20, 20], [128, 128, 128], [255, 255, 255], [0, 0, 0]], dtype=torch.float32) / 255
    images = rgb.T.reshape(1, 3, 2, 2).repeat(8, 1, 1, 1)
    rotated = rotate_hues(images, 1.0, torch.Generator().manual_seed(0))
    pixels = rotated.permute(0, 2, 3, 1).reshape(8, 4, 3)
    assert torch.allclose(pixels[:, 1:], rgb[1:].expand(8, 3, 3), atol=1e-5)  # grey, white, black unchanged
    assert (pixels[:, 0] - rgb[0]).abs().max(dim=1).values.min() > 0.05  # the red moved in every image
    assert torch.equal(rotate_hues(images, 0.0, torch.Generator().manual_seed(0)), images)
    again = rotate_hues(images, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(rotated, again)


def test_whitening_and_hard_pixel_terms(parquet):  # noqa: F811
    dataset = open_dataset(parquet)
    whiten = colour_whitening(dataset, 64)
    from meissonic.training.data import load_images

    images = load_images(dataset, list(range(len(dataset)))[:64], 64, None, True)[0]
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1)
    white = whiten @ pixels
    assert torch.allclose(torch.cov(white), torch.eye(3), atol=0.05)  # every colour direction has unit variance
    recon = images.clone()
    recon[:, :, :4, :4] += 0.5  # 16 wrong pixels out of 4096 per image
    assert hard_pixel_loss(recon, images, 16 / 4096).item() == pytest.approx(1.5, abs=1e-5)
    assert hard_pixel_loss(recon, images, 32 / 4096).item() == pytest.approx(0.75, abs=1e-5)


@pytest.mark.exact
def test_quantizer_loss_moves_codes_fully_and_the_encoder_by_the_commitment():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vq = VQModel(**json.loads((FIXTURES / "reference-pipeline" / "nods" / "vqvae" / "config.json").read_text()))
    images = torch.rand(2, 3, 32, 32)
    _, loss, indices, latents = vq_forward(vq, images, commitment=0.25)
    codes = vq.quantize.embedding.weight[indices]
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    assert loss.item() == pytest.approx(1.25 * torch.nn.functional.mse_loss(codes, flat).item(), rel=1e-5)
    assert torch.equal(indices, vq.quantize(latents)[2][2])  # the codes inference picks
