"""Building blocks shared by the SiT and LightningDiT families (RAEv2 reuses the patch embedding,
RMSNorm, RoPE, ``compile_region``, ``run_in_own_dtype`` and ``unpatchify``; ``igengine.models.raev2``).

Module and parameter names follow the official IG code (CVL-UESTC/Internal-Guidance) exactly, so
that an official state dict loads with ``strict=True``: e.g. ``x_embedder.proj``,
``t_embedder.mlp.0``, ``y_embedder.embedding_table``, ``blocks.N.adaLN_modulation.1``,
``final_layer_xr.linear``.

Mixed precision: the attention and MLP sub-modules may hold bf16/fp16 weights (see
``igengine.models.lowp``). Blocks feed them inputs in their own dtype and bring the result back
to fp32 before the gated residual update, so normalisation, adaLN modulation and the residual stream
always run in fp32.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens.  x: (N, T, D)."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


# Whether ``compile_region`` functions are traced as nested compile regions (read while Dynamo traces,
# which guards on it); the compiled backend sets it for its calls (``CompiledBackend(regions=...)``).
COMPILE_REGIONS = True


def regions_available() -> bool:
    """Whether this torch has ``torch.compiler.nested_compile_region``."""
    return hasattr(getattr(torch, "compiler", None), "nested_compile_region")


def compile_region(fn):
    """Mark ``fn`` as a nested compile region (``torch.compiler.nested_compile_region``), where torch has it.

    ``torch.compile`` then traces and compiles the region once and stamps the compiled code out at
    every call with the same input conditions (shapes, dtypes, strides): the transformer block,
    repeated 12 to 28 times per network, is compiled once instead of once per block: a third of
    SiT-XL/2's cold compile on 2 CPU threads, for a 1-5% slower steady state (the trade and the
    default per device: ``igengine.backends.compiled``). Eager calls run ``fn`` itself, and so do
    exports: under ``torch.export`` (the ONNX exporter) the plain function
    runs, so an exported graph stays flat, its nodes named by module as before.
    ``COMPILE_REGIONS = False`` (the compiled backend's ``regions=False``) traces it inline.
    """
    if not regions_available():
        return fn
    marked = torch.compiler.nested_compile_region(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        # Eager calls (the sampling hot path) go straight to ``fn``: the marker's own eager wrapper
        # costs ~0.1 ms per call on the CPU. Dynamo folds these checks while it traces.
        if torch.compiler.is_compiling() and COMPILE_REGIONS and not torch.compiler.is_exporting():
            return marked(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a strided convolution), tokens in row-major order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time (computed in fp32), then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) -> (N, dim): [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / half)."""
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class-label table; with label dropout in training it has one extra (null) row for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            labels = torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back to x's dtype (LightningDiT's RMSNorm, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm that always normalises in fp32 (used for qk-norm under bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding for a square token grid (LightningDiT, EVA-02 style).

    Each head dimension is split in two halves: the first rotates with the row index, the second
    with the column index. Within a half, channels come in interleaved pairs (2i, 2i+1) that share
    the frequency theta^(-2i / half). ``extra_tokens`` rows of angle 0 (cos 1, sin 0: no rotation)
    follow the grid's rows, for tokens without a position (RAEv2's condition tokens, appended after
    the image tokens). Buffers ``freqs_cos`` / ``freqs_sin`` have shape (grid*grid + extra_tokens,
    head_dim) and are part of the official state dicts.
    """

    def __init__(self, half_head_dim: int, grid: int, theta: float = 10000.0, extra_tokens: int = 0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, half_head_dim, 2)[: half_head_dim // 2].float() / half_head_dim))
        pos = torch.arange(grid, dtype=torch.float32)
        f = torch.einsum("p,f->pf", pos, freqs).repeat_interleave(2, dim=-1)  # (grid, half)
        rows = f[:, None, :].expand(grid, grid, -1)
        cols = f[None, :, :].expand(grid, grid, -1)
        table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)  # (T, head_dim)
        if extra_tokens:
            table = torch.cat([table, table.new_zeros(extra_tokens, table.shape[1])])  # (T + extra, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, heads, T, head_dim) with T the table's rows, rotated in fp32 and cast back."""
        xf = x.float()
        out = xf * self.freqs_cos + self.rotate_half(xf) * self.freqs_sin
        return out.type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional qk-norm and RoPE, through SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            # SiT (timm) uses affine LayerNorm(eps 1e-5); LightningDiT uses RMSNorm when use_rmsnorm.
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else Fp32LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else Fp32LayerNorm(self.head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (the timm Mlp the official code uses)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w12 -> split -> silu(x1) * x2 -> w3 (LightningDiT's SwiGLUFFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def run_in_own_dtype(module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run ``module`` in the dtype of its weights and return fp32 (identity cast in fp32 mode)."""
    dtype = weight_dtype(module)
    out = module(x.to(dtype), **kwargs)
    return out.to(x.dtype)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (SiT) with the LightningDiT options.

    x <- x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
    x <- x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
    With ``wo_shift`` the modulation has no shift terms (4 chunks instead of 6).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool = False,
        use_swiglu: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
    ):
        super().__init__()
        if use_rmsnorm:
            self.norm1 = RMSNorm(hidden_size)
            self.norm2 = RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, use_rmsnorm=use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        n_chunks = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_chunks * hidden_size, bias=True))

    @compile_region
    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * run_in_own_dtype(self.attn, h, rope=rope)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + gate_mlp.unsqueeze(1) * run_in_own_dtype(self.mlp, h)
        return x


class FinalLayer(nn.Module):
    """norm -> adaLN (shift, scale) -> linear to patch_size^2 * out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        if use_rmsnorm:
            self.norm_final = RMSNorm(hidden_size)
        else:
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W) with T = (H/p)^2, patch-internal order (p, q, c)."""
    n, t, _ = x.shape
    h = int(round(t ** 0.5))
    x = x.reshape(n, h, h, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, h * patch_size, h * patch_size)


def sincos_pos_embed_2d(embed_dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table (MAE), (grid*grid, embed_dim) in float64.

    The first half of the channels encodes the column coordinate, the second half the row
    coordinate (the MAE code's meshgrid puts w first), each as [sin(pos w_k), cos(pos w_k)] with
    w_k = 10000^(-2k / (D/2)).
    """
    assert embed_dim % 4 == 0, "embed_dim must be divisible by 4"
    coords = np.arange(grid, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # col varies along axis 1

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(embed_dim // 2, col), one_axis(embed_dim // 2, row)], axis=1)
