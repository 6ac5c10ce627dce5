"""Decoded images -> uint8 pixels, exactly as each family's official script converts them.

The decoders return images in their own range (``LatentDecoder.image_range``), unclamped; only here
are they clamped and quantised:
SiT (SiT/generate.py), x in [-1, 1]:             uint8(clamp(255 * (x + 1) / 2, 0, 255))   (truncation)
LightningDiT (tokenizer/vavae.py), x in [-1, 1]: uint8(clamp(127.5 * x + 128, 0, 255))    (truncation)
RAEv2 (src/eval/generation.py), x in [0, 1]:     uint8(255 * clamp(x, 0, 1))              (truncation)
Single-channel (pixel-space digits) images are repeated to three channels, the ADM evaluator's format.
"""

from __future__ import annotations

import numpy as np
import torch

from igengine.config import Family

PIXEL_CONVERSION = {
    Family.SIT: "uint8(clamp(255 * (x + 1) / 2, 0, 255)) [SiT/generate.py]",
    Family.LIGHTNINGDIT: "uint8(clamp(127.5 * x + 128, 0, 255)) [LightningDiT tokenizer/vavae.py]",
    Family.RAEV2: "uint8(255 * clamp(x, 0, 1)) [RAEv2 src/eval/generation.py]",
}


def to_uint8(images: torch.Tensor, family: Family) -> np.ndarray:
    """(N, C, H, W) float in the family's range ([0, 1] for RAEv2, else [-1, 1]) -> (N, H, W, 3) uint8 (NHWC)."""
    x = images.float()
    if family == Family.SIT:
        x = torch.clamp(255.0 * ((x + 1) / 2.0), 0, 255)
    elif family == Family.RAEV2:
        x = x.clamp(0, 1).mul(255)  # clamp first, then scale: the official order
    else:
        x = torch.clamp(127.5 * x + 128.0, 0, 255)
    out = x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out
