"""quantize(): every method on tiny random models on CPU, memory, top-1 agreement, save/load, errors."""

import copy
import json
import sys

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from meissonic.presets import get_preset, seeded_init
from meissonic.quantize import (
    QUANTIZATION_CONFIG,
    QUANTIZE_METHODS,
    is_quantized_folder,
    load_quantized,
    quantization_method,
    quantize,
    save_quantized,
    token_agreement,
    weight_bytes,
)
from meissonic.transformer import MeissonicTransformer

SLOW_INT4 = pytest.mark.filterwarnings("ignore:int4 on CPU runs float32")  # expected warning, checked once below
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Every method in both CPU dtypes: int8 is torchao weight-only in both; int8-dynamic runs fbgemm in fp32 and torchao's
# dynamic-activation int8 in bf16; fp8 and int4 are torchao in both.
CASES = [pytest.param(m, d, id=f"{m}-{name}") for m in QUANTIZE_METHODS for name, d in DTYPES.items()]
# A transformer whose linears hold ~97% of the weights (1 double + 2 single blocks at width 256, no conv resampling).
LINEAR_HEAVY = {
    **get_preset("tiny").transformer, "num_layers": 1, "num_single_layers": 2, "num_attention_heads": 4,
    "attention_head_dim": 64, "axes_dims_rope": [16, 24, 24], "joint_attention_dim": 256,
    "pooled_projection_dim": 256, "downsample": False, "upsample": False,
}


def transformer(dtype=torch.float32, seed=0, config=None) -> MeissonicTransformer:
    with seeded_init(seed):
        model = MeissonicTransformer(**(config or get_preset("tiny").transformer))
    return nn.Module.to(model, dtype).eval()  # nn.Module.to: diffusers' own `to` warns on every dtype cast


def inputs(model: MeissonicTransformer, grid: int = 8) -> dict:
    """A fixed batch of 2: token grid, text states, pooled vector, micro-conditions, mask rate."""
    gen, cfg, dtype = torch.Generator().manual_seed(0), model.config, model.dtype
    return dict(
        hidden_states=torch.randint(0, cfg.vocab_size, (2, grid, grid), generator=gen),
        encoder_hidden_states=torch.randn(2, 77, cfg.joint_attention_dim, generator=gen).to(dtype),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen).to(dtype),
        micro_conds=torch.tensor([[16.0 * grid, 16.0 * grid, 0, 0, 6]]).expand(2, -1),
        timestep=torch.tensor([0.5]),
    )


@torch.no_grad()
def logits(model, grid: int = 8) -> torch.Tensor:
    return model(**inputs(model, grid))


def quantized_linears(model: nn.Module) -> int:
    """Linears whose weight is no longer a plain tensor (torchao) or that fbgemm replaced."""
    plain = (torch.Tensor, nn.Parameter)
    return sum(
        (isinstance(m, nn.Linear) and type(m.weight) not in plain)
        or type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")
        for m in model.modules()
    )


@pytest.mark.exact
@pytest.mark.parametrize("method,dtype", CASES)
def test_each_method_runs_on_cpu(method, dtype):
    model = transformer(dtype)
    before = weight_bytes(model)
    if method == "int4" and dtype == torch.float32:
        with pytest.warns(UserWarning, match="bfloat16"):  # aten's fp32 int4 kernel is ~100x slower
            assert quantize(model, method) is model
    else:
        assert quantize(model, method) is model
    out = logits(model)
    assert out.shape == (2, model.config.codebook_size, 8, 8)
    assert torch.isfinite(out).all()
    if method == "none":
        assert quantized_linears(model) == 0 and weight_bytes(model) == before
        assert torch.equal(out, logits(transformer(dtype)))
    else:
        assert quantized_linears(model) > 20
        assert weight_bytes(model) < 0.7 * before


@pytest.fixture(scope="module")
def linear_heavy():
    return transformer(config=LINEAR_HEAVY)


