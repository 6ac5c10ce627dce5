"""The RAE pixel decoder: a ViT-MAE-style transformer from DINOv3 latent tokens to image patches.

The decoder of RAEv2 (nanovisionx/RAEv2, src/stage1/decoders/decoder.py ``GeneralDecoder``), built
under the official parameter names so that a released ``decoder.pt`` (its ``state_dict()``) loads
unchanged:

    decoder_embed                                   Linear, latent channels C -> width D
    trainable_cls_token                             (1, 1, D), put before the N latent tokens
    decoder_pos_embed                               (1, 1 + N, D), fixed 2-D sin-cos (a Parameter, so in the file)
    decoder_layers.<i>.layernorm_before             pre-LayerNorm ViT layer (eps 1e-12):
    decoder_layers.<i>.attention.attention.{query, key, value}
    decoder_layers.<i>.attention.output.dense           x += proj(attention(LN(x)))
    decoder_layers.<i>.layernorm_after
    decoder_layers.<i>.intermediate.dense           x += fc2(gelu(fc1(LN(x))))   (exact GELU)
    decoder_layers.<i>.output.dense
    decoder_norm                                    LayerNorm (eps 1e-12)
    decoder_pred                                    Linear, D -> p * p * 3; the CLS row is dropped
then ``unpatchify``: (B, N, p*p*3) -> (B, 3, h*p, w*p), h = w = sqrt(N).

The number of attention heads cannot be read from tensor shapes; it comes from the width of the
official decoder configurations (configs/decoder/*/config.json), ``OFFICIAL_DECODERS``. All four
use qkv bias, GELU and LayerNorm eps 1e-12.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12  # layer_norm_eps of every official decoder config
IMAGE_CHANNELS = 3  # num_channels of every official decoder config


@dataclass(frozen=True)
class ViTMAEDecoderConfig:
    """Architecture of a RAE ViT decoder; ``grid`` latent tokens per side, ``patch_size`` pixels per token side."""

    latent_channels: int  # C: channels of the latents (the encoder's hidden size; 1024 for DINOv3-L)
    width: int  # decoder_hidden_size
    depth: int  # decoder_num_hidden_layers
    num_heads: int  # decoder_num_attention_heads
    mlp_width: int  # decoder_intermediate_size
    grid: int  # latent tokens per side (16 at 256 px)
    patch_size: int  # 16

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def parameter_count(self) -> int:
        """Parameters of the module, the fixed ``decoder_pos_embed`` included (it is in the state dict)."""
        d, m, c = self.width, self.mlp_width, self.latent_channels
        layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d
        out = self.patch_size ** 2 * IMAGE_CHANNELS
        return (c * d + d) + d + (1 + self.num_tokens) * d + self.depth * layer + 2 * d + (d * out + out)

    def flops_per_image(self) -> int:
        """Matmul FLOPs (2 per multiply-add) of decoding one image: projections, attention scores and
        weighted sums, MLP, decoder_embed and decoder_pred (the CLS row included, as the module computes it).
        Elementwise work (norms, GELU, softmax, additions) is not counted."""
        t, n, d, m, c = 1 + self.num_tokens, self.num_tokens, self.width, self.mlp_width, self.latent_channels
        per_layer = 4 * t * d * d + 2 * t * d * m + 2 * t * t * d
        return 2 * (n * c * d + self.depth * per_layer + t * d * self.patch_size ** 2 * IMAGE_CHANNELS)


# configs/decoder/<name>/config.json of nanovisionx/RAEv2: (width, depth, heads, mlp width).
# ViTSO and ViTXL have the same decoder (they differ only in fields rae.py overwrites).
OFFICIAL_DECODERS = {
    "ViTB": (768, 12, 12, 3072),
    "ViTL": (1024, 24, 16, 4096),
    "ViTSO": (1152, 28, 16, 4096),
    "ViTXL": (1152, 28, 16, 4096),
}
# Attention heads by decoder width (what a state dict cannot tell).
HEADS_BY_WIDTH = {width: heads for width, _, heads, _ in OFFICIAL_DECODERS.values()}


def official_names(cfg: ViTMAEDecoderConfig) -> list[str]:
    """The official decoder configurations ``cfg`` is (e.g. ['ViTSO', 'ViTXL']), empty if none."""
    shape = (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_width)
    return [name for name, official in OFFICIAL_DECODERS.items() if official == shape]


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """(1 + grid^2, width) float32: a zero row for the CLS token, then MAE's 2-D sin-cos table.

    Token k = (row i, column j), i = k // grid: the first width/2 channels encode j and the last
    width/2 encode i, each as [sin(pos * w_f), cos(pos * w_f)] with w_f = 10000^(-f / (width/4)).
    Computed in float64 and rounded once, as the official numpy code does.
    """
    if width % 4:
        raise ValueError(f"the sin-cos position table needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    row = pos.repeat_interleave(grid)  # i of token k
    col = pos.repeat(grid)  # j of token k

    def encode(p: torch.Tensor) -> torch.Tensor:
        angle = p[:, None] * omega[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table = torch.cat([encode(col), encode(row)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


# ----------------------------------------------------------------------------------------------
# Modules (nested as the official ones, for the parameter names)
# ----------------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D), before the output projection
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v, no mask
        return a.transpose(1, 2).reshape(b, t, d)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.attention = _SelfAttention(width, num_heads)
        self.output = _Dense(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x)))); (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, num_heads: int, mlp_width: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attention = _Attention(width, num_heads)
        self.layernorm_after = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.intermediate = _Dense(width, mlp_width)
        self.output = _Dense(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViTMAEDecoder(nn.Module):
    """Latent tokens -> images: (B, C, h, w) -> (B, 3, h * p, w * p) with h = w = ``config.grid``.

    The output is the official ``unpatchify(decoder(z).logits)``: images in about [0, 1], not clamped.
    """

    def __init__(self, cfg: ViTMAEDecoderConfig):
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"decoder width {cfg.width} is not a multiple of {cfg.num_heads} heads")
        self.config = cfg
        d = cfg.width
        self.decoder_embed = nn.Linear(cfg.latent_channels, d)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(d, cfg.grid)[None], requires_grad=False)
        self.decoder_layers = nn.ModuleList(ViTLayer(d, cfg.num_heads, cfg.mlp_width) for _ in range(cfg.depth))
        self.decoder_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(d, cfg.patch_size ** 2 * IMAGE_CHANNELS)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, d))

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) latent tokens (row-major over the grid) -> (B, N, p * p * 3) patch pixels (the official logits)."""
        x = self.decoder_embed(tokens)
        x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, h * w, p * p * 3), each patch row-major (py, px, channel) -> (B, 3, h * p, w * p)."""
        b, p, g = patches.shape[0], self.config.patch_size, self.config.grid
        x = patches.reshape(b, g, g, p, p, IMAGE_CHANNELS)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, IMAGE_CHANNELS, g * p, g * p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        if (c, h, w) != (self.config.latent_channels, self.config.grid, self.config.grid):
            raise ValueError(f"expected latents (B, {self.config.latent_channels}, {self.config.grid}, "
                             f"{self.config.grid}), got {tuple(z.shape)}")
        return self.unpatchify(self.patches(z.reshape(b, c, h * w).transpose(1, 2)))


class LayoutError(ValueError):
    """The tensors are not those of a RAE ViT decoder that igengine can build; the message says why."""


def infer_config(state: dict[str, torch.Tensor]) -> ViTMAEDecoderConfig:
    """The decoder architecture that the shapes of ``state`` describe (heads from the width table).

    Only anchor tensors are read; every key is then checked strictly against the module this config
    builds (``safeload.check_state_dict``), so a missing or mis-shaped tensor still fails.
    """
    anchors = ["decoder_embed.weight", "decoder_pos_embed", "decoder_pred.weight",
               "decoder_layers.0.intermediate.dense.weight"]
    missing = [k for k in anchors if k not in state]
    if missing:
        raise LayoutError(f"missing {', '.join(missing)}")
    for key, dims in zip(anchors, (2, 3, 2, 2)):
        if state[key].ndim != dims:
            raise LayoutError(f"{key} has shape {list(state[key].shape)}, not {dims}-dimensional")
    width, channels = (int(s) for s in state["decoder_embed.weight"].shape)
    if width not in HEADS_BY_WIDTH:
        known = {}
        for name, (w, *_) in OFFICIAL_DECODERS.items():
            known.setdefault(w, []).append(name)
        listed = ", ".join(f"{w} {'/'.join(names)}" for w, names in sorted(known.items()))
        raise LayoutError(f"its decoder width {width} is not that of an official RAEv2 decoder ({listed}), and the "
                          "number of attention heads cannot be read from the file")
    tokens = int(state["decoder_pos_embed"].shape[1]) - 1
    grid = math.isqrt(max(tokens, 0))
    out = int(state["decoder_pred.weight"].shape[0])
    patch = math.isqrt(out // IMAGE_CHANNELS)
    if grid * grid != tokens or tokens <= 0:
        raise LayoutError(f"decoder_pos_embed has {tokens} + 1 rows; {tokens} is not a square grid of tokens")
    if patch * patch * IMAGE_CHANNELS != out:
        raise LayoutError(f"decoder_pred has {out} outputs, not p * p * 3 for a patch size p")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder_layers\.(\d+)\.", k)))
    return ViTMAEDecoderConfig(latent_channels=channels, width=width, depth=depth, num_heads=HEADS_BY_WIDTH[width],
                               mlp_width=int(state["decoder_layers.0.intermediate.dense.weight"].shape[0]),
                               grid=grid, patch_size=patch)


__all__ = ["HEADS_BY_WIDTH", "LayoutError", "OFFICIAL_DECODERS", "ViTLayer", "ViTMAEDecoder", "ViTMAEDecoderConfig",
           "infer_config", "official_names", "sincos_pos_embed"]
