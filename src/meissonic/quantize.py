"""Weight quantization of the transformer and the text encoder: one `quantize(model, method)`, not a script per format.

The reference ships `inference_fp8.py`, a copy of its inference script that swaps in torchao; here the format is an
argument. Each method maps to a kernel path (a "scheme") chosen by the device and the model's dtype:

    method  CUDA                                            CPU
    int8    torchao int8 weight-only                        torchao int8 weight-only
    int8-   torchao int8 dynamic activation + int8 weight   fp32: torch.ao `quantize_dynamic` (fbgemm, per channel),
    dynamic                                                 the fastest CPU int8; bf16: torchao as on CUDA, in 7 bits
                                                            on CPUs without VNNI (`int8_products_saturate`)
    fp8     compute capability >= 8.9 and bf16: torchao     torchao float8 weight-only (e4m3, per row)
            float8 dynamic activation (per row); else
            float8 weight-only
    int4    torchao int4 weight-only, tinygemm (bf16 only,  torchao's prototype Int4OpaqueTensor (aten's CPU int4pack
            group 128)                                      kernel, group 32, asymmetric)

Only `nn.Linear` layers are quantized, and only those whose shape the scheme's kernel takes (see `_fits`); a
`filter_fn(module, name)` narrows the choice further. Embeddings, convolutions and norms stay as they are.

Why two int8 methods. `int8` (weights only) keeps the logits: top-1 token agreement with fp32 on the 1B
architecture (random weights, 512 px) 98.1% in fp32; `int8-dynamic` also quantizes the activations, which makes
fbgemm's CPU kernels the fastest int8 there is, but costs quality (93.5% on the same inputs; 90.6% on the trained
demo, against 96.9% for `int8`). Speed of the CPU paths: one forward of 2 x [Linear(1024, 4096), GELU,
Linear(4096, 1024)] on 600 rows, median of 12, on the 2-core Zen 4 dev machine (AVX-512 VNNI, no AMX) while other
jobs ran (so absolute times are loose; three runs agreed on the order), torch 2.13.0, torchao 0.18.0, 2026-11-30:

    activations  plain    torch.ao quantize_dynamic  torchao int8 weight-only  torchao int8 dyn-act/int8-weight
    fp32         227 ms   82 ms (per channel)        292 ms                    496 ms
    bf16         80 ms    (refuses bf16)             144 ms                    624 ms

Also torchao float8 weight-only: fp32 356 ms, bf16 240 ms; CPU int4: bf16 368 ms, fp32 22-34 s (aten's fp32 int4pack
kernel is very slow: use bf16 with int4 on CPU). So `int8-dynamic` in fp32 takes fbgemm's dynamic int8 (faster than
fp32 itself; where torch has no fbgemm dynamic quantization, torchao's); torchao's eager CPU weight-only paths save
memory, not time.

Saved folders (`save_quantized`) hold `config.json`, `quantization.json` and `quantized_model.safetensors`. The
safetensors file holds plain tensors only: each torchao weight is stored as its inner tensors (`__tensor_flatten__`:
int data, scales, ...) under `<name>.<inner>`, each fbgemm weight as int8 data, scales and zero points. torchao's own
helper (`torchao.prototype.safetensors`) does not know the CPU int4 tensor nor fbgemm's packed weights, so we do not
use it. Loading rebuilds the model on the meta device, quantizes it again with the saved scheme (which recreates the
non-tensor attributes: block sizes, dtypes, kernel choices) and assigns the saved tensors, so logits match bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import warnings
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch
from torch import nn

QUANTIZE_METHODS = ("none", "int8", "int8-dynamic", "fp8", "int4")
QUANTIZATION_CONFIG = "quantization.json"
WEIGHTS_NAME = "quantized_model.safetensors"
MIN_FEATURES = 16  # smaller linears save almost nothing and lose the most accuracy
_RECORD = "_meissonic_quantization"  # attribute a quantized model carries: method, scheme, dtype
# torchao logs "Failed to load ...so" for its CUDA-only extensions, torch warns about torchao's Enum pytree
# registration, and diffusers (which imports torchao with its ModelMixin when torchao is installed) about old classes
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")

FilterFn = Callable[[nn.Module, str], bool]

# kernel path -> the device types it runs on (all but "none" and "int8-fbgemm" need torchao)
SCHEMES = {
    "none": ("cpu", "cuda"),
    "int8-fbgemm": ("cpu",),
    "int8-weight-only": ("cpu", "cuda"),
    "int8-dynamic-torchao": ("cpu", "cuda"),
    "int8-dynamic-torchao-7bit": ("cpu", "cuda"),  # weights and activations in 7 bits: see int8_products_saturate
    "fp8-weight-only": ("cpu", "cuda"),
    "fp8-dynamic": ("cuda",),
    "int4-tinygemm-cuda": ("cuda",),
    "int4-cpu": ("cpu",),
}


def _check_method(method: str) -> None:
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantization method {method!r} is not one of {', '.join(QUANTIZE_METHODS)}")


@contextlib.contextmanager
def quiet_torchao():
    """Silence what importing torchao prints: raise its loggers to ERROR and drop warnings, restored after.

    Also useful around the first import of diffusers' ModelMixin, which imports torchao when it is installed.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao(module: str = "torchao.quantization"):
    """Import a torchao module lazily and quietly, or say how to install it."""
    try:
        with quiet_torchao():
            return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this quantization method needs torchao: pip install torchao ({err})") from err


