"""The faster VQ decoding `MeissonicPipeline` sets up (`meissonic.vq.speed_up_decoding`): upsamplers as transposed
convolutions (`NearestConvUpsample`: the function of diffusers' nearest-2x + 3x3 `Upsample2D`, the same weights and
state dict, the folded kernel following the weight) and in-place resnets (`InferenceResnet`: bit for bit).

Tolerances: the folded kernel sums up to four of the original weights before multiplying, so the products are
added in another order; float32 results agree to a few ulps of the values (1e-5 relative here), not bit for bit.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import VQModel
from diffusers.models.upsampling import Upsample2D

from meissonic.loading import demo_model_folder
from meissonic.presets import get_preset, seeded_init
from diffusers.models.resnet import ResnetBlock2D

from meissonic.vq import (InferenceResnet, NearestConvUpsample, decode_tokens, fold_nearest_conv, fold_upsamplers,
                          lean_resnets)

TOL = dict(rtol=1e-5, atol=1e-5)


def reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 4, 1, 1), (1, 16, 16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fold_is_nearest_upsampling_then_the_convolution(shape, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 6, 3, padding=1)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        folded = F.conv_transpose2d(x, fold_nearest_conv(conv.weight), conv.bias, stride=2, padding=1)
        expected = reference(x, conv)
    assert folded.shape == expected.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(folded, expected, **TOL)


def test_a_kernel_that_is_one_tap_lands_on_the_pixels_nearest_upsampling_gives_it():
    # the weight 1 at the centre tap and 0 elsewhere: the output is the upsampled input itself, exactly
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()[0, 0, 1, 1] = 1
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    out = F.conv_transpose2d(x, fold_nearest_conv(conv.weight), None, stride=2, padding=1)
    assert torch.equal(out, F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.fixture(scope="module")
def demo_vq():
    return VQModel.from_pretrained(demo_model_folder() / "vqvae", torch_dtype=torch.float32).eval()


def test_the_demo_decoder_gives_its_images_with_the_same_state_dict(demo_vq):
    folded = copy.deepcopy(demo_vq).to(memory_format=torch.channels_last)
    assert fold_upsamplers(folded) == 3  # one per up block but the last
    assert sum(isinstance(m, Upsample2D) for m in folded.modules()) == 0
    before, after = demo_vq.state_dict(), folded.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    tokens = torch.randint(0, 512, (2, 16, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_tokens(folded, tokens), decode_tokens(demo_vq, tokens), **TOL)
    assert fold_upsamplers(folded) == 0  # already folded: nothing left to replace


def test_the_pipeline_decodes_with_folded_upsamplers_and_lean_resnets(tiny_folder):
    from meissonic import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    ups = [m for m in pipe.vqvae.modules() if isinstance(m, (Upsample2D, NearestConvUpsample))]
    assert ups and all(isinstance(m, NearestConvUpsample) for m in ups)
    resnets = [m for m in pipe.vqvae.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(type(m) is InferenceResnet for m in resnets)


@pytest.mark.exact
def test_lean_resnets_decode_and_encode_bit_for_bit(demo_vq):
    plain = copy.deepcopy(demo_vq).to(memory_format=torch.channels_last)
    fold_upsamplers(plain)
    lean = copy.deepcopy(plain)
    assert lean_resnets(lean) == sum(type(m) is ResnetBlock2D for m in plain.modules()) > 0
    before, after = plain.state_dict(), lean.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    tokens = torch.randint(0, 512, (2, 16, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_tokens(lean, tokens), decode_tokens(plain, tokens))
    images = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(lean.encode(images).latents, plain.encode(images).latents)


def test_a_lean_resnet_runs_diffusers_forward_for_gradients(demo_vq):
    plain = copy.deepcopy(demo_vq.decoder.up_blocks[2].resnets[0])
    lean = copy.deepcopy(plain)
    lean.__class__ = InferenceResnet
    x = torch.randn(1, plain.in_channels, 8, 8, requires_grad=True)
    (lean(x, None) ** 2).sum().backward()  # in-place activations would break the graph; diffusers' forward does not
    grad = x.grad.clone()
    x.grad = None
    (plain(x, None) ** 2).sum().backward()
    assert torch.equal(grad, x.grad)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    with seeded_init(0):
        up = Upsample2D(8, use_conv=True, out_channels=8)
    return up, NearestConvUpsample(up)


def test_the_folded_kernel_follows_the_weight(layer):
    up, folded = layer
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), up(x), **TOL)
        up.conv.weight.mul_(-2)  # an in-place change (an optimizer step, load_state_dict)
        torch.testing.assert_close(folded(x), up(x), **TOL)
        up.conv.weight.data = torch.randn_like(up.conv.weight)  # new storage
        torch.testing.assert_close(folded(x), up(x), **TOL)
        up.double()  # a dtype move
        out = folded(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, up(x.double()), rtol=1e-12, atol=1e-12)


def test_small_folds_are_kept_until_the_module_moves_and_large_ones_not_at_all(layer, monkeypatch):
    _, folded = layer
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        folded(x)
        kept = folded._folded[2]
        folded(x)
        assert folded._folded[2] is kept  # the same weight: the same fold
        folded.to(torch.float64)
        assert folded._folded is None  # nothing kept for the old dtype (or device)
        monkeypatch.setattr(NearestConvUpsample, "CACHE_BYTES", 8 * 8 * 16 * 8 - 1)  # one byte short of this fold
        folded(x.double())
        assert folded._folded is None


def test_gradients_flow_to_the_original_weight(layer):
    up, folded = layer
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    target = torch.randn(2, 8, 10, 10)
    (reference(x, up.conv) * target).sum().backward()
    expected = up.conv.weight.grad.clone(), up.conv.bias.grad.clone(), x.grad.clone()
    up.conv.zero_grad()
    x.grad = None
    (folded(x) * target).sum().backward()
    for got, want in zip((up.conv.weight.grad, up.conv.bias.grad, x.grad), expected):
        torch.testing.assert_close(got, want, **TOL)


def test_offload_hooks_and_output_sizes_take_the_original_path(layer):
    up, folded = layer
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(folded(x, output_size=(9, 9)), up(x, output_size=(9, 9)))
        up.conv._hf_hook = None  # what accelerate's sequential offload leaves on a layer
        assert torch.equal(folded(x), up(x))


def test_a_bf16_decoder_folds_its_kernel_in_float32():
    with seeded_init(0):
        vq = VQModel(**get_preset("tiny").vqvae).eval()
    folded = copy.deepcopy(vq)
    assert fold_upsamplers(folded) > 0
    tokens = torch.randint(0, vq.config.num_vq_embeddings, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    exact = decode_tokens(vq, tokens)
    vq.to(torch.bfloat16)
    folded.to(torch.bfloat16)
    # both bf16 decodes stand off the float32 one by bf16 rounding; the fold adds no error of its own beyond that
    plain_error = (decode_tokens(vq, tokens) - exact).abs().max()
    folded_error = (decode_tokens(folded, tokens) - exact).abs().max()
    assert folded_error <= 2 * plain_error + 1e-3
