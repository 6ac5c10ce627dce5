"""Internal Guidance and classifier-free guidance, in the official order (docs/CONTRACTS.md, "Guidance").

1. IG, on every row the network computed (conditional and unconditional alike):
       v = v_inter + w_ig (v_final - v_inter)
2. CFG on all channels:  out = out_u + w_cfg (out_c - out_u)

The two families write the IG extrapolation in different but algebraically equal forms; the
reference path keeps each family's own form so that its rounding matches the official code:
    SiT (samplers.py):           v_inter + w (v_final - v_inter)        in the state dtype (float64)
    LightningDiT (forward_with_*): v_final + (w - 1) (v_final - v_inter)  in the network dtype (fp32)
    RAEv2 (utils/guidance_utils.py): base + w (full - base) on the x-predictions (fp32 in ``reference``),
        the unconditional rows with their own scale (``GuidanceConfig.uncond_ig_scale``); CFG then mixes
        the guided x-predictions, and only then are they turned into a velocity.
"""

from __future__ import annotations

import torch

from igengine.config import Family


def ig_combine(v_final: torch.Tensor, v_inter: torch.Tensor, scale: float, family: Family) -> torch.Tensor:
    """Extrapolate from the intermediate output through the final one by ``scale``."""
    if family in (Family.SIT, Family.RAEV2):
        return v_inter + scale * (v_final - v_inter)
    return v_final + (scale - 1.0) * (v_final - v_inter)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale (cond - uncond)."""
    return uncond + scale * (cond - uncond)