def _torchao_version() -> str | None:
    try:
        return version("torchao")
    except PackageNotFoundError:
        return None


def _fbgemm_available() -> bool:
    """Whether torch still has the (deprecated) eager dynamic quantization and an fbgemm-based engine."""
    with quiet_torchao():
        api = importlib.import_module("torch.ao.quantization")
    engines = torch.backends.quantized.supported_engines
    return hasattr(api, "quantize_dynamic") and ("fbgemm" in engines or "x86" in engines)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which its int8 kernels have no VNNI instructions
_ISAS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def int8_products_saturate() -> bool:
    """Whether this CPU's int8 matrix products (`torch._int_mm`, oneDNN) run without VNNI instructions, and so add
    u8 x s8 products pairwise in 16 bits: full-range int8 weights then overflow and most sums come out wrong (top-1
    token agreement fell from 98% to 70% on a tiny model with oneDNN held to AVX2). True on CPUs without AVX512-VNNI
    (AMD Zen 2/3, Intel before Cascade Lake) and wherever ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) caps oneDNN below
    VNNI; torchao's `reduce_range` (7-bit weights and activations) keeps every sum exact there."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return cap in _ISAS_WITHOUT_VNNI or _torchao("torchao.utils").should_reduce_range(torch.device("cpu"))


def _choose_scheme(method: str, device: torch.device, dtype: torch.dtype) -> str:
    if method == "none":
        return "none"
    if device.type == "cuda":
        bf16 = dtype == torch.bfloat16
        if method == "int8":
            return "int8-weight-only"
        if method == "int8-dynamic":
            return "int8-dynamic-torchao"
        if method == "fp8":
            fast = bf16 and torch.cuda.get_device_capability(device) >= (8, 9)
            return "fp8-dynamic" if fast else "fp8-weight-only"
        if not bf16:
            raise ValueError(f"int4 on CUDA needs a bfloat16 model (tinygemm kernel), got {dtype}: "
                             "call model.to(torch.bfloat16) first")
        return "int4-tinygemm-cuda"
    if device.type != "cpu":
        raise ValueError(f"quantization runs on cpu or cuda, not {device.type!r}")
    if method == "int8":
        return "int8-weight-only"
    if method == "int8-dynamic" and dtype == torch.float32 and _fbgemm_available():
        return "int8-fbgemm"  # fbgemm reduces the activations' range itself where products would saturate
    if method == "int8-dynamic":
        return "int8-dynamic-torchao-7bit" if int8_products_saturate() else "int8-dynamic-torchao"
    return "fp8-weight-only" if method == "fp8" else "int4-cpu"


def _fits(linear: nn.Linear, scheme: str) -> bool:
    """Whether the scheme's kernel takes this linear's shape (checked on this machine or read in torchao 0.18)."""
    n_in, n_out = linear.in_features, linear.out_features
    if min(n_in, n_out) < MIN_FEATURES:
        return False
    if scheme == "int4-cpu":  # group size 32; aten's CPU int4pack wants out_features divisible by 16
        return n_in % 32 == 0 and n_out % 16 == 0
    if scheme == "int4-tinygemm-cuda":  # group size 128 (tinygemm pads the rest itself)
        return n_in % 128 == 0
    if scheme == "fp8-dynamic":  # torch._scaled_mm wants both sides divisible by 16
        return n_in % 16 == 0 and n_out % 16 == 0
    return True


def _is_plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _torchao_config(scheme: str):
    ao = _torchao()
    if scheme == "int8-weight-only":
        return ao.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme in ("int8-dynamic-torchao", "int8-dynamic-torchao-7bit"):
        return ao.Int8DynamicActivationInt8WeightConfig(reduce_range=scheme.endswith("7bit"), set_inductor_config=False)
    if scheme == "fp8-weight-only":
        return ao.Float8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "fp8-dynamic":
        return ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow(), set_inductor_config=False)
    if scheme == "int4-tinygemm-cuda":
        packing = _torchao("torchao.quantization.quantize_.workflows").Int4PackingFormat.TILE_PACKED_TO_4D
        return ao.Int4WeightOnlyConfig(group_size=128, int4_packing_format=packing, set_inductor_config=False)
    assert scheme == "int4-cpu", scheme
    return _torchao("torchao.prototype.quantization.int4").PrototypeInt4WeightOnlyConfig(
        group_size=32, set_inductor_config=False
    )


def _quantize_modules(model: nn.Module, scheme: str, names: list[str]) -> None:
    """Quantize the named linears of `model` in place with `scheme`."""
    if scheme == "int8-fbgemm":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with quiet_torchao():  # the torch.ao API warns that it is deprecated
            quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8, inplace=True)
    elif scheme != "none":
        chosen = set(names)
        config = _torchao_config(scheme)
        with quiet_torchao():
            _torchao().quantize_(model, config, filter_fn=lambda module, name: name in chosen)


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's linear weights (what the quantized kernels will see), else of its first float."""
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and _is_plain(m.weight)]
    floats = [p for p in [*linears, *model.parameters()] if p.is_floating_point()]
    return floats[0].dtype if floats else torch.float32


