"""The `meissonic` command as a user runs it: init, generate, PNG metadata, and clear errors on bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from meissonic.cli import main
from meissonic.outputs import slug


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, model, out, *extra):
    return run(capsys, "generate", "a red circle on the left", "--model", model, "--out", out, "--steps", 3,
               "--width", 64, "--height", 48, *extra)


def test_generate_writes_png_with_parameters(capsys, tiny_folder, tmp_path):
    code, out, err = generate(capsys, tiny_folder, tmp_path, "--seed", 7, "--negative-prompt", "blurry")
    assert code == 0, err
    path = tmp_path / "a-red-circle-on-the-left_7.png"
    assert out.strip() == f"wrote {path}"
    image = Image.open(path)
    assert image.size == (64, 48)
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "a red circle on the left" and image.text["prompt"] == "a red circle on the left"
    assert params["negative_prompt"] == "blurry" and params["seed"] == 7 and params["steps"] == 3
    assert params["guidance_scale"] == 9.0 and params["width"] == 64 and params["height"] == 48
    assert params["model"] == str(tiny_folder) and params["dtype"] == "float32"
    assert params["temperature"] == [2.0, 0.0] and params["schedule"] == "cosine"


def test_fewer_passes_options_reach_the_pipeline_and_the_png(capsys, tiny_folder, tmp_path, monkeypatch):
    from meissonic.pipeline import MeissonicPipeline

    seen = []
    call = MeissonicPipeline.__call__
    monkeypatch.setattr(MeissonicPipeline, "__call__", lambda self, **kw: seen.append(kw) or call(self, **kw))
    code, _, err = generate(capsys, tiny_folder, tmp_path, "--seed", 1, "--guidance-interval", 0.25, 0.75,
                            "--guidance-ramp", "--order", "halton", "--schedule", "arccos")
    assert code == 0, err
    assert seen[0]["guidance_interval"] == (0.25, 0.75) and seen[0]["guidance_ramp"] is True
    assert seen[0]["order"] == "halton" and seen[0]["masking_schedule"] == "arccos"
    params = json.loads(Image.open(tmp_path / "a-red-circle-on-the-left_1.png").text["parameters"])
    assert params["guidance_interval"] == [0.25, 0.75] and params["guidance_ramp"] is True
    assert params["order"] == "halton" and params["schedule"] == "arccos"


@pytest.mark.parametrize("values", [("0.5", "0.5"), ("-0.1", "0.5"), ("0.2", "1.5")])
def test_a_bad_guidance_interval_is_one_line(capsys, tiny_folder, tmp_path, values):
    code, _, err = generate(capsys, tiny_folder, tmp_path, "--guidance-interval", *values)
    assert code == 2 and "--guidance-interval" in err and "needs 0 <= START < END <= 1" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.exact
def test_same_seed_same_image_and_no_overwrite(capsys, tiny_folder, tmp_path):
    assert generate(capsys, tiny_folder, tmp_path, "--seed", 3)[0] == 0
    first = tmp_path / "a-red-circle-on-the-left_3.png"
    before = first.read_bytes()
    code, out, _ = generate(capsys, tiny_folder, tmp_path, "--seed", 3)
    assert code == 0
    second = tmp_path / "a-red-circle-on-the-left_3_1.png"
    assert out.strip() == f"wrote {second}"
    assert first.read_bytes() == before
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_num_images_and_prompts_file(capsys, tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n", encoding="utf-8")
    code, out, err = run(capsys, "generate", "--prompts-file", prompts, "--model", tiny_folder, "--out",
                         tmp_path / "o", "--steps", 2, "--num-images", 2, "--seed", 10, "--width", 32, "--height", 32)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["a-cat_10.png", "a-cat_11.png", "a-dog_12.png", "a-dog_13.png"]


def test_model_defaults_apply(capsys, tiny_folder, tmp_path):
    code, _, err = run(capsys, "generate", "x", "--model", tiny_folder, "--out", tmp_path, "--seed", 0)
    assert code == 0, err
    image = Image.open(tmp_path / "x_0.png")
    assert image.size == (128, 128) and json.loads(image.text["steps"]) == 8


def test_init_refuses_existing_folder_and_keeps_it_with_exist_ok(capsys, tmp_path):
    target = tmp_path / "m"
    assert run(capsys, "init", "--preset", "tiny", "--out", target)[0] == 0
    stamp = (target / "transformer" / "config.json").stat().st_mtime_ns
    code, _, err = run(capsys, "init", "--preset", "tiny", "--out", target)
    assert code == 2 and "exists" in err
    code, out, _ = run(capsys, "init", "--preset", "tiny", "--out", target, "--exist-ok")
    assert code == 0 and "kept" in out
    assert (target / "transformer" / "config.json").stat().st_mtime_ns == stamp
    code, _, err = run(capsys, "init", "--preset", "huge", "--out", tmp_path / "h")
    assert code == 2 and "preset 'huge' is not one of" in err


def _bad_model(tmp_path, tiny_folder):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    (bad / "transformer" / "config.json").write_text('{"num_layers": "many"')
    return bad


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--width", "100"], "--width 100: must be a positive multiple of 16"),
        (["--height", "8"], "--height 8: must be a positive multiple of 16"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--num-images", "0"], "--num-images 0: must be at least 1"),
        (["--guidance", "-1"], "--guidance -1.0: must be a finite number >= 0"),
        (["--guidance", "nan"], "--guidance nan: must be a finite number >= 0"),
        (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 on CPU"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--device", "toaster"], "--device 'toaster'"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, tiny_folder, tmp_path, extra, message):
    if extra[-1] == "cuda:7":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    code, out, err = run(capsys, "generate", "x", "--model", tiny_folder, "--out", tmp_path / "o", *extra)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_model_folders(capsys, tiny_folder, tmp_path):
    code, _, err = run(capsys, "generate", "x", "--model", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "generate", "x", "--model", _bad_model(tmp_path, tiny_folder), "--out", tmp_path / "o")
    assert code == 2 and "config.json' cannot be read" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "generate", "x", "--model", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "no model_index.json" in err


def test_bad_prompts(capsys, tiny_folder, tmp_path):
    code, _, err = run(capsys, "generate", "--model", tiny_folder, "--out", tmp_path)
    assert code == 2 and "give a PROMPT or --prompts-file" in err
    code, _, err = run(capsys, "generate", "--prompts-file", tmp_path / "none.txt", "--model", tiny_folder)
    assert code == 2 and "cannot read prompts file" in err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run(capsys, "generate", "--prompts-file", binary, "--model", tiny_folder)
    assert code == 2 and "cannot read prompts file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    code, _, err = run(capsys, "generate", "--prompts-file", empty, "--model", tiny_folder)
    assert code == 2 and "holds no prompt" in err


def test_out_that_is_a_file_is_not_touched(capsys, tiny_folder, tmp_path):
    target = tmp_path / "file.png"
    target.write_bytes(b"precious")
    code, _, err = generate(capsys, tiny_folder, target)
    assert code == 2 and "not a folder" in err
    assert target.read_bytes() == b"precious"


def test_slug_is_safe():
    assert slug("../../etc/passwd") == "etc-passwd"
    assert slug("日本語") == "image"
    assert len(slug("word " * 100)) <= 60


def test_console_script_fails_cleanly(tmp_path):
    """The installed entry point, in a fresh process: exit 2, one line, no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "meissonic", "generate", "x", "--model", str(tmp_path / "no")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_ui_without_gradio_says_how_to_install_it(capsys, tiny_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    monkeypatch.delitem(sys.modules, "meissonic.ui", raising=False)
    code, _, err = run(capsys, "ui", "--model", tiny_folder)
    assert code == 2 and "pip install 'meissonic[ui]'" in err and len(err.strip().splitlines()) == 1
