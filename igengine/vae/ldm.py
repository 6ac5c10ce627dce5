"""The decoder half of the LDM ``AutoencoderKL`` (VQGAN-KL), with the LDM parameter names.

This is the architecture of VA-VAE f16d32 (LightningDiT/tokenizer/autoencoder.py) and of the
original-format SD-VAE files. Only ``post_quant_conv`` and ``decoder.*`` are built, under the names
the official checkpoints use, so their decoder weights load unchanged:

    post_quant_conv                               1x1 conv, embed_dim -> z_channels
    decoder.conv_in                               3x3 conv, z_channels -> channels[-1]
    decoder.mid.{block_1, attn_1, block_2}        ResNet, single-head self-attention, ResNet
    decoder.up.<level>.block.<j>                  num_res_blocks + 1 ResNet blocks per level
    decoder.up.<level>.attn.<j>                   attention after each block, at attn_levels
    decoder.up.<level>.upsample.conv              nearest x2 then 3x3 conv (levels > 0)
    decoder.norm_out, decoder.conv_out            GroupNorm(32), swish, 3x3 conv -> out_channels
ResNet blocks: norm1, conv1, norm2, conv2 and a 1x1 ``nin_shortcut`` when channels change.
Level 0 is the full image resolution; the decoder runs from level L-1 (the latent grid) up to 0.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


@dataclass(frozen=True)
class LDMDecoderConfig:
    """Architecture of an LDM decoder. ``channels[i]`` is the width of level i (ch * ch_mult[i])."""

    embed_dim: int  # channels of the latents given to decode()
    z_channels: int  # channels after post_quant_conv
    channels: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # up levels with attention blocks (LDM attn_resolutions, as level ids)
    out_channels: int = 3
    num_groups: int = 32

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ddconfig of vavae_f16d32.yaml: ch 128, ch_mult (1, 1, 2, 2, 4), num_res_blocks 2, attention at
# resolution 16 of 256 (the lowest level, 4), z_channels = embed_dim = 32.
VAVAE_F16D32 = LDMDecoderConfig(embed_dim=32, z_channels=32, channels=(128, 128, 256, 256, 512),
                                num_res_blocks=2, attn_levels=(4,))
# ddconfig of the SD VAE (kl-f8): ch 128, ch_mult (1, 2, 4, 4), no attention outside the middle block.
SD_KL_F8 = LDMDecoderConfig(embed_dim=4, z_channels=4, channels=(128, 256, 512, 512), num_res_blocks=2,
                            attn_levels=())


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c_in, H, W) -> (N, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout 0 at inference
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        n, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(n, 1, c, hh * ww).transpose(2, 3) for m in (self.q, self.k, self.v))  # (N, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(a.transpose(2, 3).reshape(n, c, hh, ww))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Decoder(nn.Module):
    def __init__(self, cfg: LDMDecoderConfig):
        super().__init__()
        g, ch = cfg.num_groups, cfg.channels
        self.conv_in = nn.Conv2d(cfg.z_channels, ch[-1], 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(ch[-1], ch[-1], g)
        self.mid.attn_1 = AttnBlock(ch[-1], g)
        self.mid.block_2 = ResnetBlock(ch[-1], ch[-1], g)
        self.up = nn.ModuleList()
        for level, c_out in enumerate(ch):
            c_in = ch[level + 1] if level + 1 < len(ch) else ch[-1]
            up = nn.Module()
            up.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, g)
                                     for j in range(cfg.num_res_blocks + 1))
            up.attn = nn.ModuleList(AttnBlock(c_out, g) for _ in range(cfg.num_res_blocks + 1)) \
                if level in cfg.attn_levels else nn.ModuleList()
            if level > 0:
                up.upsample = Upsample(c_out)
            self.up.append(up)
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for j, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[j](h)
            if level > 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMDecoder(nn.Module):
    """``post_quant_conv`` + decoder: (N, embed_dim, h, w) -> (N, out_channels, h * f, w * f), f = 2^(L-1)."""

    def __init__(self, cfg: LDMDecoderConfig):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = _Decoder(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class LayoutError(ValueError):
    """The tensors do not have the layout of an LDM decoder; the message names the missing keys."""


def infer_config(state: dict[str, torch.Tensor]) -> LDMDecoderConfig:
    """The decoder architecture that the shapes of ``state`` (decoder keys only) describe.

    Only anchor tensors are read here; every other key is then checked strictly against the model
    this config builds (``checkpoint.check_state_dict``), so a missing or mis-shaped key still fails.
    GroupNorm's 32 groups cannot be read from shapes: it is the LDM constant.
    """
    anchors = ["post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
               "decoder.up.0.block.0.conv1.weight"]
    missing = [k for k in anchors if k not in state]
    if missing:
        raise LayoutError(f"missing {', '.join(missing)}")
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))}
    widths = []
    for level in range(levels):
        key = f"decoder.up.{level}.block.0.conv1.weight"
        if key not in state:
            raise LayoutError(f"missing {key} (level {level} of {levels})")
        widths.append(int(state[key].shape[0]))
    attn = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.attn\.", k))})
    pq = state["post_quant_conv.weight"]
    return LDMDecoderConfig(embed_dim=int(pq.shape[1]), z_channels=int(pq.shape[0]), channels=tuple(widths),
                            num_res_blocks=max(blocks), attn_levels=tuple(attn),
                            out_channels=int(state["decoder.conv_out.weight"].shape[0]))


__all__ = ["DECODER_PREFIXES", "LDMDecoder", "LDMDecoderConfig", "LayoutError", "SD_KL_F8", "VAVAE_F16D32",
           "infer_config"]