def quantize(model: nn.Module, method: str, device: str | torch.device | None = None,
             filter_fn: FilterFn | None = None) -> nn.Module:
    """Quantize the weights of `model`'s linear layers in place and return it.

    `method` is one of `QUANTIZE_METHODS`; "none" returns the model untouched. The model is moved to `device` first
    (default: where it is); the kernel path follows from that device and the model's dtype (see the module
    docstring). `filter_fn(module, qualified_name) -> bool` restricts which linears are quantized; linears the kernel
    cannot take, or already quantized, are skipped regardless (so a model can be quantized block by block, then
    the rest). Works on any `nn.Module` (MeissonicTransformer, CLIPTextModelWithProjection). The fp32 CPU int8 path
    also puts the model in eval mode; fp32 CPU int4 works but warns that it is slow. Raises ValueError for an unknown
    method or a model already quantized with another method, and ImportError naming `pip install torchao` when the
    path needs torchao and it is missing.
    """
    _check_method(method)
    if method == "none":
        return model
    record = getattr(model, _RECORD, None)
    if record is not None and record["method"] != method:
        raise ValueError(f"the model is already quantized with {record['method']!r}; cannot add {method!r}")
    if device is not None:
        model.to(device)
    dtype = record["dtype"] if record else _model_dtype(model)
    scheme = _choose_scheme(method, _model_device(model), dtype)
    if scheme == "int4-cpu" and dtype == torch.float32:
        warnings.warn("int4 on CPU runs float32 activations ~100x slower than bfloat16 (aten's int4pack kernel): "
                      "cast the model to torch.bfloat16 first", UserWarning, stacklevel=2)
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _is_plain(module.weight) and _fits(module, scheme)
        and (filter_fn is None or filter_fn(module, name))
    ]
    _quantize_modules(model, scheme, names)
    setattr(model, _RECORD, {"method": method, "scheme": scheme, "dtype": dtype})
    return model


def quantization_method(model: nn.Module) -> str:
    """The method `model` was quantized with by `quantize` or `load_quantized` ("none" if neither)."""
    record = getattr(model, _RECORD, None)
    return record["method"] if record else "none"


def _quantized_modules(model: nn.Module) -> list[str]:
    """Names of the linears whose weights are quantized (by torchao or fbgemm)."""
    return [name for name, module in model.named_modules()
            if _is_fbgemm_linear(module) or (isinstance(module, nn.Linear) and not _is_plain(module.weight))]


