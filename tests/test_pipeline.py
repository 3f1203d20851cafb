"""The text-to-image pipeline: reference parity, the released layout, sizes, outputs, callbacks, errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from meissonic import MeissonicPipeline
from meissonic.loading import ModelFolderError
from meissonic.vq import decode_tokens

REFERENCE = FIXTURES / "reference-pipeline"


def load(folder, **kw):
    pipe = MeissonicPipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["ds", "nods"])
def reference(request):
    return request.param, load(REFERENCE / request.param)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load(tiny_folder)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.exact
def test_reference_cases_give_reference_tokens_and_image(reference):
    kind, pipe = reference
    cases = json.loads((REFERENCE / kind / "cases.json").read_text())
    expected = np.load(REFERENCE / kind / "expected.npz")
    for i, case in enumerate(cases):
        tokens = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            guidance_scale=case["guidance_scale"],
            micro_conditioning_aesthetic_score=case["aesthetic_score"],
            height=case["height"],
            width=case["width"],
            num_inference_steps=case["steps"],
            latents=torch.from_numpy(expected["latents"]),
            generator=seeded(0),
            output_type="latent",
        ).images
        certain = expected[f"case{i}.certain"]
        assert certain.mean() > 0.9
        assert np.array_equal(tokens.numpy()[certain], expected[f"case{i}.tokens"][certain])
        image = decode_tokens(pipe.vqvae, torch.from_numpy(expected[f"case{i}.tokens"]))
        image = image.permute(0, 2, 3, 1)[0].numpy()
        assert np.abs(image - expected[f"case{i}.image"]).max() <= 2 / 255


def test_components_have_the_released_names(reference):
    _, pipe = reference
    for name in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(pipe, name) is not None
    assert pipe.scheduler.config.mask_token_id == pipe.transformer.mask_token_id
    assert pipe.transformer.config.mask_rate_conditioning == "step_index"  # released: the reference's convention


@pytest.mark.exact
def test_save_pretrained_writes_released_layout_and_reloads(reference, tmp_path):
    kind, pipe = reference
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    released = json.loads((REFERENCE / kind / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        k: v for k, v in released.items() if not k.startswith("_")
    }
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "tokenizer" / name).is_file()
    again = load(tmp_path)
    kw = dict(prompt="a red circle", height=64, width=48, num_inference_steps=3, output_type="latent")
    assert torch.equal(pipe(**kw, generator=seeded(1)).images, again(**kw, generator=seeded(1)).images)


@pytest.mark.parametrize("height,width", [(256, 192), (48, 80), (16, 16), (1040, 64)])
def test_sizes_the_reference_cannot_handle(reference, height, width):
    _, pipe = reference
    images = pipe("a blue square", height=height, width=width, num_inference_steps=2, generator=seeded(0),
                  output_type="np").images
    assert images.shape == (1, height, width, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.exact
def test_output_types(tiny):
    kw = dict(prompt="x", num_inference_steps=2, height=64, width=32)
    pil = tiny(**kw, generator=seeded(0)).images
    assert isinstance(pil, list) and pil[0].size == (32, 64)
    arr = tiny(**kw, generator=seeded(0), output_type="np").images
    assert arr.shape == (1, 64, 32, 3)
    pt = tiny(**kw, generator=seeded(0), output_type="pt").images
    assert pt.shape == (1, 3, 64, 32)
    tokens = tiny(**kw, generator=seeded(0), output_type="latent").images
    assert tokens.shape == (1, 4, 2) and tokens.dtype == torch.long
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    out = tiny(**kw, generator=seeded(0), return_dict=False)
    assert isinstance(out, tuple) and len(out[0]) == 1


def test_model_defaults_used_when_size_and_steps_unset(tiny):
    steps = []
    images = tiny("x", generator=seeded(0), callback=lambda i, t, lat: steps.append(i)).images
    assert images[0].size == (tiny.defaults["resolution"],) * 2
    assert steps == list(range(tiny.defaults["steps"]))


@pytest.mark.exact
def test_same_seed_same_image_and_generator_per_image(tiny):
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=4, height=64, width=64, output_type="latent")
    a = tiny(**kw, generator=seeded(3)).images
    b = tiny(**kw, generator=seeded(3)).images
    assert torch.equal(a, b)
    # An image depends on its own generator only: another seed for its neighbour leaves it as it was. Exact on any
    # CPU, since the batch keeps its shape, so each row goes through the same kernels. (A batch of another size may
    # round differently in the last bits, which can flip a near-tie draw: that comparison is the CLI's batching test.)
    per_image = tiny(**kw, generator=[seeded(5), seeded(6)]).images
    other_neighbour = tiny(**kw, generator=[seeded(7), seeded(6)]).images
    assert torch.equal(per_image[1], other_neighbour[1])
    assert not torch.equal(per_image[0], other_neighbour[0])


def test_num_images_per_prompt_orders_like_the_reference(tiny):
    out = tiny(["a", "b"], num_images_per_prompt=3, num_inference_steps=1, height=32, width=32,
               generator=[seeded(i) for i in range(6)], output_type="latent").images
    assert out.shape[0] == 6


def test_conditioning_is_computed_once_per_generation(tiny, monkeypatch):
    calls = []
    original = tiny.transformer.encode_conditions

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(tiny.transformer, "encode_conditions", counting)
    tiny("x", num_inference_steps=5, height=32, width=32, generator=seeded(0))
    assert len(calls) == 1


def _capture_transformer_inputs(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].clone())),
        with_kwargs=True,
    )
    return seen, handle


def test_guidance_off_runs_one_branch_and_on_runs_two(tiny):
    seen, handle = _capture_transformer_inputs(tiny)
    try:
        tiny("x", num_inference_steps=2, height=32, width=32, guidance_scale=1.0, generator=seeded(0))
        tiny("x", num_inference_steps=2, height=32, width=32, guidance_scale=5.0, generator=seeded(0))
    finally:
        handle.remove()
    assert [batch for batch, _ in seen] == [1, 1, 2, 2]


def test_guidance_interval_guides_only_its_share_of_the_steps(tiny):
    """Steps 2-5 of 8 lie in [0.25, 0.75): two passes there (batch 2), one pass (the conditional branch) elsewhere."""
    seen, handle = _capture_transformer_inputs(tiny)
    try:
        tiny("x", num_inference_steps=8, height=32, width=32, guidance_scale=5.0, generator=seeded(0),
             guidance_interval=(0.25, 0.75))
    finally:
        handle.remove()
    assert [batch for batch, _ in seen] == [1, 1, 2, 2, 2, 2, 1, 1]


@pytest.mark.exact
def test_unguided_steps_equal_a_generation_without_guidance(tiny):
    """Outside the interval a step is the conditional branch alone: an interval no step falls in gives the tokens of
    guidance off (the same one-image batches, kernels and random draws)."""
    off = tiny("x", num_inference_steps=4, height=32, width=32, guidance_scale=1.0, generator=seeded(3),
               output_type="latent").images
    late = tiny("x", num_inference_steps=4, height=32, width=32, guidance_scale=5.0, generator=seeded(3),
                output_type="latent", guidance_interval=(0.9, 1.0)).images
    assert torch.equal(off, late)


def test_guidance_ramp_skips_the_unguided_first_step_and_scales_by_known_tokens(tiny, monkeypatch):
    """Scale 1 + (s - 1) * known share: all tokens masked at step 0, so one pass; after that two, guided at the
    known share, per image."""
    import meissonic.pipeline as pipeline_module

    scales = []
    guided = pipeline_module.guided_logits
    monkeypatch.setattr(pipeline_module, "guided_logits",
                        lambda u, c, s, overwrite=False: scales.append(s) or guided(u, c, s, overwrite))
    seen, handle = _capture_transformer_inputs(tiny)
    states = []
    try:
        tiny("x", num_inference_steps=4, height=32, width=32, guidance_scale=5.0, generator=seeded(0),
             guidance_ramp=True, callback=lambda step, t, tokens: states.append(tokens.clone()))
    finally:
        handle.remove()
    assert [batch for batch, _ in seen] == [1, 2, 2, 2]
    for before, scale in zip(states[:3], scales):  # the grid after step i is the one step i + 1 guides
        known = (before != tiny.transformer.mask_token_id).float().mean()
        torch.testing.assert_close(scale, torch.full_like(scale, float(1 + 4 * known)))


def test_halton_order_generates_and_is_seeded(tiny):
    run = lambda seed: tiny("x", num_inference_steps=4, height=32, width=32, generator=seeded(seed),  # noqa: E731
                            order="halton", output_type="latent").images
    first = run(1)
    assert (first != tiny.transformer.mask_token_id).all()
    assert torch.equal(first, run(1)) and not torch.equal(first, run(2))


def test_timestep_convention_follows_the_config(reference, tiny):
    _, released = reference
    seen, handle = _capture_transformer_inputs(released)
    try:
        released("x", num_inference_steps=3, height=64, width=64, generator=seeded(0))
    finally:
        handle.remove()
    assert [t.tolist() for _, t in seen] == [[2], [1], [0]]  # the reference: remaining step index
    seen, handle = _capture_transformer_inputs(tiny)
    try:
        tiny("x", num_inference_steps=3, height=64, width=64, guidance_scale=1.0, generator=seeded(0))
    finally:
        handle.remove()
    first, later = seen[0][1], seen[1][1]
    assert first.tolist() == [1.0] and 0 < later.item() < 1  # ours: the share of tokens still masked


@pytest.mark.exact
def test_prompt_embeds_path_equals_prompt_path(tiny):
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="latent")
    pooled, hidden = tiny.encode_prompt(["a cat"])
    neg_pooled, neg_hidden = tiny.encode_prompt([""])
    a = tiny(prompt="a cat", generator=seeded(2), **kw).images
    b = tiny(prompt_embeds=pooled, encoder_hidden_states=hidden, negative_prompt_embeds=neg_pooled,
             negative_encoder_hidden_states=neg_hidden, generator=seeded(2), **kw).images
    c = tiny(prompt="a cat", negative_prompt="", generator=seeded(2), **kw).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_callback_on_step_end_sees_every_step_and_can_replace_tokens(tiny):
    calls = []

    def callback(pipe, step, timestep, tensors):
        calls.append((step, timestep))
        if step == 0:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    tokens = tiny("x", num_inference_steps=3, height=32, width=32, generator=seeded(0), output_type="latent",
                  callback_on_step_end=callback).images
    assert calls == [(0, 2), (1, 1), (2, 0)]
    assert (tokens == 0).all()  # nothing was masked after the replacement, so nothing changed


def test_given_latents_are_kept(tiny):
    mask = tiny.scheduler.config.mask_token_id
    latents = torch.randint(0, 64, (1, 4, 4), generator=seeded(0))
    latents[0, :2] = mask
    out = tiny("x", latents=latents, num_inference_steps=4, generator=seeded(1), output_type="latent").images
    assert torch.equal(out[0, 2:], latents[0, 2:]) and (out != mask).all()


def test_bf16_pipeline(tiny_folder):
    pipe = load(tiny_folder, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    images = pipe("x", num_inference_steps=2, height=32, width=32, generator=seeded(0), output_type="np").images
    assert np.isfinite(images).all()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(height=100), "height=100 must be a positive multiple of 16"),
        (dict(width=0), "width=0"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(output_type="jpg"), "output_type='jpg'"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt=0"),
        (dict(prompt=None), "exactly one of prompt or prompt_embeds"),
        (dict(prompt=["a", "b"], negative_prompt=["n"]), "1 negative prompts for 2 prompts"),
        (dict(guidance_interval=(0.5, 0.5)), r"guidance_interval=\(0.5, 0.5\): needs 0 <= start < end <= 1"),
        (dict(guidance_interval=(0.2,)), "give \\(start, end\\)"),
        (dict(order="zigzag"), "order='zigzag' is not one of confidence, halton"),
    ],
)
def test_bad_arguments_are_refused(tiny, kw, match):
    args = dict(prompt="x", num_inference_steps=1, height=32, width=32)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        tiny(**args)


def test_mismatched_components_are_refused(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    config = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    config["mask_token_id"] = 3
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="scheduler mask_token_id=3"):
        MeissonicPipeline.from_pretrained(bad)


@pytest.mark.parametrize("damage,match", [
    (lambda p: shutil.rmtree(p / "vqvae"), "lacks the component folder"),
    (lambda p: (p / "model_index.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "model_index.json").unlink(), "no model_index.json"),
])
def test_malformed_folders_are_refused(tiny_folder, tmp_path, damage, match):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    damage(bad)
    with pytest.raises(ModelFolderError, match=match):
        MeissonicPipeline.from_pretrained(bad)


def test_missing_folder_and_offline_repo_id_are_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        MeissonicPipeline.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ModelFolderError, match="could not fetch 'MeissonFlow/Meissonic'"):
        MeissonicPipeline.from_pretrained("MeissonFlow/Meissonic", cache_dir=tmp_path / "hub", local_files_only=True)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['low_cpu_mem'\]"):
        MeissonicPipeline.from_pretrained(tmp_path, low_cpu_mem=True)


@pytest.mark.gpu
def test_cuda_with_model_cpu_offload(tiny_folder):
    pipe = load(tiny_folder, torch_dtype=torch.bfloat16)
    pipe.enable_model_cpu_offload()
    images = pipe("x", num_inference_steps=2, height=64, width=64, generator=torch.Generator("cuda").manual_seed(0),
                  output_type="np").images
    assert np.isfinite(images).all()


def test_the_execution_device_is_diffusers_answer_without_its_module_walk():
    """Without offload hooks the transformer's device (what diffusers' walk finds); with one, diffusers decides."""
    from diffusers import DiffusionPipeline

    from meissonic.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    assert pipe._execution_device == DiffusionPipeline._execution_device.fget(pipe) == torch.device("cpu")
    seen = []
    original = DiffusionPipeline._execution_device
    try:
        DiffusionPipeline._execution_device = property(lambda self: seen.append(1) or torch.device("meta"))
        pipe.vqvae._hf_hook = object()  # as accelerate's offloading leaves it
        assert pipe._execution_device == torch.device("meta") and seen
    finally:
        DiffusionPipeline._execution_device = original
        del pipe.vqvae._hf_hook


def test_the_end_of_a_call_runs_diffusers_hook_step_only_where_offload_hooks_exist(tiny, monkeypatch):
    """Our `maybe_free_model_hooks` resets stateful model caches as diffusers' does, without its signature walk, and
    hands over to diffusers' (which offloads again) where `enable_model_cpu_offload` left hooks."""
    from diffusers import DiffusionPipeline

    handed_over, reset = [], []
    monkeypatch.setattr(DiffusionPipeline, "maybe_free_model_hooks", lambda self: handed_over.append(1))
    monkeypatch.setattr(tiny.transformer, "_reset_stateful_cache", lambda: reset.append(1), raising=False)
    tiny("x", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert reset == [1] and handed_over == []
    monkeypatch.setattr(tiny, "_all_hooks", [object()], raising=False)
    tiny("x", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert reset == [1, 1] and handed_over == [1]
