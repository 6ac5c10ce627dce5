"""Named model presets (the official model zoo)."""

from __future__ import annotations

from dataclasses import dataclass

from igengine.config import Family, ModelConfig


@dataclass(frozen=True)
class Arch:
    depth: int
    hidden_size: int
    num_heads: int


_SIT_SIZES = {
    "S": Arch(12, 384, 6),
    "B": Arch(12, 768, 12),
    "L": Arch(24, 1024, 16),
    "XL": Arch(28, 1152, 16),
}
_LDIT_SIZES = {
    "B": Arch(12, 768, 12),
    "L": Arch(24, 1024, 16),
    "XL": Arch(28, 1152, 16),
    "1p0B": Arch(24, 1536, 24),
    "1p6B": Arch(28, 1792, 28),
}

# The official constructors default to encoder_depth = 8 (SiT/models/sit.py, LightningDiT config).
OFFICIAL_ENCODER_DEPTH = 8

MODEL_NAMES: tuple[str, ...] = tuple(
    [f"SiT-{s}/{p}" for s in _SIT_SIZES for p in (2, 4, 8)]
    + [f"LightningDiT-{s}/{p}" for s in _LDIT_SIZES for p in (1, 2)]
)


def family_of(name: str) -> Family:
    if name.startswith("SiT-"):
        return Family.SIT
    if name.startswith("LightningDiT-"):
        return Family.LIGHTNINGDIT
    raise KeyError(name)


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named model at ImageNet 256 defaults, with ``overrides`` applied.

    SiT: SD-VAE latents (4 x 32 x 32). LightningDiT: VA-VAE f16d32 latents (32 x 16 x 16) with the
    paper's options (SwiGLU, RoPE, RMSNorm). ``encoder_depth`` defaults to the official 8.
    Unknown names raise KeyError with the list of known names.
    """
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    size, patch = name.split("-", 1)[1].split("/")
    family = family_of(name)
    if family == Family.SIT:
        a = _SIT_SIZES[size]
        base = dict(input_size=32, in_channels=4)
    else:
        a = _LDIT_SIZES[size]
        base = dict(input_size=16, in_channels=32, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    fields = dict(
        family=family,
        name=name,
        patch_size=int(patch),
        hidden_size=a.hidden_size,
        depth=a.depth,
        num_heads=a.num_heads,
        encoder_depth=OFFICIAL_ENCODER_DEPTH,
        encoder_depth_source=f"preset {name} (official default {OFFICIAL_ENCODER_DEPTH})",
        num_heads_source=f"preset {name}",
        **base,
    )
    fields.update(overrides)
    return ModelConfig(**fields)
