"""Image tokens (VQ) and text conditioning (CLIP) as Meissonic uses them."""

import pytest
import torch
from diffusers import VQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from conftest import FIXTURES
from meissonic.presets import clip_tokenizer
from meissonic.text import MAX_TOKENS, encode_prompts, tokenize
from meissonic.vq import decode_tokens, downscale_factor, encode_image

FOLDER = FIXTURES / "reference-pipeline" / "ds"


@pytest.fixture(scope="module")
def vqvae():
    return VQModel.from_pretrained(FOLDER / "vqvae").eval()


def test_image_to_tokens_and_back(vqvae):
    assert downscale_factor(vqvae) == 16
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    tokens = encode_image(vqvae, images)
    assert tokens.shape == (2, 4, 3) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < vqvae.config.num_vq_embeddings
    decoded = decode_tokens(vqvae, tokens)
    assert decoded.shape == (2, 3, 64, 48) and decoded.min() >= 0 and decoded.max() <= 1
    # a decoded image re-encodes to tokens that decode to (nearly) the same picture: the grid is the image's code
    again = decode_tokens(vqvae, encode_image(vqvae, decoded))
    assert (again - decoded).abs().mean() < (decoded - images).abs().mean()


def test_fp16_vq_decodes_in_fp32(vqvae):
    tokens = torch.randint(0, 100, (1, 2, 2), generator=torch.Generator().manual_seed(0))
    reference = decode_tokens(vqvae, tokens)
    half = VQModel.from_pretrained(FOLDER / "vqvae", torch_dtype=torch.float16)
    out = decode_tokens(half, tokens)
    assert half.dtype == torch.float16  # restored afterwards
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.02


def test_prompts_are_padded_to_77_with_end_of_text():
    tokenizer = clip_tokenizer()
    ids = tokenize(tokenizer, ["a red circle", ""])
    assert ids.shape == (2, MAX_TOKENS)
    assert ids[0, 0] == 49406 and ids[1, :2].tolist() == [49406, 49407]
    assert (ids[1, 2:] == 49407).all()
    long = tokenize(tokenizer, ["word " * 200])
    assert long.shape == (1, MAX_TOKENS) and long[0, -1] == 49407


def test_shipped_tokenizer_matches_released_tokenizer_files():
    released = CLIPTokenizer.from_pretrained(FOLDER / "tokenizer")
    prompts = ["A photo of an astronaut riding a horse on Mars", "ünïcödé, punctuation!? 123", ""]
    assert torch.equal(tokenize(clip_tokenizer(), prompts), tokenize(released, prompts))


@pytest.mark.exact
def test_encode_prompts_gives_penultimate_states_and_projection():
    tokenizer = CLIPTokenizer.from_pretrained(FOLDER / "tokenizer")
    encoder = CLIPTextModelWithProjection.from_pretrained(FOLDER / "text_encoder").eval()
    hidden, pooled = encode_prompts(tokenizer, encoder, ["a cat", "a dog"])
    assert hidden.shape == (2, 77, encoder.config.hidden_size)
    assert pooled.shape == (2, encoder.config.projection_dim)
    out = encoder(tokenize(tokenizer, ["a cat", "a dog"]), output_hidden_states=True)
    assert torch.equal(hidden, out.hidden_states[-2]) and torch.equal(pooled, out.text_embeds)
    assert not torch.equal(hidden, out.last_hidden_state)


def test_an_encoder_with_fewer_positions_reads_that_many_tokens():
    from transformers import CLIPTextConfig

    from meissonic.presets import PRESETS
    from meissonic.text import text_length

    config = CLIPTextConfig(**PRESETS["demo"].text_encoder)
    assert config.max_position_embeddings == 32
    encoder = CLIPTextModelWithProjection(config).eval()
    assert text_length(encoder) == 32
    hidden, pooled = encode_prompts(clip_tokenizer(), encoder, ["a small blue triangle above a yellow square", "x"])
    assert hidden.shape == (2, 32, config.hidden_size) and pooled.shape == (2, config.projection_dim)
    out = encoder(tokenize(clip_tokenizer(), ["word " * 60], 32))  # cut to 32 with end-of-text last: no error
    assert out.last_hidden_state.shape[1] == 32
