"""One-step students (`meissonic.one_step`): sampled exactly as the published procedure, seeds per image, the mode
saved with the folder, `--transformer` and `--one-step` on the command line, edits refused with a clear line."""

import json
import math

import pytest
import torch
from PIL import Image

from meissonic.cli import main
from meissonic.one_step import OneStep, filter_logits
from meissonic.pipeline import MeissonicPipeline
from meissonic.presets import build_pipeline
from meissonic.transformer import MeissonicTransformer


@pytest.fixture(scope="module")
def pipe():
    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def published_one_step(pipe, prompt: str, seed: int, plan: OneStep, size: int = 128) -> torch.Tensor:
    """The Di[M]O script's procedure, step by step, on the global generator (one image): random ids, a fixed count
    masked by a random permutation, timestep long(ratio) * 1000, embedding noise mixed in after the embedding layer,
    temperature, top-k, top-p, one categorical draw per position."""
    model, config = pipe.transformer, pipe.transformer.config
    grid = size // pipe.vae_scale_factor
    n, mask_id = grid * grid, pipe.scheduler.config.mask_token_id
    pooled, hidden = pipe.encode_prompt([prompt], torch.device("cpu"))
    torch.manual_seed(seed)
    code = torch.randint(0, config.codebook_size, (1, grid, grid))
    count = torch.tensor(n * plan.mask_ratio).round().clamp(min=1)
    mask = (torch.rand(1, n).argsort(dim=-1) < count).reshape(1, grid, grid)
    code[mask] = mask_id
    dim = config.num_attention_heads * config.attention_head_dim
    p = plan.embedding_noise
    noise = torch.randn(1, dim, grid, grid) if p > 0 else None  # drawn only when mixed in, as the script does

    def perturb(module, inputs, output):  # at the published place: the embedding layer's output
        return output if noise is None else p * noise + math.sqrt(1 - p**2) * output

    timestep = torch.tensor([plan.mask_ratio], dtype=torch.long) * 1000  # what the script passes: 0
    handle = model.embed.register_forward_hook(perturb)
    try:
        with torch.no_grad():
            logits = model(hidden_states=code, encoder_hidden_states=hidden, pooled_projections=pooled,
                           micro_conds=torch.tensor([[size, size, 0, 0, 6.0]]), timestep=timestep.float())
    finally:
        handle.remove()
    logits = logits.reshape(1, config.codebook_size, -1).permute(0, 2, 1) / plan.temperature  # (1, N, V)
    if plan.top_k > 0:
        logits[logits < torch.topk(logits, plan.top_k, dim=-1).values[..., -1, None]] = -float("inf")
    if plan.top_p > 0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        drop = torch.softmax(ordered, dim=-1).cumsum(-1) > plan.top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits[drop.scatter(-1, order, drop)] = -float("inf")
    draw = torch.distributions.Categorical(probs=torch.softmax(logits, dim=-1)).sample()
    return draw.reshape(1, grid, grid)


@pytest.mark.parametrize("plan", [OneStep(), OneStep(mask_ratio=0.5, embedding_noise=0.3, temperature=0.7, top_k=20),
                                  OneStep(embedding_noise=0.0, top_p=0.8), OneStep(mask_ratio=1.0)])
def test_one_step_is_the_published_procedure(pipe, plan):
    ours = pipe("a red square", one_step=plan, generator=torch.Generator().manual_seed(7), output_type="latent")
    assert pipe.last_work == {"passes": 1.0}
    assert torch.equal(ours.images, published_one_step(pipe, "a red square", 7, plan))


def test_the_embedding_noise_is_the_published_mix_after_the_embedding_layer(pipe):
    model = pipe.transformer
    ids = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    pooled, hidden = pipe.encode_prompt(["x", "y"], torch.device("cpu"))
    noise = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    inputs = dict(hidden_states=ids, encoder_hidden_states=hidden, pooled_projections=pooled,
                  micro_conds=torch.tensor([[128, 128, 0, 0, 6.0]] * 2), timestep=torch.tensor([0.0]))
    seen = []
    handle = model.down_block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        plain = model(**inputs)
        mixed = model(**inputs, embedding_noise=(0.25, noise))
    handle.remove()
    torch.testing.assert_close(seen[1], 0.25 * noise + math.sqrt(1 - 0.25**2) * seen[0], rtol=0, atol=0)
    assert not torch.equal(plain, mixed)


def test_each_image_draws_from_its_own_generator(pipe):
    both = pipe(["a", "b"], one_step=True, output_type="latent",
                generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]).images
    alone = pipe(["b"], one_step=True, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    again = pipe(["a", "b"], one_step=True, output_type="latent",
                 generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]).images
    assert torch.equal(both[1], alone[0]) and torch.equal(both, again) and not torch.equal(both[0], both[1])


