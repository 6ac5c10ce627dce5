"""IG diffusion transformers (SiT, LightningDiT, RAEv2) with official parameter names, and their checkpoints.

  dit         the IG DiT of SiT and LightningDiT (one forward -> v_final, v_inter)
  raev2       the RAEv2 IG model: DiT trunk with condition tokens + DDT head (one forward -> x_full, x_base)
  layers      their building blocks
  lowp        which parts run in bf16/fp16
  registry    named presets of the official model zoo
  checkpoint  config resolution and loading of checkpoints (files read by igengine.safeload)

``build_model(config)`` builds the network of a config's family. Both networks share one calling
convention: forward(x (N,C,H,W) float32, t (N,) float32, y (N,) int64, drop_mask=None) -> (final,
intermediate), both (N,C,H,W); SiT and LightningDiT predict velocities, RAEv2 predicts x.

May import: igengine.config, errors, precision, safeload.
"""

import torch.nn as nn

from igengine.config import Family, ModelConfig
from igengine.models.dit import IGDiT
from igengine.models.lowp import apply_precision
from igengine.models.raev2 import RAEv2DiT
from igengine.models.registry import MODEL_NAMES, family_of, preset


def build_model(config: ModelConfig) -> nn.Module:
    """The network of ``config``'s family with the official initialisation: IGDiT (SiT, LightningDiT) or RAEv2DiT."""
    return RAEv2DiT(config) if config.family == Family.RAEV2 else IGDiT(config)


__all__ = ["IGDiT", "MODEL_NAMES", "RAEv2DiT", "apply_precision", "build_model", "family_of", "preset"]