@SLOW_INT4
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_weight_memory_against_fp32(linear_heavy, dtype):
    fp32 = weight_bytes(linear_heavy)
    assert fp32 == sum(p.numel() * 4 for p in linear_heavy.parameters())
    sizes = {m: weight_bytes(quantize(nn.Module.to(copy.deepcopy(linear_heavy), dtype), m)) / fp32
             for m in ("int8", "int8-dynamic", "fp8", "int4")}
    # measured (fp32 / bf16 model): int8-dynamic 0.284 (fbgemm) / -, fp8 0.278 / 0.261, int4 0.215 / 0.168
    assert sizes["int8"] <= 0.30, sizes
    assert sizes["int8-dynamic"] <= 0.30, sizes
    assert sizes["fp8"] <= 0.30, sizes
    assert sizes["int4"] < sizes["int8"], sizes


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("method", ["int8", "int8-dynamic"])
def test_int8_keeps_the_top1_tokens(dtype, method):
    reference = logits(transformer(), grid=16)  # 512 positions
    agreement = token_agreement(logits(quantize(transformer(dtype), method), grid=16).float(), reference)
    assert agreement >= 0.9, agreement
    # the bar separates: another random model, or int8 of scrambled weights, agrees by chance only (~2-4%)
    assert token_agreement(logits(transformer(seed=1), grid=16), reference) < 0.5
    scrambled = transformer(dtype)
    with torch.no_grad():
        for module in scrambled.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn_like(module.weight) * module.weight.float().std().to(dtype))
    assert token_agreement(logits(quantize(scrambled, "int8"), grid=16).float(), reference) < 0.5


def test_token_agreement_counts_argmax_over_codes():
    reference = torch.zeros(1, 4, 2, 2)
    reference[0, 1] = 1.0  # every position picks code 1
    other = reference.clone()
    other[0, 3, 0, 0] = 2.0  # one of 4 positions now picks code 3
    assert token_agreement(other, reference) == 0.75
    with pytest.raises(ValueError, match="shape"):
        token_agreement(other[:, :3], reference)


@SLOW_INT4
def test_filter_fn_and_unsupported_shapes_are_skipped():
    model = transformer()
    quantize(model, "fp8", filter_fn=lambda module, name: not name.startswith("single_transformer_blocks"))
    singles = [m for m in model.single_transformer_blocks.modules() if isinstance(m, nn.Linear)]
    assert singles and all(type(m.weight) is nn.Parameter for m in singles)
    assert type(model.transformer_blocks[0].attn.to_q.weight) is not nn.Parameter

    stack = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 24), nn.Linear(64, 64))  # too small, N % 16 != 0, fine
    quantize(stack, "int4")
    assert [type(m.weight) is nn.Parameter for m in stack] == [True, True, False]


@pytest.mark.parametrize("method,dtype", [
    pytest.param("int8-dynamic", torch.float32, id="int8-dynamic-fp32-fbgemm"),
    pytest.param("int8-dynamic", torch.bfloat16, id="int8-dynamic-bf16"),
    pytest.param("int8", torch.float32, id="int8-fp32"), pytest.param("int8", torch.bfloat16, id="int8-bf16"),
    pytest.param("fp8", torch.float32, id="fp8-fp32"), pytest.param("int4", torch.bfloat16, id="int4-bf16"),
    pytest.param("none", torch.float32, id="none-fp32"),
])
@pytest.mark.exact
def test_save_and_load_give_identical_logits(tmp_path, method, dtype):
    model = quantize(transformer(dtype), method)
    save_quantized(model, tmp_path, method)
    info = json.loads((tmp_path / QUANTIZATION_CONFIG).read_text())
    assert info["method"] == method and info["dtype"] == str(dtype).removeprefix("torch.")
    assert (tmp_path / "config.json").is_file() and is_quantized_folder(tmp_path)
    loaded = load_quantized(tmp_path, dtype=dtype)
    assert quantization_method(loaded) == quantization_method(model) == method
    assert torch.equal(logits(loaded), logits(model))
    assert weight_bytes(loaded) == weight_bytes(model)
    assert quantized_linears(loaded) == quantized_linears(model)


@pytest.mark.exact
def test_save_quantizes_an_unquantized_model(tmp_path):
    model = transformer()
    save_quantized(model, tmp_path, "fp8")
    assert quantized_linears(model) > 20
    assert torch.equal(logits(load_quantized(tmp_path, method="fp8")), logits(model))


def test_a_folder_of_another_method_is_refused(tmp_path):
    model = quantize(transformer(), "int8")
    with pytest.raises(ValueError, match="'int8'.*'fp8'"):
        save_quantized(model, tmp_path, "fp8")
    save_quantized(model, tmp_path, "int8")
    with pytest.raises(ValueError, match="quantized with 'int8', not 'fp8'"):
        load_quantized(tmp_path, method="fp8")
    with pytest.raises(ValueError, match="already quantized with 'int8'"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="quantized in torch.float32"):
        load_quantized(tmp_path, dtype=torch.bfloat16)
    # a quantization.json that no longer matches its weights
    path = tmp_path / QUANTIZATION_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "method": "fp8", "scheme": "fp8-weight-only"}))
    with pytest.raises(ValueError, match="says 'fp8'.*saved with 'int8'"):
        load_quantized(tmp_path)
    assert not is_quantized_folder(tmp_path / "nothing")
    with pytest.raises(ValueError, match="save_quantized"):
        load_quantized(tmp_path / "nothing")


