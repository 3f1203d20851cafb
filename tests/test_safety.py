"""Untrusted checkpoints: safetensors only by default; pickle only when allowed, and then never executed."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from meissonic.cli import main
from meissonic.loading import ModelFolderError
from meissonic.pipeline import MeissonicPipeline


def pickled_copy(tiny_folder, tmp_path, payload=None):
    """A copy of the tiny model whose transformer weights are a pickle file (`payload` instead of them if given)."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(payload if payload is not None else load_file(weights), folder / "transformer" /
               "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_weights_are_refused_unless_allowed_and_then_load_the_same(tiny_folder, tmp_path):
    folder = pickled_copy(tiny_folder, tmp_path)
    with pytest.raises(ModelFolderError, match="only pickle weights .diffusion_pytorch_model.bin."):
        MeissonicPipeline.from_pretrained(folder)
    allowed = MeissonicPipeline.from_pretrained(folder, allow_pickle=True)
    reference = MeissonicPipeline.from_pretrained(tiny_folder)
    for (name, a), (_, b) in zip(allowed.transformer.state_dict().items(), reference.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_hostile_pickle_never_runs(tiny_folder, tmp_path):
    marker = tmp_path / "pwned"
    folder = pickled_copy(tiny_folder, tmp_path, payload={"x": RunsCode(marker)})
    with pytest.raises(ModelFolderError):
        MeissonicPipeline.from_pretrained(folder)  # refused before any file is read
    with pytest.raises(Exception):
        MeissonicPipeline.from_pretrained(folder, allow_pickle=True)  # weights_only refuses the payload
    assert not marker.exists()


def test_cli_refuses_pickle_with_one_line_and_allows_it_on_request(capsys, tiny_folder, tmp_path):
    folder = pickled_copy(tiny_folder, tmp_path)
    argv = ["generate", "x", "--model", str(folder), "--out", str(tmp_path / "o"), "--steps", "1",
            "--width", "32", "--height", "32", "--seed", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only pickle weights" in err and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(argv + ["--allow-pickle"]) == 0
    assert (tmp_path / "o" / "x_0.png").is_file()


def test_a_component_without_weights_is_named(tiny_folder, tmp_path):
    folder = tmp_path / "empty"
    shutil.copytree(tiny_folder, folder)
    (folder / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="vqvae.* holds no weights"):
        MeissonicPipeline.from_pretrained(folder)


def test_convert_turns_pickle_weights_into_safetensors(capsys, tiny_folder, tmp_path):
    folder = pickled_copy(tiny_folder, tmp_path)
    out = tmp_path / "safe"
    assert main(["convert", "--model", str(folder), "--out", str(out), "--dtype", "fp32"]) == 2
    assert "only pickle weights" in capsys.readouterr().err and not out.exists()
    assert main(["convert", "--model", str(folder), "--out", str(out), "--dtype", "fp32", "--allow-pickle"]) == 0
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    MeissonicPipeline.from_pretrained(out)  # loads with the default: safetensors only


def _edit_config(folder, part, **changes):
    import json

    path = folder / part / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "part, changes, message",
    [
        ("transformer", {"codebook_size": 50}, "config field codebook_size"),
        ("transformer", {"vocab_size": 99}, "config field vocab_size"),
        ("transformer", {"num_layers": 3}, "config field num_layers"),
        ("transformer", {"mystery_knob": 1}, "unknown field(s) mystery_knob"),
        ("vqvae", {"use_magic": True}, "unknown field(s) use_magic"),
        ("vqvae", {"num_vq_embeddings": 128}, "config field num_vq_embeddings"),
        ("text_encoder", {"projection_dim": 16}, "config field projection_dim"),
        ("transformer", {"pooled_projection_dim": 7}, "pooled_projection_dim=7 must equal"),
    ],
)
def test_configs_that_contradict_their_weights_are_refused_before_loading(tiny_folder, tmp_path, part, changes,
                                                                          message):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_folder, folder)
    _edit_config(folder, part, **changes)
    with pytest.raises(ModelFolderError) as refused:
        MeissonicPipeline.from_pretrained(folder)
    assert message in str(refused.value)
    # raised by the checks that read only config.json and the safetensors header (meta-device model), never by a
    # library while loading weights
    assert str(refused.value).startswith((f"{part}: ", f"{part}/config.json", repr(str(folder / part / "config.json"))))
