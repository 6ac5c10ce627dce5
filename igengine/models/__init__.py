"""IG diffusion transformers (SiT and LightningDiT families) with official parameter names, and their checkpoints.

  dit         the IG DiT (one forward -> v_final, v_inter)
  layers      its building blocks
  lowp        which parts run in bf16/fp16
  registry    named presets of the official model zoo
  checkpoint  config resolution and loading of checkpoints (files read by igengine.safeload)

May import: igengine.config, errors, precision, safeload.
"""

from igengine.models.dit import IGDiT
from igengine.models.lowp import apply_precision
from igengine.models.registry import MODEL_NAMES, family_of, preset

__all__ = ["IGDiT", "MODEL_NAMES", "apply_precision", "family_of", "preset"]
