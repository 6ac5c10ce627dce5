"""IG diffusion transformers (SiT and LightningDiT families) with official parameter names."""

from igengine.models.dit import IGDiT
from igengine.models.precision import apply_precision
from igengine.models.registry import MODEL_NAMES, family_of, paper_sampler, preset

__all__ = ["IGDiT", "MODEL_NAMES", "apply_precision", "family_of", "paper_sampler", "preset"]
