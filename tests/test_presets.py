"""Every shipped preset builds, its components fit together, and the released ones have the released sizes."""

import pytest
import torch
from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from meissonic import MeissonicPipeline
from meissonic.pipeline import MeissonicScheduler, check_components
from meissonic.presets import PRESETS, build_pipeline, clip_tokenizer, get_preset
from meissonic.transformer import MeissonicTransformer


def meta_pipeline(name):
    preset = get_preset(name)
    with torch.device("meta"):
        transformer = MeissonicTransformer(**preset.transformer)
        vqvae = VQModel(**preset.vqvae)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder))
    scheduler = MeissonicScheduler(mask_token_id=transformer.mask_token_id)
    return MeissonicPipeline(vqvae=vqvae, tokenizer=clip_tokenizer(), text_encoder=text_encoder,
                             transformer=transformer, scheduler=scheduler)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_fits_together(name):
    pipe = meta_pipeline(name)
    check_components(pipe)
    assert pipe.vae_scale_factor == (8 if name == "demo" else 16)  # the demo's tokenizer keeps 8x8 patches


def test_released_presets_have_released_sizes():
    pipe = meta_pipeline("meissonic")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pipe.transformer) == 1_006_946_304
    assert count(pipe.vqvae) == 146_244_675
    assert count(pipe.text_encoder) == 354_032_640
    assert pipe.defaults == {"resolution": 1024, "steps": 64, "guidance": 9.0}
    assert meta_pipeline("monetico").defaults == {"resolution": 512, "steps": 48, "guidance": 9.0}


@pytest.mark.parametrize("name", ["tiny", "tiny-nods"])
def test_small_presets_round_trip_and_generate(name, tmp_path):
    build_pipeline(name, seed=1).save_pretrained(tmp_path)
    pipe = MeissonicPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    preset = get_preset(name)
    assert pipe.defaults == {"resolution": preset.resolution, "steps": preset.steps, "guidance": preset.guidance}
    tokens = pipe("a green triangle", num_inference_steps=2, height=48, width=80,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert tokens.shape == (1, 3, 5)


def test_same_seed_same_random_model():
    a = build_pipeline("tiny", seed=4).transformer.state_dict()
    b = build_pipeline("tiny", seed=4).transformer.state_dict()
    c = build_pipeline("tiny", seed=5).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset 'big' is not one of"):
        get_preset("big")