@pytest.mark.parametrize("call", [
    lambda: quantize(nn.Linear(64, 64), "int3"),
    lambda: save_quantized(transformer(), "unused", "int3"),
    lambda: load_quantized("unused", method="int3"),
])
def test_unknown_method_is_named(call):
    with pytest.raises(ValueError) as err:
        call()
    assert "'int3'" in str(err.value) and all(m in str(err.value) for m in QUANTIZE_METHODS)


def test_missing_torchao_names_the_install(monkeypatch):
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao...` now fails as if not installed
    with pytest.raises(ImportError, match="pip install torchao"):
        quantize(transformer(), "fp8")


@SLOW_INT4
@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_text_encoder_quantizes_and_runs(method):
    with seeded_init(0):
        encoder = CLIPTextModelWithProjection(CLIPTextConfig(**get_preset("tiny").text_encoder)).eval()
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = encoder(ids, output_hidden_states=True)
        before = weight_bytes(encoder)
        quantize(encoder, method)
        out = encoder(ids, output_hidden_states=True)
    assert quantized_linears(encoder) >= 12  # q, k, v, out, fc1, fc2 in each of the 2 layers
    assert weight_bytes(encoder) < before
    assert out.text_embeds.shape == reference.text_embeds.shape and torch.isfinite(out.text_embeds).all()
    assert torch.isfinite(out.hidden_states[-2]).all()
    cosine = torch.cosine_similarity(out.text_embeds, reference.text_embeds, dim=-1)
    assert (cosine > 0.9).all(), cosine


def test_cuda_paths_are_chosen_by_capability(monkeypatch):
    """The CUDA kernel paths cannot run here; check which one each case picks and that its torchao config builds."""
    from meissonic.quantize import _choose_scheme, _torchao_config

    cuda, bf16, fp32 = torch.device("cuda"), torch.bfloat16, torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _choose_scheme("fp8", cuda, bf16) == "fp8-dynamic"
    assert _choose_scheme("fp8", cuda, fp32) == "fp8-weight-only"
    assert _choose_scheme("int8", cuda, fp32) == "int8-weight-only"
    assert _choose_scheme("int8-dynamic", cuda, bf16) == "int8-dynamic-torchao"
    assert _choose_scheme("int8", torch.device("cpu"), fp32) == "int8-weight-only"  # the accurate one by default
    assert _choose_scheme("int4", cuda, bf16) == "int4-tinygemm-cuda"
    with pytest.raises(ValueError, match="bfloat16"):
        _choose_scheme("int4", cuda, fp32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert _choose_scheme("fp8", cuda, bf16) == "fp8-weight-only"
    for scheme in ("fp8-dynamic", "int4-tinygemm-cuda", "int8-weight-only", "int8-dynamic-torchao",
                   "int8-dynamic-torchao-7bit", "fp8-weight-only", "int4-cpu"):
        assert type(_torchao_config(scheme)).__name__.endswith("Config")


def test_int8_products_on_a_cpu_without_vnni_keep_7_bit_weights(monkeypatch, tmp_path):
    """Without VNNI, torch._int_mm adds u8 x s8 products pairwise in 16 bits: full-range weights overflow (most sums
    wrong, top-1 agreement 70%), so int8-dynamic keeps weights and activations in 7 bits there (torchao's
    reduce_range), and a folder of full-range weights is refused instead of giving wrong logits."""
    import meissonic.quantize as q

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN held below VNNI (read here; its kernels read it at start)
    assert q.int8_products_saturate()
    assert q._choose_scheme("int8-dynamic", torch.device("cpu"), torch.bfloat16) == "int8-dynamic-torchao-7bit"
    assert q._choose_scheme("int8-dynamic", torch.device("cuda"), torch.bfloat16) == "int8-dynamic-torchao"
    model = quantize(transformer(torch.bfloat16), "int8-dynamic")
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert weight.reduce_range and weight.qdata.abs().max() <= 64
    save_quantized(model, tmp_path / "7bit", "int8-dynamic")
    assert torch.equal(logits(load_quantized(tmp_path / "7bit")), logits(model))  # loads on any CPU

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(q, "int8_products_saturate", lambda: False)  # a CPU with VNNI: full range
    save_quantized(quantize(transformer(torch.bfloat16), "int8-dynamic"), tmp_path / "full", "int8-dynamic")
    monkeypatch.setattr(q, "int8_products_saturate", lambda: True)
    with pytest.raises(ValueError, match="overflow in this CPU's int8 kernels .no VNNI.*or use int8"):
        load_quantized(tmp_path / "full")
