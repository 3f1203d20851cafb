"""The demo model shipped in the package: the default of every command, offline and small.

Its full scores (150 prompts) are in the README; here a fixed prompt set checks, through the real loading and
sampling code, that what ships still draws the asked colours in the asked places, and edits as it should.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic import MeissonicPipeline
from meissonic.cli import main
from meissonic.edit import image_tokens, img2img, inpaint, outpaint, token_mask
from meissonic.evaluate import pipeline_images, run_eval
from meissonic.judge import analyze, parse_prompt
from meissonic.loading import demo_model_folder, resolve_model_folder
from meissonic.shapes import render

MiB = 2**20


def test_the_demo_ships_in_the_package_in_the_released_layout_and_fits_25_mb():
    folder = demo_model_folder()
    assert resolve_model_folder("demo") == folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["src.transformer", "Transformer2DModel"]  # the released model_index
    assert index["_meissonic_defaults"]["resolution"] == 128 and index["_meissonic_defaults"]["steps"] == 12
    for part in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25 * MiB, f"{size / MiB:.1f} MiB"
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["downsample"] and config["upsample"]  # the 2x feature compression of Meissonic


def test_a_local_folder_named_demo_wins_over_the_shipped_model(tmp_path, monkeypatch, tiny_folder):
    monkeypatch.chdir(tmp_path)
    os.symlink(tiny_folder, tmp_path / "demo")
    assert resolve_model_folder("demo") == Path("demo")


@pytest.fixture(scope="module")
def demo_pipe():
    pipe = MeissonicPipeline.from_pretrained("demo", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_demo_loads_as_float32_from_half_precision_files(demo_pipe):
    assert {p.dtype for p in demo_pipe.transformer.parameters()} == {torch.float32}
    assert {p.dtype for p in demo_pipe.text_encoder.parameters()} == {torch.float32}
    assert demo_pipe.defaults["resolution"] == 128


def test_the_demo_draws_what_the_prompt_says(demo_pipe):
    # 12 prompts per category with the shipped defaults (the README has the 50-per-category figures). Single objects
    # and pairs it draws right most of the time; held-out colour-shape pairs often come out in a shape it knows for
    # that colour (issue 4 stays open for that). The bars sit well under what it scores (single fully right 11/12,
    # pairs fully right 8/12, relation 12/12, held-out colour 8/12) so a machine whose floats differ cannot fail them
    # by luck, yet the last model (fully right 4/12 and 1/12 of pairs) would.
    result = run_eval(pipeline_images(demo_pipe, None, None, seed=0), num=12, seed=0)
    summary = result["summary"]
    assert summary["single"]["colour"] >= 10 / 12, summary
    assert summary["single"]["position"] >= 10 / 12, summary
    assert summary["single"]["fully_right"] >= 8 / 12, summary
    assert summary["two objects"]["relation"] >= 9 / 12, summary
    assert summary["two objects"]["fully_right"] >= 5 / 12, summary
    assert summary["held-out"]["colour"] >= 5 / 12, summary


def test_the_demo_edits_keep_what_is_not_masked_and_draw_what_is(demo_pipe):
    scene = parse_prompt("a large blue square on the left, on a white background")
    source = render(scene, 128)
    mask = np.zeros((128, 128), dtype=bool)
    mask[32:96, 72:] = True  # the right part, where the square is not
    kept = ~token_mask(mask, demo_pipe.vae_scale_factor)
    original = image_tokens(demo_pipe, source)[0]
    found = []
    for seed in range(3):
        out = inpaint(demo_pipe, "a large blue square to the left of a large red circle, on a white background",
                      source, mask, generator=torch.Generator().manual_seed(seed))
        result = np.asarray(out.images[0])
        assert np.array_equal(result[:, :64], np.asarray(source)[:, :64])  # far from the mask: the input's pixels
        assert torch.equal(out.tokens[0][kept], original[kept])
        found.append({(f.colour, f.position) for f in analyze(out.images[0])[1]})
    assert sum(("blue", "left") in f for f in found) == 3, found  # the square is still there
    assert sum(("red", "right") in f for f in found) >= 2, found  # and the new object was drawn where asked

    same = img2img(demo_pipe, "a large red circle on the left", source, strength=0.0)
    assert torch.equal(same.tokens[0], original) and not same.masked.any()
    redrawn = img2img(demo_pipe, "a large red circle on the left", source, strength=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert redrawn.masked.all()
    assert ("red", "left") in {(f.colour, f.position) for f in analyze(redrawn.images[0])[1]}

    wider = outpaint(demo_pipe, "a large blue square to the left of a large green circle", source, right=64,
                     generator=torch.Generator().manual_seed(0))
    assert wider.images[0].size == (192, 128)
    assert np.array_equal(np.asarray(wider.images[0])[:, :120], np.asarray(source)[:, :120])


def test_generate_without_model_uses_the_demo_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "meissonic", "generate", "a large red circle on the left",
                           "--seed", "0", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "a-large-red-circle-on-the-left_0.png"
    assert done.stdout.strip() == f"wrote {path}"
    image = Image.open(path)
    assert image.size == (128, 128)
    assert json.loads(image.text["parameters"])["model"] == "demo"


def test_convert_writes_a_half_precision_copy_and_refuses_an_existing_folder(capsys, tiny_folder, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "half"
    assert main(["convert", "--model", str(tiny_folder), "--out", str(out), "--dtype", "fp16"]) == 0
    assert "fp16" in capsys.readouterr().out
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    back = MeissonicPipeline.from_pretrained(out, torch_dtype=torch.float32)
    original = MeissonicPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    for (name, a), (_, b) in zip(back.transformer.named_parameters(), original.transformer.named_parameters()):
        torch.testing.assert_close(a, b.half().float(), msg=name)
    assert main(["convert", "--model", str(tiny_folder), "--out", str(out), "--dtype", "fp16"]) == 2
    assert "exists" in capsys.readouterr().err


def test_the_half_precision_demo_loads_whole_in_float32_without_a_dtype():
    pipe = MeissonicPipeline.from_pretrained("demo")  # no torch_dtype: float32 for every part (was mixed)
    pipe.set_progress_bar_config(disable=True)
    assert {p.dtype for m in (pipe.transformer, pipe.text_encoder, pipe.vqvae) for p in m.parameters()} == {
        torch.float32}
    assert pipe("a large red circle on the left", num_inference_steps=2).images[0].size == (128, 128)
