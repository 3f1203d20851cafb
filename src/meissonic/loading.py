"""Finding a model folder: a local path in the released layout, or a Hugging Face repo id fetched with huggingface-hub."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
from pathlib import Path

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
REQUIRED = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler")
WEIGHTS = ("transformer", "vqvae", "text_encoder")  # the components with weight files
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelFolderError(ValueError):
    """The model folder is missing, incomplete or malformed."""


HUB_OPTIONS = ("cache_dir", "token", "local_files_only", "force_download")
DEMO = "demo"  # the model shipped inside the package, used when no other model is named


def demo_model_folder() -> Path:
    """The shipped demo model: a small Meissonic trained on `meissonic data shapes` by scripts/make_demo_model.sh."""
    from importlib import resources

    folder = Path(str(resources.files("meissonic") / "assets" / "demo-model"))
    if not (folder / "model_index.json").is_file():
        raise ModelFolderError(f"this install of meissonic has no demo model ({str(folder)!r} is missing); "
                               "name a model folder or hub repo id instead")
    return folder


DEMO_STUDENT = "demo-1step"  # a one-step student of the demo, shipped as a student folder (`student_folder`)
STUDENT_FILE = "student.json"


def student_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The folder when `name_or_path` is a student folder, else None.

    A student folder holds a one-step transformer (`transformer/`, the released layout) and `student.json`:
    {"base_model": the teacher's folder, repo id or "demo", whose tokenizer, text encoder and VQ it uses;
    "one_step": how it samples (`meissonic.one_step.OneStep`)}. `"demo-1step"` (when no folder of that name exists
    here) is the one shipped in the package, a student of `"demo"`."""
    from importlib import resources

    path = Path(name_or_path).expanduser()
    if not path.exists() and str(name_or_path) == DEMO_STUDENT:
        path = Path(str(resources.files("meissonic") / "assets" / "demo-1step"))
        if not (path / STUDENT_FILE).is_file():
            raise ModelFolderError(f"this install of meissonic has no one-step demo ({str(path)!r} is missing)")
    if not (path / STUDENT_FILE).is_file():
        return None
    if not (path / "transformer" / "config.json").is_file():
        raise ModelFolderError(f"student folder {str(path)!r} has {STUDENT_FILE} but no transformer/config.json")
    return path