def test_filtering_keeps_the_top_k_and_the_top_p_mass():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isinf(filter_logits(logits.clone(), top_k=2)).tolist() == [[False, True, False, True]]
    # 0.5, then 0.3 crosses 0.6: both kept, the rest dropped
    assert torch.isinf(filter_logits(logits.clone(), top_p=0.6)).tolist() == [[False, True, False, True]]
    assert not torch.isinf(filter_logits(logits.clone())).any()


def test_bad_one_step_settings_and_uses_are_refused(pipe):
    for bad in (dict(mask_ratio=1.5), dict(embedding_noise=1.0), dict(temperature=0), dict(top_k=-1),
                dict(top_p=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OneStep(**bad)
    with pytest.raises(ValueError, match="edits use the multi-step sampler"):
        pipe("x", one_step=True, latents=torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="speed, step_cache"):
        pipe("x", one_step=True, speed="fast")
    with pytest.raises(ValueError, match="one_step="):
        pipe("x", one_step="yes")


# ---------------------------------------------------------------------------------------------- folders, CLI


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    """A folder this project writes for a student: its one-step mode recorded."""
    student = build_pipeline("tiny", seed=3)
    student.set_one_step_mode(OneStep(mask_ratio=0.5))
    folder = tmp_path_factory.mktemp("student") / "tiny-1step"
    student.save_pretrained(folder)
    return folder


def test_a_student_folder_samples_in_one_step_without_a_flag(capsys, student_folder, tmp_path):
    loaded = MeissonicPipeline.from_pretrained(student_folder)
    assert loaded.one_step_mode == OneStep(mask_ratio=0.5)
    code, out, err = run(capsys, "generate", "x", "--model", student_folder, "--seed", 4, "--out", tmp_path)
    assert code == 0, err
    params = json.loads(Image.open(next(tmp_path.glob("*.png"))).text["parameters"])
    assert params["one_step"]["mask_ratio"] == 0.5 and params["steps"] == 1 and params["guidance_scale"] is None
    loaded.set_progress_bar_config(disable=True)
    expected = loaded("x", generator=torch.Generator().manual_seed(4)).images[0]
    assert list(Image.open(next(tmp_path.glob("*.png"))).getdata()) == list(expected.getdata())
    code, out, err = run(capsys, "generate", "x", "--model", student_folder, "--multi-step", "--steps", 2,
                         "--out", tmp_path / "multi")
    assert code == 0 and json.loads(Image.open(next((tmp_path / "multi").glob("*.png"))).text["parameters"])[
        "one_step"] is None


def test_cli_transformer_swaps_in_a_transformer_folder(capsys, tiny_folder, tmp_path):
    other = build_pipeline("tiny", seed=5).transformer
    other.save_pretrained(tmp_path / "student" / "transformer")
    code, out, err = run(capsys, "generate", "x", "--model", tiny_folder, "--transformer",
                         tmp_path / "student" / "transformer", "--one-step", "--top-k", 10, "--seed", 2,
                         "--out", tmp_path / "out")
    assert code == 0, err
    pipe = MeissonicPipeline.from_pretrained(tiny_folder, transformer=tmp_path / "student" / "transformer")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, MeissonicTransformer)
    assert torch.equal(pipe.transformer.embed.embeddings.weight, other.embed.embeddings.weight)
    expected = pipe("x", one_step=OneStep(top_k=10), generator=torch.Generator().manual_seed(2)).images[0]
    assert list(Image.open(next((tmp_path / "out").glob("*.png"))).getdata()) == list(expected.getdata())


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--one-step", "--steps", "4"], "--steps: one-step sampling runs one pass"),
    (["generate", "x", "--one-step", "--speed", "fast"], "--speed: one-step sampling runs one pass"),
    (["generate", "x", "--top-k", "5"], "--top-k: one-step options; add --one-step"),
    (["generate", "x", "--one-step", "--mask-ratio", "2"], "mask_ratio=2.0 must lie in [0, 1]"),
    (["generate", "x", "--transformer", "{missing}", "--one-step"], "is not a transformer folder"),
])
def test_cli_bad_one_step_input_exits_2_with_one_line(capsys, tiny_folder, tmp_path, argv, message):
    argv = [a.format(missing=tmp_path / "missing") for a in argv]
    code, out, err = run(capsys, *argv, "--model", tiny_folder, "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_cli_edits_refuse_a_student(capsys, student_folder, tmp_path):
    Image.new("RGB", (64, 48), (10, 120, 40)).save(tmp_path / "photo.png")
    code, out, err = run(capsys, "img2img", "x", "--image", tmp_path / "photo.png", "--model", student_folder,
                         "--out", tmp_path / "o")
    assert code == 2 and "is a one-step student" in err and len(err.strip().splitlines()) == 1, err
