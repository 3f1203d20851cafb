"""Loaded weights sit in memory torch owns (64-byte aligned), as a model built in memory does, so a model read back
from a file computes bit for bit what the saved one did on any CPU (see `loading.owned` for the kernel that told them
apart). The bit-for-bit tests themselves are marked `exact`; CI reruns them with the kernels held back."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from meissonic.loading import ALIGNMENT, file_mappings, own_memory, owned
from meissonic.pipeline import MeissonicPipeline
from meissonic.presets import build_pipeline
from meissonic.quantize import load_quantized, quantize, save_quantized
from meissonic.training.common import load_vqvae
from meissonic.transformer import MeissonicTransformer


def tensors(module: torch.nn.Module):
    """(name, plain tensor) for every parameter and buffer, the parts of quantized tensor subclasses included."""

    def parts(name, tensor):
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            yield name, tensor
        elif hasattr(tensor, "__tensor_flatten__"):
            for inner in tensor.__tensor_flatten__()[0]:
                yield from parts(f"{name}.{inner}", getattr(tensor, inner))

    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        yield from parts(name, tensor)


def misaligned(module: torch.nn.Module) -> list[str]:
    return [name for name, t in tensors(module) if t.device.type == "cpu" and t.data_ptr() % ALIGNMENT]


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory):
    """A pipeline saved in float32, the precision it loads in: the case where diffusers keeps the file's memory map."""
    folder = tmp_path_factory.mktemp("fp32") / "tiny"
    build_pipeline("tiny", seed=1).save_pretrained(folder)
    return folder


def test_safetensors_alone_hands_out_tensors_off_the_alignment(fp32_folder):
    """Why the project copies: the tensors safetensors gives (and diffusers keeps) start where the file puts them."""
    with safe_open(fp32_folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        offsets = [f.get_tensor(key).data_ptr() % ALIGNMENT for key in f.keys()]
    assert any(offsets), offsets


def test_owned_copies_only_what_starts_off_the_alignment():
    base = torch.arange(40, dtype=torch.float32)
    assert base.data_ptr() % ALIGNMENT == 0 and owned(base) is base
    view = base[2:34]  # 8 bytes in: off the alignment
    copy = owned(view)
    assert copy.data_ptr() % ALIGNMENT == 0 and torch.equal(copy, view) and copy.data_ptr() != view.data_ptr()
    meta = torch.empty(3, device="meta")
    assert owned(meta) is meta

    layer = torch.nn.Linear(4, 8)
    weight = layer.weight
    layer.weight.data = torch.arange(40, dtype=torch.float32)[1:33].view(8, 4)
    assert own_memory(layer) is layer and layer.weight is weight  # the Parameter stays, optimizers keep it
    assert not misaligned(layer) and torch.equal(layer.weight, torch.arange(1, 33, dtype=torch.float32).view(8, 4))


def test_every_loader_places_weights_in_owned_memory(fp32_folder, tmp_path):
    transformer = MeissonicTransformer.from_pretrained(fp32_folder / "transformer")
    assert not misaligned(transformer)
    pipe = MeissonicPipeline.from_pretrained(fp32_folder)
    for part in (pipe.transformer, pipe.vqvae, pipe.text_encoder):
        assert not misaligned(part), type(part).__name__
    assert not misaligned(load_vqvae(str(fp32_folder), "--model"))
    for method in ("none", "int8"):
        save_quantized(quantize(build_pipeline("tiny", seed=1).transformer, method), tmp_path / method, method)
        assert not misaligned(load_quantized(tmp_path / method)), method


def _resident_kib(address: int) -> int:
    """Resident memory (KiB) of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("address not mapped")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_copied_tensor_hands_its_file_pages_back_and_loses_nothing(tmp_path):
    """Loading never holds a weight twice: once copied, the tensor's pages of the file's memory map are dropped
    (they come back from the file if read again)."""
    from safetensors.torch import save_file

    values = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB
    save_file({"pad": torch.zeros(3), "w": values}, tmp_path / "w.safetensors")  # "w" starts off the alignment
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        mapped = f.get_tensor("w")
    assert mapped.data_ptr() % ALIGNMENT and any(a <= mapped.data_ptr() < b for a, b in file_mappings())
    assert torch.equal(mapped, values)  # every page read: resident
    before = _resident_kib(mapped.data_ptr())
    copy = owned(mapped)
    assert _resident_kib(mapped.data_ptr()) < before - 11 * 1024  # the 12 MiB were handed back
    assert torch.equal(copy, values) and torch.equal(mapped, values)  # and read again from the file