def _is_fbgemm_linear(module: nn.Module) -> bool:
    """A torch.ao dynamic quantized linear (its packed weight lives in a `_packed_params` submodule)."""
    packed = getattr(module, "_packed_params", None)
    return callable(getattr(module, "_weight_bias", None)) and isinstance(packed, nn.Module)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if _is_plain(tensor) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take, torchao weights counted by their inner storage.

    A torchao tensor subclass counts its int/float8 data plus scales (and zero points); an fbgemm dynamic linear
    counts its int8 matrix, a float32 scale, an int32 zero point and an int32 column offset per output row, and its
    bias. Shared tensors count once.
    """
    total = sum(_tensor_bytes(t) for t in model.parameters()) + sum(_tensor_bytes(t) for t in model.buffers())
    for module in model.modules():
        if _is_fbgemm_linear(module):
            weight, bias = module._weight_bias()
            total += weight.numel() + 12 * weight.shape[0] + (0 if bias is None else bias.numel() * bias.element_size())
    return total


def token_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions whose top-1 code (argmax over dim 1 of (B, V, h, w) logits) matches the reference's."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (logits.argmax(dim=1) == reference.argmax(dim=1)).float().mean().item()


def _flatten(state: dict) -> dict[str, torch.Tensor]:
    """A quantized state dict as plain tensors: torchao weights by inner tensor, fbgemm weights by int8/scales."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, tuple):  # fbgemm's packed (per-channel qint8 weight, bias)
            weight, bias = value
            flat[f"{key}.int8"] = weight.int_repr()
            flat[f"{key}.scales"] = weight.q_per_channel_scales()
            flat[f"{key}.zero_points"] = weight.q_per_channel_zero_points()
            if bias is not None:
                flat[f"{key}.bias"] = bias
        elif isinstance(value, torch.Tensor) and _is_plain(value):
            flat[key] = value
        elif isinstance(value, torch.Tensor):
            names, _ = value.__tensor_flatten__()
            flat.update({f"{key}.{name}": getattr(value, name) for name in names})
        # anything else (fbgemm's packed dtype) is recreated by quantizing the skeleton again
    return {key: tensor.detach().contiguous() for key, tensor in flat.items()}


