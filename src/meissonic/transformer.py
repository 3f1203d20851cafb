"""The Meissonic multimodal transformer (arXiv 2410.08261): MMDiT double-stream + single-stream blocks over VQ tokens.

Loads the released `transformer/` folder unchanged (config keys and tensor names as released). Differences from the
reference `Transformer2DModel`, each on purpose:
- any token grid works: image RoPE ids default to the grid the blocks see, and odd grids with the 2x feature
  compression are cropped back after upsampling (the reference only runs 1024 px heights with compression);
- conditioning that is constant over sampling steps can be computed once (`encode_conditions`) and reused (`predict`);
- attention is our own SDPA module, not a diffusers attention processor (whose API change broke the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .layers import (
    DoubleStreamBlock,
    MLPEmbedding,
    ResampleBlock,
    RMSNorm,
    Rope,
    SingleStreamBlock,
    TimeTextEmbedding,
    TokenEmbedding,
    TokenHead,
    rope_table,
    sinusoidal_embedding,
)
from .loading import own_memory
from .step_cache import covered_tokens

MICRO_COND_DIM = 256  # sinusoid width per micro-condition (hard-coded in the reference)
NUM_MICRO_CONDS = 5  # width, height, crop top, crop left, aesthetic score
LAYER_NORM_EPS = 1e-6
# How the sampler feeds the mask-rate condition (`timestep`); the model multiplies it by 1000 in both cases.
# "step_index": the reference pipeline's convention (the remaining step index N-1..0), used by the released weights.
# "mask_rate": the share of tokens still masked in the input, in [0, 1], as our training uses it.
MASK_RATE_CONDITIONINGS = ("step_index", "mask_rate")


@dataclass
class Conditions:
    """Everything the transformer needs that does not change between sampling steps (for one token grid size)."""

    context: torch.Tensor  # (B, L, D) projected text states
    pooled: torch.Tensor  # (B, D) pooled text + micro-conditions, through cond_embed and the text embedder
    rope: Rope  # (L + N, head_dim) cos/sin tables for [text; image]


@dataclass
class ConditionCache:
    """Holds `Conditions` between the calls of one generation, so they are computed on the first step only."""

    conditions: Conditions | None = None


class MeissonicTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Meissonic's masked-token transformer.

    Forward takes token ids (B, h, w) with `mask_token_id = vocab_size - 1` where unknown, the text encoder's
    penultimate states (B, L, joint_attention_dim), its pooled projection (B, pooled_projection_dim), the mask-rate
    condition `timestep`, and micro-conditions (B, 5); it returns logits (B, codebook_size, h, w).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DoubleStreamBlock", "SingleStreamBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 14,
        num_single_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = False,
        upsample: bool = False,
        mask_rate_conditioning: str = "step_index",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        _check_config(
            patch_size=patch_size,
            guidance_embeds=guidance_embeds,
            dim=dim,
            pooled_projection_dim=pooled_projection_dim,
            attention_head_dim=attention_head_dim,
            axes_dims_rope=list(axes_dims_rope),
            vocab_size=vocab_size,
            codebook_size=codebook_size,
            downsample=downsample,
            upsample=upsample,
            mask_rate_conditioning=mask_rate_conditioning,
        )
        eps = LAYER_NORM_EPS
        self.embed = TokenEmbedding(vocab_size, dim, eps)
        self.down_block = ResampleBlock(dim, eps, downsample=downsample)
        self.project_to_hidden_norm = RMSNorm(dim, eps)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.encoder_proj_layer_norm = RMSNorm(dim, eps)
        self.cond_embed = MLPEmbedding(pooled_projection_dim + NUM_MICRO_CONDS * MICRO_COND_DIM, dim, bias=False)
        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [DoubleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)]
        )
        self.project_from_hidden_norm = RMSNorm(dim, eps)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.up_block = ResampleBlock(dim, eps, upsample=upsample)
        self.mlm_layer = TokenHead(dim, codebook_size, eps)
        self.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' `from_pretrained`, with the weights moved out of the file's memory map into memory torch owns
        (`loading.owned`: a loaded model computes bit for bit what the saved one did, on any CPU)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
        own_memory(model)
        return loaded

    @property
    def mask_token_id(self) -> int:
        return self.config.vocab_size - 1

    def block_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, cols) of image tokens the transformer blocks see for a (height, width) token grid."""
        if self.config.downsample:
            return (height + 1) // 2, (width + 1) // 2
        return height, width

    def image_ids(self, height: int, width: int, device=None) -> torch.Tensor:
        """RoPE ids (rows*cols, 3) = (0, row, col) on the block grid, row-major (the reference's layout)."""
        rows, cols = self.block_grid(height, width)
        r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3).float()  # (N, 3)

    def encode_conditions(
        self,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        micro_conds: torch.Tensor,
        grid: tuple[int, int],
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
    ) -> Conditions:
        """Compute the step-invariant conditioning once for a (h, w) token grid."""
        batch = encoder_hidden_states.shape[0]
        micro = sinusoidal_embedding(micro_conds.flatten(), MICRO_COND_DIM).reshape(batch, -1)  # (B, 1280)
        # the model's dtype, as the reference casts to; diffusers' `self.dtype` looks for casting hooks in every
        # module first (0.7 ms a generation on the demo), so it is asked only where this layer's weight cannot tell
        # (a casting hook on it, or a packed quantized layer whose `weight` is a method)
        linear = self.cond_embed.linear_1
        weight = getattr(linear, "weight", None)
        plain = isinstance(weight, torch.Tensor) and not hasattr(linear, "_diffusers_hook")
        dtype = weight.dtype if plain else self.dtype
        pooled = torch.cat([pooled_projections, micro], dim=1).to(dtype)  # (B, P + 1280)
        pooled = self.cond_embed(pooled).to(encoder_hidden_states.dtype)  # (B, D)
        pooled = self.time_text_embed.text_embedder(pooled)  # (B, D)
        context = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))  # (B, L, D)
        device = encoder_hidden_states.device
        if txt_ids is None:
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=device)
        if img_ids is None:
            img_ids = self.image_ids(*grid, device=device)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rope = rope_table(torch.cat([txt_ids, img_ids], dim=0), list(self.config.axes_dims_rope))  # (L+N, d)
        return Conditions(context=context, pooled=pooled, rope=rope)

    def predict(self, hidden_states: torch.Tensor, timestep: torch.Tensor, conditions: Conditions,
                logits_for: torch.Tensor | None = None, kv=None, rows: torch.Tensor | None = None,
                embedding_noise: tuple[float, torch.Tensor] | None = None, modulations=None):
        """Token ids (B, h, w) + mask-rate condition -> logits (B, codebook_size, h, w).

        `logits_for` (B, h, w) bool: the output head runs only at these positions (the sampler only reads the logits
        of masked tokens) and the logits come compact, (M, codebook_size) in the order of `hidden_states[logits_for]`,
        with the full head's values.

        Step caching (`meissonic.step_cache`): `kv` records every attention layer's keys and values on a full pass.
        With `rows` (B, S), indices of positions on the block grid (`block_grid`: the compressed grid with the 2x
        feature compression), only those positions go through the blocks (not the text), every layer reading the
        others' keys and values (the text's included) from `kv`; returns `(positions, logits)`: flat indices into
        the (B, h, w) token grid of the tokens those rows cover (and that `logits_for` asks for), and their logits (K, codebook_size).

        `embedding_noise=(p, noise)`, noise (B, D, h, w): the token embeddings become `p * noise + sqrt(1 - p^2) *
        embeddings` right after the embedding layer, before the 2x compression (how Di[M]O's one-step students are
        sampled and trained; `meissonic.one_step`).

        `modulations`: a `step_cache.ModulationCache`, which computes the blocks' AdaLN modulations for several
        steps at once (one read of those weights instead of one per step) and hands each call its own.
        """
        height, width = hidden_states.shape[-2:]
        batch, dim = hidden_states.shape[0], self.config.num_attention_heads * self.config.attention_head_dim
        block_rows, block_cols = self.block_grid(height, width)
        if rows is not None and embedding_noise is None and self._plain_embedding():  # the subset's tokens alone
            x = self._partial_embedding(hidden_states, rows, block_cols)  # (B, S, D)
        else:
            x = self.embed(hidden_states)  # (B, D, h, w)
            if embedding_noise is not None:
                p, noise = embedding_noise
                x = p * noise.to(x.dtype) + math.sqrt(1 - p**2) * x
            x = self.down_block(x).flatten(2).transpose(1, 2)  # (B, N, D)
            if rows is not None:
                x = x.gather(1, rows[..., None].expand(-1, -1, dim))  # (B, S, D)
        context, rope = conditions.context, conditions.rope
        if rope[0].device != x.device:
            rope = (rope[0].to(x.device), rope[1].to(x.device))
        n_ctx = context.shape[1]
        if rows is not None:  # a partial pass: the subset's features and RoPE rows; the text only as cached K/V
            index = rows + n_ctx  # (B, S): places in the sequence [text; image]
            rope = (rope[0][index][:, None], rope[1][index][:, None])  # (B, 1, S, d)
            kv.partial(index)
            context, n_ctx = None, 0
        elif kv is not None:
            kv.full()
        x = self.project_to_hidden(self.project_to_hidden_norm(x))  # (B, N or S, D)
        # Kept in float32 (the reference casts to the model dtype first, so bf16 rounds 47 * 1000 to 47104).
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).float() * 1000
        if modulations is not None:  # a step_cache.ModulationCache: every block's modulation, computed ahead
            temb = modulations.get(self, timestep, conditions)
        else:
            temb = self.time_text_embed.time(timestep, conditions.pooled.dtype) + conditions.pooled  # (B, D)
        for block in self.transformer_blocks:
            context, x = self._run(block, x, context, temb, rope, kv)  # (B, L, D), (B, N, D)
        if context is not None:
            x = torch.cat([context, x], dim=1)  # (B, L+N, D)
        for block in self.single_transformer_blocks:
            x = self._run(block, x, temb, rope, kv)
        x = self.project_from_hidden(self.project_from_hidden_norm(x[:, n_ctx:]))  # (B, N or S, D)
        if rows is not None:
            return self._partial_logits(x, rows, (block_rows, block_cols), (height, width), logits_for)
        x = x.transpose(1, 2).reshape(batch, dim, block_rows, block_cols)  # (B, D, h', w')
        x = self.up_block(x)[..., :height, :width]  # (B, D, h, w)
        return self.mlm_layer(x, logits_for)  # (B, codebook_size, h, w), or (M, codebook_size) for `logits_for`

    def _plain_embedding(self) -> bool:
        """Are the embedding's and compression's convolutions torch's own (not wrapped by an adapter), so that
        their weights are all there is to them?"""
        downsample = self.down_block.downsample
        return type(self.embed.conv) is nn.Conv2d and (downsample is None or type(downsample.conv) is nn.Conv2d)

    def _partial_embedding(self, ids: torch.Tensor, rows: torch.Tensor, block_cols: int) -> torch.Tensor:
        """The block features (B, S, D) of the block positions `rows` (B, S), from their tokens alone: embedding and
        (with the 2x compression) the 2x2 stride-2 convolution, which maps each position's own 2x2 tokens, run per
        row as products with the layers' weights (the full pass's values to rounding)."""
        downsample = self.down_block.downsample
        grid = tuple(ids.shape[-2:])
        tokens = covered_tokens(rows, block_cols, grid, compressed=downsample is not None)  # (B, S) or (B, 4S)
        x = self.embed.rows(ids.flatten(1).gather(1, tokens.clamp(min=0)))  # (B, S or 4S, D)
        if downsample is None:
            return x
        batch, count = rows.shape
        return downsample.rows(x.unflatten(1, (count, 4)), (tokens >= 0).unflatten(1, (count, 4)))

    def _partial_logits(self, x: torch.Tensor, rows: torch.Tensor, block: tuple[int, int], grid: tuple[int, int],
                        logits_for: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The subset's block features (B, S, D) -> (flat token positions (K,), logits (K, V)) of the tokens they
        cover. The 2x2 stride-2 transposed conv of the decompression maps each block position to its own 2x2 tokens
        with no overlap, so it runs per row, as a product with its weights (the full pass's values to rounding)."""
        batch, count, dim = x.shape
        height, width = grid
        upsample = self.up_block.upsample
        if upsample is None:
            tokens = rows  # (B, S): the block grid is the token grid
        else:
            x = upsample.norm(x)
            weight = upsample.conv.weight  # (D_in, D_out, 2, 2)
            x = torch.einsum("nsi,ioab->nsabo", x, weight.to(x.dtype)).reshape(batch, count * 4, dim)  # (B, 4S, D)
            tokens = covered_tokens(rows, block[1], grid, compressed=True)  # (B, 4S)
        wanted = tokens >= 0
        if logits_for is not None:
            wanted &= logits_for.flatten(1).gather(1, tokens.clamp(min=0))
        flat = (tokens + torch.arange(batch, device=rows.device)[:, None] * (height * width))[wanted]  # (K,)
        return flat, self.mlm_layer.rows(x[wanted])  # (K,), (K, V)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        micro_conds: torch.Tensor | None = None,
        return_dict: bool = True,
        cache: ConditionCache | None = None,
        logits_for: torch.Tensor | None = None,
        kv=None,
        rows: torch.Tensor | None = None,
        embedding_noise: tuple[float, torch.Tensor] | None = None,
        modulations=None,
        **unused,
    ):
        """Reference-compatible call; returns the logits tensor (or `(logits,)` when `return_dict=False`).

        With a `cache`, the step-invariant conditioning is computed on the first call and reused after.
        `logits_for` (B, h, w) bool limits the output head to those positions, in compact form (see `predict`);
        `kv` and `rows` run full and partial passes for step caching (see `predict`).
        """
        conditions = cache.conditions if cache is not None else None
        if conditions is None:
            if micro_conds is None:
                raise ValueError("micro_conds is required: (B, 5) = [width, height, crop_top, crop_left, score]")
            conditions = self.encode_conditions(
                encoder_hidden_states, pooled_projections, micro_conds, hidden_states.shape[-2:], img_ids, txt_ids
            )
            if cache is not None:
                cache.conditions = conditions
        logits = self.predict(hidden_states, timestep, conditions, logits_for, kv, rows, embedding_noise, modulations)
        return logits if return_dict else (logits,)


def _check_config(**cfg) -> None:
    """Refuse configs this architecture cannot honour, naming the field."""
    if cfg["patch_size"] != 1:
        raise ValueError(f"patch_size={cfg['patch_size']} is not supported: Meissonic uses patch_size=1")
    if cfg["guidance_embeds"]:
        raise ValueError("guidance_embeds=True is not supported: Meissonic has no guidance embedding")
    if cfg["pooled_projection_dim"] != cfg["dim"]:
        raise ValueError(
            f"pooled_projection_dim={cfg['pooled_projection_dim']} must equal num_attention_heads * "
            f"attention_head_dim = {cfg['dim']} (the pooled vector is re-embedded at the model width)"
        )
    axes = cfg["axes_dims_rope"]
    if sum(axes) != cfg["attention_head_dim"] or any(a % 2 for a in axes):
        raise ValueError(
            f"axes_dims_rope={axes} must be even numbers summing to attention_head_dim={cfg['attention_head_dim']}"
        )
    if cfg["vocab_size"] <= cfg["codebook_size"]:
        raise ValueError(
            f"vocab_size={cfg['vocab_size']} must exceed codebook_size={cfg['codebook_size']} (the last id is the mask)"
        )
    if cfg["downsample"] != cfg["upsample"]:
        raise ValueError(f"downsample={cfg['downsample']} and upsample={cfg['upsample']} must be equal")
    if cfg["mask_rate_conditioning"] not in MASK_RATE_CONDITIONINGS:
        raise ValueError(
            f"mask_rate_conditioning={cfg['mask_rate_conditioning']!r} is not one of {MASK_RATE_CONDITIONINGS}"
        )
