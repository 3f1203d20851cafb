"""Building blocks of the Meissonic transformer (arXiv 2410.08261), written for this project.

Parameter names follow the released checkpoint (which inherited them from diffusers' `Attention`, `FeedForward`,
`AdaLayerNormZero`, `RMSNorm`, ...), so `load_state_dict` is name-for-name. The maths follows the reference's
Flux-style MMDiT blocks; the attention is plain `scaled_dot_product_attention`, with no attention-processor plumbing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (S, head_dim), float32


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, computed in float32, with a learned scale (`weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def channels_last_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a last-dimension norm to a (B, C, H, W) map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) scalars -> (N, dim) features, cosine half first (diffusers' `flip_sin_to_cos=True`, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, dim)


class MLPEmbedding(nn.Module):
    """Linear -> SiLU -> Linear; the shape of diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection`."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """temb = MLP(sinusoid_256(t)) + MLP(pooled); names as diffusers' `CombinedTimestepTextProjEmbeddings`."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedding(256, dim)
        self.text_embedder = MLPEmbedding(pooled_dim, dim)

    def time(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(sinusoidal_embedding(timestep, 256).to(dtype))  # (B or 1, D)


# ---------------------------------------------------------------------------------------------- rotary embeddings


def rope_table(ids: torch.Tensor, axes_dims: list[int], theta: float = 10000.0) -> Rope:
    """Flux-style axial RoPE: ids (S, n_axes) -> cos, sin (S, sum(axes_dims)), pairs repeated (interleaved layout).

    Frequencies are computed in float64 (as the reference does off-MPS) and returned in float32.
    """
    pos = ids.to(torch.float64)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)  # (dim/2,)
        angles = torch.outer(pos[:, axis], freqs)  # (S, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, H, S, D) by the table (S, D); maths in float32."""
    cos, sin = rope
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, S, D/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (B, H, S, D)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention with per-head RMSNorm on q/k and RoPE, in two flavours.

    joint=True (double-stream blocks): image stream (to_q/k/v, to_out.0) and text stream (add_*_proj, to_add_out)
    attend together over the sequence [text; image]. joint=False (single-stream blocks): q/k/v only, no output
    projection (the block's `proj_out` does it).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.joint = joint
        if joint:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q = RMSNorm(head_dim, eps)
            self.norm_added_k = RMSNorm(head_dim, eps)
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, S, inner) -> (B, H, S, d)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        return norm_q(self._heads(to_q(x))), norm_k(self._heads(to_k(x))), self._heads(to_v(x))

    def forward(self, x: torch.Tensor, rope: Rope, context: torch.Tensor | None = None, kv=None):
        """`kv`: a `step_cache.KVReuse`, which records this layer's keys and values on a full pass and, on a
        partial pass (x holds a subset of the image positions, no text), returns every position's, the subset's
        fresh; a joint layer then gets `context=None` and returns (image, None)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)  # (B, H, N, d)
        n_ctx = 0
        if context is not None:
            cq, ck, cv = self._qkv(
                context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )  # (B, H, L, d)
            n_ctx = context.shape[1]
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, H, L+N, d)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is not None and kv.index is not None:  # a partial pass: a few queries against every key
            out = few_query_attention(q, *kv(k, v))  # (B, H, S, d)
        else:
            if kv is not None:
                k, v = kv(k, v)  # a full pass: recorded
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, S, d); no mask: the reference lets pads be seen
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, S, inner)
        if not self.joint:
            return out
        if context is None:  # a partial pass: the image queries alone, the text's keys and values from `kv`
            return self.to_out[0](out), None
        return self.to_out[0](out[:, n_ctx:]), self.to_add_out(out[:, :n_ctx])  # image (B, N, D), text (B, L, D)


def few_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matrix products, the softmax in float32: for a partial pass's few queries
    (tens) against every key, where torch's CPU flash kernel costs more in bf16 (0.56 ms for 38 queries x 333 keys,
    8 heads of 128, 2-core EPYC). The scores in float32; the same values as SDPA to rounding."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, S, L+N)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, stored as `net.0.proj` / `net.2` like diffusers' `FeedForward`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GeluProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class AdaLNZero(nn.Module):
    """SiLU -> Linear(D, n*D) modulation; LayerNorm without affine parameters (eps 1e-6)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, temb: torch.Tensor | Modulations) -> tuple[torch.Tensor, ...]:
        if isinstance(temb, Modulations):  # computed before the call (`step_cache.ModulationCache`)
            return temb[self].chunk(self.chunks, dim=1)
        return self.linear(F.silu(temb)).chunk(self.chunks, dim=1)  # n x (B, D)


class Modulations(dict):
    """Every `AdaLNZero` layer's output for the rows of one call, {layer: (B, n*D)}: passed through the blocks in
    place of the conditioning vector, each layer looks its own up instead of running its product."""

    @staticmethod
    def compute(layers: list[AdaLNZero], temb: torch.Tensor) -> Modulations:
        """Each layer's modulation of the rows of `temb` (R, D), one product per layer for all rows."""
        return Modulations({layer: layer.linear(F.silu(temb)) for layer in layers})

    def rows(self, index: slice) -> Modulations:
        return Modulations({layer: value[index] for layer, value in self.items()})


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return x * (1 + scale[:, None]) + shift[:, None]


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text streams with their own weights, joint attention (reference `TransformerBlock`)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLNZero(dim, 6)
        self.norm1_context = AdaLNZero(dim, 6)
        self.attn = Attention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rope: Rope, kv=None):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)  # 6 x (B, D)
        if context is None:  # a partial pass (step caching): the text stream is not computed
            x = x + gate[:, None] * self.attn(modulate(x, shift, scale), rope, None, kv)[0]
            return None, x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        attn, c_attn = self.attn(modulate(x, shift, scale), rope, modulate(context, c_shift, c_scale), kv)
        x = x + gate[:, None] * attn  # (B, N, D)
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))
        context = context + c_gate[:, None] * c_attn  # (B, L, D)
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp))
        return clip_fp16(context), x


class SingleStreamBlock(nn.Module):
    """Flux single block: parallel attention and MLP on the joint sequence (reference `SingleTransformerBlock`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaLNZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, dim * mlp_ratio)
        self.attn = Attention(dim, heads, head_dim, joint=False)
        self.proj_out = nn.Linear(dim + dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: Rope, kv=None) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)  # 3 x (B, D)
        h = modulate(x, shift, scale)  # (B, S, D)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (B, S, 4D)
        out = self.proj_out(torch.cat([self.attn(h, rope, kv=kv), mlp], dim=2))  # (B, S, D)
        return clip_fp16(x + gate[:, None] * out)


class TokenEmbedding(nn.Module):
    """Token ids (B, h, w) -> Embedding -> RMSNorm -> 1x1 conv -> (B, D, h, w) (reference `UVit2DConvEmbed`)."""

    def __init__(self, vocab_size: int, dim: int, eps: float):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim, eps)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(ids)).permute(0, 3, 1, 2))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (...) -> features (..., D), token by token (the 1x1 conv as a product: the same values to rounding)."""
        return F.linear(self.layer_norm(self.embeddings(ids)), self.conv.weight.flatten(1))


class TokenHead(nn.Module):
    """(B, D, h, w) -> 1x1 conv -> RMSNorm -> 1x1 conv -> logits (B, codebook_size, h, w) (reference `ConvMlmLayer`).

    A 1x1 convolution is a matrix product over positions, and runs as one here (`F.linear` with the conv weights, on
    the positions as rows): same logits to float32 rounding, and the masked-only head costs its share of the positions
    (`scripts/bench_head.py`: a 1024-wide head with 8192 codes on 2 x 64 x 64 positions, fp32, 2-core Xeon: full
    0.53 s; masked-only at 5%, 60%, 90% and 100% of the positions 0.03, 0.31, 0.46 and 0.52 s)."""

    def __init__(self, dim: int, codebook_size: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim, eps)
        self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Features (..., D) -> logits (..., codebook_size), position by position."""
        hidden = F.linear(x, self.conv1.weight.flatten(1))  # (..., D)
        return F.linear(self.layer_norm(hidden), self.conv2.weight.flatten(1))  # (..., V)

    def forward(self, x: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V, h, w), positions-major in memory (a channels-last view: `permute(0, 2, 3, 1)` is free).

        `where` (B, h, w) bool: only the logits of those positions, compact (M, V) in the order of `x[where]` (each
        position is independent): the head costs its share of the positions, and nothing is written elsewhere."""
        batch, dim, height, width = x.shape
        # positions as the rows of one matrix: a product on a permuted 4-D view would run as a batched one with the
        # weight copied once per grid row (171 ms per pass for the 1B at 512 px in bf16, a fifth of the pass)
        features = x.permute(0, 2, 3, 1).reshape(-1, dim)  # (B * h * w, D)
        if where is None:
            return self.rows(features).unflatten(0, (batch, height, width)).permute(0, 3, 1, 2)  # (B, V, h, w)
        if bool(where.all()):  # every position: the full head's rows as they are, without gathering the features
            return self.rows(features)  # (B * h * w, V)
        return self.rows(features[where.reshape(-1)])  # (M, V)


class Downsample(nn.Module):
    """2x feature compression: RMSNorm, zero-pad right/bottom by one, 2x2 stride-2 conv (reference `Downsample2D`).

    The pad only matters for odd grids, where it keeps the last row/column (the upsample output is cropped back).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(channels_last_norm(self.norm, x), (0, 1, 0, 1)))  # (B, D, ceil(h/2), ceil(w/2))

    def rows(self, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """The 2x2 tokens under each of S compressed positions, (B, S, 4, D) in the order (0,0), (0,1), (1,0), (1,1),
        -> their compressed features (B, S, D); `inside` (B, S, 4) is False where the zero pad stands (odd grids)."""
        x = torch.where(inside[..., None], self.norm(x), 0)  # the pad comes after the norm: zero features
        weight = self.conv.weight.permute(0, 2, 3, 1).flatten(1)  # (D_out, 2 * 2 * D_in), rows as x's order
        return F.linear(x.flatten(2), weight.to(x.dtype))


class Upsample(nn.Module):
    """2x feature decompression: RMSNorm then 2x2 stride-2 transposed conv (reference `Upsample2D`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.conv = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(channels_last_norm(self.norm, x))  # (B, D, 2h, 2w)


class ResampleBlock(nn.Module):
    """Holder that gives the released names `down_block.downsample` / `up_block.upsample`."""

    def __init__(self, dim: int, eps: float, downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.downsample = Downsample(dim, eps) if downsample else None
        self.upsample = Upsample(dim, eps) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x