def _take(saved: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    if key not in saved:
        raise ValueError(f"the saved weights lack {key!r}: the folder does not match its quantization.json")
    tensor = saved.pop(key)
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise ValueError(f"saved {key!r} is {tensor.dtype} {tuple(tensor.shape)}, the quantized model expects "
                         f"{like.dtype} {tuple(like.shape)}: saved with another method or torchao version?")
    return tensor


def _unflatten(skeleton: dict, saved: dict[str, torch.Tensor]) -> dict:
    """The inverse of `_flatten`, shaped after the state dict of a model quantized the same way."""
    saved, state = dict(saved), OrderedDict()
    state._metadata = getattr(skeleton, "_metadata", None)  # module versions: fbgemm's linear reads its layout
    for key, like in skeleton.items():
        if isinstance(like, tuple):
            weight, bias = like
            state[key] = (torch._make_per_channel_quantized_tensor(
                _take(saved, f"{key}.int8", weight.int_repr()),
                _take(saved, f"{key}.scales", weight.q_per_channel_scales()),
                _take(saved, f"{key}.zero_points", weight.q_per_channel_zero_points()),
                0,
            ), None if bias is None else _take(saved, f"{key}.bias", bias))
        elif not isinstance(like, torch.Tensor):
            state[key] = like
        elif _is_plain(like):
            state[key] = _take(saved, key, like)
        else:
            names, attributes = like.__tensor_flatten__()
            inner = {name: _take(saved, f"{key}.{name}", getattr(like, name)) for name in names}
            state[key] = type(like).__tensor_unflatten__(inner, attributes, like.size(), like.stride())
    if saved:
        raise ValueError(f"the saved weights hold tensors the model does not have: {sorted(saved)[:5]}")
    return state


def save_quantized(model: nn.Module, folder: str | Path, method: str) -> Path:
    """Write `config.json`, `quantization.json` and the quantized weights (safetensors) of `model` to `folder`.

    A model not yet quantized is quantized with `method` first (in place); one quantized with another method is
    refused. The model must be a diffusers ConfigMixin (MeissonicTransformer); `load_quantized` reads the folder back.
    """
    _check_method(method)
    from safetensors.torch import save_file

    if not hasattr(model, "save_config"):
        raise TypeError(f"save_quantized needs a diffusers ConfigMixin model such as MeissonicTransformer, "
                        f"not {type(model).__name__}")
    record = getattr(model, _RECORD, None)
    if record is None:
        quantize(model, method)
        record = getattr(model, _RECORD, None) or {"scheme": "none", "dtype": _model_dtype(model)}
    elif record["method"] != method:
        raise ValueError(f"the model is quantized with {record['method']!r}, not {method!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    info = {"method": method, "scheme": record["scheme"], "dtype": str(record["dtype"]).removeprefix("torch."),
            "torchao_version": _torchao_version(), "torch_version": torch.__version__}
    metadata = {"method": method, "scheme": record["scheme"], "modules": json.dumps(_quantized_modules(model))}
    save_file(_flatten(model.state_dict()), folder / WEIGHTS_NAME, metadata=metadata)
    (folder / QUANTIZATION_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def is_quantized_folder(folder: str | Path) -> bool:
    """Whether `folder` was written by `save_quantized` (it holds `quantization.json`)."""
    return (Path(folder) / QUANTIZATION_CONFIG).is_file()


def saved_dtype(folder: str | Path) -> torch.dtype:
    """The precision a folder written by `save_quantized` was quantized in (the only one it loads in)."""
    return getattr(torch, json.loads((Path(folder) / QUANTIZATION_CONFIG).read_text())["dtype"])


def load_quantized(folder: str | Path, device: str | torch.device | None = None, method: str | None = None,
                   dtype: torch.dtype | None = None):
    """Read a folder written by `save_quantized` back into a quantized MeissonicTransformer (eval mode).

    The model is built on the meta device, materialised on `device` (default cpu) with zeros, quantized again with
    the saved scheme and given the saved tensors, so its logits match the saved model's bit for bit. It keeps the
    dtype it was quantized in (quantization.json); a different `dtype` is refused, as is, with `method`, a folder
    quantized with another method, one whose weights disagree with its quantization.json, and a scheme whose
    kernels do not run on `device` (the fbgemm and CPU int4 paths are CPU-only).
    """
    from safetensors import safe_open

    from .loading import owned_tensors
    from .transformer import MeissonicTransformer

    if method is not None:
        _check_method(method)
    folder = Path(folder)
    if not is_quantized_folder(folder):
        raise ValueError(f"{folder} has no {QUANTIZATION_CONFIG}: not a folder written by save_quantized")
    info = json.loads((folder / QUANTIZATION_CONFIG).read_text())
    if method is not None and info["method"] != method:
        raise ValueError(f"{folder} is quantized with {info['method']!r}, not {method!r}")
    precision = saved_dtype(folder)
    if dtype is not None and dtype != precision:
        raise ValueError(f"{folder} was quantized in {precision} and loads only in it (dtype=None), not {dtype}")
    device = torch.device(device or "cpu")
    with safe_open(folder / WEIGHTS_NAME, framework="pt", device=str(device)) as weights:
        meta = weights.metadata() or {}
        saved = owned_tensors({key: weights.get_tensor(key) for key in weights.keys()})  # out of the memory map
    scheme = info["scheme"]
    if (meta.get("method"), meta.get("scheme")) != (info["method"], scheme) or scheme not in SCHEMES:
        raise ValueError(f"{folder}: quantization.json says {info['method']!r} ({scheme}), the weights were saved "
                         f"with {meta.get('method')!r} ({meta.get('scheme')})")
    if device.type not in SCHEMES[scheme]:
        raise ValueError(f"{folder} holds {scheme} weights, which run on {'/'.join(SCHEMES[scheme])}, "
                         f"not {device.type}")
    if scheme == "int8-dynamic-torchao" and device.type == "cpu" and int8_products_saturate():
        raise ValueError(f"{folder} holds full-range int8-dynamic weights, whose products overflow in this CPU's int8 "
                         "kernels (no VNNI): quantize the unquantized model here instead (int8-dynamic then keeps "
                         "7-bit weights), or use int8")
    with torch.device("meta"):
        model = MeissonicTransformer.from_config(MeissonicTransformer.load_config(folder))
    # nn.Module.to: diffusers 0.42's ModelMixin.to logs a float32-modules warning on every dtype cast
    model = nn.Module.to(model, precision).to_empty(device=device).eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    modules = json.loads(meta.get("modules", "[]"))
    _quantize_modules(model, scheme, modules)
    model.load_state_dict(_unflatten(model.state_dict(), saved), strict=True, assign=True)
    if scheme != "none":
        setattr(model, _RECORD, {"method": info["method"], "scheme": scheme, "dtype": precision})
    return model
