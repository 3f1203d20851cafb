"""Named architectures: the released Meissonic and Monetico, and small ones for tests and CPU work.

A preset holds the config of every component; `build_pipeline(preset)` makes a pipeline with random weights that
`save_pretrained` writes in the released layout. Nobody retypes architecture flags: configs travel with the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import torch
from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .pipeline import MeissonicPipeline, MeissonicScheduler
from .transformer import MeissonicTransformer

CLIP_VOCAB = 49408


def _vq(block_out_channels: list[int], latent_channels: int, codebook: int, layers: int, groups: int) -> dict:
    return {
        "act_fn": "silu",
        "block_out_channels": block_out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out_channels),
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "layers_per_block": layers,
        "lookup_from_codebook": True,
        "mid_block_add_attention": False,
        "norm_num_groups": groups,
        "norm_type": "group",
        "num_vq_embeddings": codebook,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "vq_embed_dim": None,
        "force_upcast": True,
    }


def _text(hidden: int, layers: int, heads: int, projection: int, positions: int = 77) -> dict:
    return {
        "vocab_size": CLIP_VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": projection,
        "max_position_embeddings": positions,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


def _transformer(layers: int, single: int, heads: int, head_dim: int, axes: list[int], text_dim: int,
                 codebook: int, vocab: int, compress: bool, conditioning: str) -> dict:
    return {
        "num_layers": layers,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": text_dim,
        "pooled_projection_dim": heads * head_dim,
        "axes_dims_rope": axes,
        "vocab_size": vocab,
        "codebook_size": codebook,
        "downsample": compress,
        "upsample": compress,
        "mask_rate_conditioning": conditioning,
    }


@dataclass(frozen=True)
class Preset:
    """Configs of all components plus the sampling defaults that suit the architecture."""

    description: str
    transformer: dict
    vqvae: dict
    text_encoder: dict
    resolution: int
    steps: int
    masking_schedule: str = "cosine"
    guidance: float = 9.0

    @property
    def defaults(self) -> dict:
        """The sampling defaults a pipeline of this architecture records (`MeissonicPipeline.defaults`)."""
        return {"resolution": self.resolution, "steps": self.steps, "guidance": self.guidance}


MEISSONIC_VQ = _vq([128, 256, 256, 512, 768], 64, 8192, 2, 32)
CLIP_H = _text(1024, 24, 16, 1024)

PRESETS: dict[str, Preset] = {
    "meissonic": Preset(
        "the released Meissonic (1B, 1024 px, 2x feature compression)",
        _transformer(14, 28, 8, 128, [16, 56, 56], 1024, 8192, 8256, True, "step_index"),
        MEISSONIC_VQ, CLIP_H, resolution=1024, steps=64,
    ),
    "monetico": Preset(
        "the released Monetico (1B, 512 px, no compression)",
        _transformer(14, 28, 8, 128, [16, 56, 56], 1024, 8192, 8256, False, "step_index"),
        MEISSONIC_VQ, CLIP_H, resolution=512, steps=48,
    ),
    "tiny": Preset(
        "a few-MB model of the Meissonic architecture (with compression) for tests and smoke runs",
        _transformer(1, 2, 2, 16, [4, 6, 6], 32, 64, 65, True, "mask_rate"),
        _vq([16, 16, 16, 16, 32], 8, 64, 1, 8), _text(32, 2, 2, 32), resolution=128, steps=8,
    ),
    "small": Preset(
        "a ~10M-parameter transformer with compression, 1024-code tokenizer and small CLIP, for CPU training",
        _transformer(2, 4, 4, 64, [16, 24, 24], 256, 1024, 1025, True, "mask_rate"),
        _vq([32, 64, 64, 128, 128], 16, 1024, 1, 16), _text(256, 4, 4, 256), resolution=256, steps=16,
    ),
    "demo": Preset(
        "the shipped demo's architecture: ~5M-parameter transformer with compression, 512-code f=8 tokenizer "
        "(128 px -> 16x16 tokens -> 8x8 in the transformer), small CLIP text encoder reading 32 tokens "
        "(fits in 25 MB as fp16)",
        _transformer(2, 4, 3, 64, [16, 24, 24], 64, 512, 513, True, "mask_rate"),
        # one norm group: GroupNorm over groups of 2 channels (16 channels, 8 groups) keeps only the sign pattern of a
        # flat region's features, so plain-coloured shapes lose their hue; over all channels the colour survives
        _vq([16, 32, 64, 64], 16, 512, 1, 1), _text(64, 3, 2, 192, positions=32), resolution=128, steps=12, guidance=1.5,
    ),
    "tiny-nods": Preset(
        "the tiny model without the 2x feature compression (Monetico's layout)",
        _transformer(1, 2, 2, 16, [4, 6, 6], 32, 64, 65, False, "mask_rate"),
        _vq([16, 16, 16, 16, 32], 8, 64, 1, 8), _text(32, 2, 2, 32), resolution=128, steps=8,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE tokenizer shipped with the package (OpenAI CLIP vocabulary, MIT licence)."""
    folder = resources.files("meissonic") / "assets" / "clip-tokenizer"
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


@contextmanager
def seeded_init(seed: int):
    """Random initialisation under `seed` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_pipeline(name: str, seed: int = 0) -> MeissonicPipeline:
    """A pipeline of the named architecture with random weights (seeded, so the same seed gives the same model)."""
    preset = get_preset(name)
    with seeded_init(seed):
        transformer = MeissonicTransformer(**preset.transformer)
        vqvae = VQModel(**preset.vqvae)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder))
    return assemble_pipeline(preset, transformer, vqvae, text_encoder)


def assemble_pipeline(preset: Preset, transformer, vqvae, text_encoder) -> MeissonicPipeline:
    """A preset's pipeline around models already built: the scheduler, the CLIP tokenizer and the defaults added."""
    scheduler = MeissonicScheduler(
        mask_token_id=transformer.mask_token_id, masking_schedule=preset.masking_schedule
    )
    return MeissonicPipeline(
        vqvae=vqvae,
        tokenizer=clip_tokenizer(),
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=scheduler,
        defaults=preset.defaults,
    )