def resolve_model_folder(
    name_or_path: str | os.PathLike, revision: str | None = None, variant: str | None = None, **hub_options
) -> Path:
    """A local folder, a hub repo id downloaded (or found in the cache) with `snapshot_download`, or `"demo"` (when
    no folder of that name exists here): the model shipped in the package.

    `hub_options` (cache_dir, token, local_files_only, force_download) go to `snapshot_download`."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and str(name_or_path) == DEMO:
        path = demo_model_folder()
    elif not path.exists():
        if not REPO_ID.fullmatch(str(name_or_path)):
            raise ModelFolderError(f"model folder {str(name_or_path)!r} does not exist")
        path = _download(str(name_or_path), revision, variant, hub_options)
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    """Refuse a folder that is not a pipeline in the released layout, naming what is wrong."""
    if not path.is_dir():
        raise ModelFolderError(f"model path {str(path)!r} is not a folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{str(path)!r} has no model_index.json: not a Meissonic pipeline folder")
    try:
        json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{str(index)!r} is not valid JSON ({err})") from None
    missing = [name for name in REQUIRED if not (path / name).is_dir()]
    if missing:
        raise ModelFolderError(f"{str(path)!r} lacks the component folder(s) {', '.join(missing)}")


def weights_are_pickle(component: Path, allow_pickle: bool = False) -> bool:
    """Whether a component folder's weights must be read from pickle files (True) or safetensors (False).

    Pickle files can run arbitrary code when loaded, so a folder that has only those is refused unless
    `allow_pickle`; the libraries then read them with `torch.load(weights_only=True)`."""
    files = [f for f in component.iterdir() if f.is_file()] if component.is_dir() else []
    if any(f.name.endswith(".safetensors") for f in files):
        return False
    pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise ModelFolderError(f"{str(component)!r} holds no weights (no .safetensors file)")
    if not allow_pickle:
        raise ModelFolderError(f"{str(component)!r} holds only pickle weights ({', '.join(pickles)}), which can run "
                               "code when loaded; convert them to safetensors, or allow them explicitly "
                               "(--allow-pickle, allow_pickle=True: read with torch.load(weights_only=True))")
    return True


def _download(repo_id: str, revision: str | None, variant: str | None, hub_options: dict) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    # Configs, tokenizer files and safetensors weights of one variant only (the released repo holds fp32 and fp16).
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.txt", weights],
                ignore_patterns=[] if variant else ["*.fp16.safetensors", "*.bf16.safetensors"],
                **hub_options,
            )
        )
    except HFValidationError:
        raise ModelFolderError(f"{repo_id!r} is neither an existing folder nor a valid hub repo id") from None
    except Exception as err:  # offline, unknown repo, no access: one clear line
        raise ModelFolderError(f"could not fetch {repo_id!r} from the hub ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------- configs vs weights

# tensor -> the config field that sets its shape, to name the field when a folder contradicts itself
SHAPE_FIELDS = {
    "transformer": {"embed.embeddings.weight": "vocab_size", "mlm_layer.conv2.weight": "codebook_size",
                    "context_embedder.weight": "joint_attention_dim",
                    "time_text_embed.text_embedder.linear_1.weight": "pooled_projection_dim",
                    "transformer_blocks.": "num_layers", "single_transformer_blocks.": "num_single_layers",
                    "down_block.": "downsample", "up_block.": "upsample"},
    "vqvae": {"quantize.embedding.weight": "num_vq_embeddings", "quant_conv.weight": "latent_channels"},
    "text_encoder": {"text_model.embeddings.token_embedding.weight": "vocab_size",
                     "text_model.embeddings.position_embedding.weight": "max_position_embeddings",
                     "text_projection.weight": "projection_dim", "text_model.encoder.layers.": "num_hidden_layers"},
}


def _field(component: str, tensor: str) -> str:
    for prefix, field in SHAPE_FIELDS.get(component, {}).items():
        if tensor.startswith(prefix):
            return f" (config field {field})"
    return ""


def check_config_matches_weights(component: Path, build, variant: str | None = None) -> None:
    """Refuse a component whose config contradicts its safetensors weights, naming the field, before any weight is
    read: `build()` makes the model from its config on the meta device (no memory), the file header gives the
    saved shapes. Unknown or missing tensors are named too."""
    import torch
    from safetensors import safe_open

    files = [f for f in sorted(component.glob("*.safetensors"))  # this variant's files (sharded or not)
             if (f".{variant}." in f.name if variant else f.name.count(".") == 1)]
    if not files:
        return  # pickle weights (allowed explicitly): the library's own checks apply
    saved = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                saved.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except Exception as err:  # a truncated or non-safetensors file
            raise ModelFolderError(f"{str(file)!r} is not a readable safetensors file ({err})") from None
    with torch.device("meta"):
        try:
            model = build()
        except (ValueError, TypeError) as err:
            raise ModelFolderError(f"{str(component / 'config.json')!r}: {err}") from None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    part = component.name
    for key, shape in expected.items():
        if key in saved and saved[key] != shape:
            raise ModelFolderError(f"{part}: config.json contradicts the weights{_field(part, key)}: {key} is "
                                   f"{saved[key]} in {files[0].name} but the config makes it {shape}")
    missing, unknown = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing:
        raise ModelFolderError(f"{part}: the weights lack {len(missing)} tensor(s) the config needs"
                               f"{_field(part, missing[0])}, e.g. {missing[0]}")
    if unknown:
        raise ModelFolderError(f"{part}: the weights hold {len(unknown)} tensor(s) the config has no place for"
                               f"{_field(part, unknown[0])}, e.g. {unknown[0]}")


def check_config_fields(component: Path, accepted: set[str]) -> dict:
    """The component's config.json, refused if it has a field the model does not know (fields starting with _
    are metadata)."""
    try:
        config = json.loads((component / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{str(component / 'config.json')!r} cannot be read ({err})") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{str(component / 'config.json')!r} is not a JSON object")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in accepted)
    if unknown:
        raise ModelFolderError(f"{component.name}/config.json has unknown field(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(accepted))}")
    return config


# ---------------------------------------------------------------------------------------------- weights in owned memory

ALIGNMENT = 64  # bytes: where torch's CPU allocator starts every tensor it makes (c10's gAlignment)
MADV_DONTNEED = 4  # Linux


def owned(tensor, mappings: list[tuple[int, int]] | None = None):
    """`tensor` itself when it starts on a 64-byte boundary (or lives off the CPU), else a copy in memory torch
    allocates; the file pages it was read from are then handed back (`mappings`: `file_mappings()`, read once by
    the caller of many).

    Why: safetensors hands out tensors inside the file's memory map, at offsets aligned only to their element size,
    and diffusers keeps them as the model's weights when the file already holds the dtype asked for. Some CPU kernels
    take an alignment-dependent path; MKL's matrix-vector product (a linear layer on a batch of one, such as the
    timestep embedding) sums in another order when its operand starts off a 16-byte boundary, where MKL runs its
    SSE4.2 code, as it did on an AMD EPYC (held to it with MKL_ENABLE_INSTRUCTIONS=SSE4_2, an Intel CPU does the
    same). A model read back from a file then gave logits up to 6.6e-7 away from the one that was saved. MKL promises
    identical results from run to run only for aligned arrays and a fixed thread count; weights placed where torch
    places its own tensors make a loaded model compute exactly what the model in memory did, on any CPU."""
    if tensor.device.type != "cpu" or tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    copy = tensor.clone()
    _release_file_pages(tensor, file_mappings() if mappings is None else mappings)
    return copy


def owned_tensors(tensors: dict) -> dict:
    """`owned` for each value of a dict of tensors (a state dict read from a file)."""
    mappings = file_mappings()
    return {key: owned(tensor, mappings) for key, tensor in tensors.items()}


def own_memory(module):
    """Give every plain parameter and buffer of `module` that `owned` would copy its copy, in place (the Parameter
    objects stay, so optimizers and tied references hold); returns `module`. Quantized tensor subclasses are left
    alone: `quantize.load_quantized` reads their parts through `owned`."""
    import torch

    mappings = file_mappings()
    with torch.no_grad():
        for sub in module.modules():
            for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
                if tensor is not None and type(tensor) in (torch.Tensor, torch.nn.Parameter):
                    tensor.data = owned(tensor.data, mappings)
    return module


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's file-backed memory maps (Linux; elsewhere none are known)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path: a file
            start, end = fields[0].split("-")
            found.append((int(start, 16), int(end, 16)))
    return found


def _release_file_pages(tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop the whole pages of a copied tensor's file-backed memory from this process (madvise MADV_DONTNEED), so
    that a model copied out of its memory map never holds the file's pages and its copy at once: loading the 1B
    transformer in float32 peaked at 7.9 GB instead of 4.1 GB without this. Pages of a file mapping come back from
    the file if read again, so nothing is lost; anonymous memory is never touched."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not tensor.is_contiguous() or not any(low <= start and end <= high for low, high in mappings):
        return
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
