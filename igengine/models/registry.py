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


@dataclass(frozen=True)
class RAEv2Arch:
    """A RAEv2 DiTwDDTHeadIG: trunk (hidden, depth, heads), DDT head (hidden, depth, heads), IG base depth."""

    hidden_size: int
    depth: int
    num_heads: int
    head_hidden_size: int
    head_depth: int
    head_num_heads: int
    base_model_depth: int


# XL: the released ImageNet-256 model (configs/stage2/sampling/imagenet-dinov3l-k7.yaml of nanovisionx/RAEv2).
# B: the same latent and condition tokens at base width, for tests, benchmarks and parity.
_RAEV2_SIZES = {
    "XL": RAEv2Arch(1440, 28, 20, 2048, 2, 16, 8),
    "B": RAEv2Arch(768, 12, 12, 1024, 2, 16, 4),
}

MODEL_NAMES: tuple[str, ...] = tuple(
    [f"SiT-{s}/{p}" for s in _SIT_SIZES for p in (2, 4, 8)]
    + [f"LightningDiT-{s}/{p}" for s in _LDIT_SIZES for p in (1, 2)]
    + [f"RAEv2-{s}" for s in _RAEV2_SIZES]
)


def family_of(name: str) -> Family:
    if name.startswith("SiT-"):
        return Family.SIT
    if name.startswith("LightningDiT-"):
        return Family.LIGHTNINGDIT
    if name.startswith("RAEv2-"):
        return Family.RAEV2
    raise KeyError(name)


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named model at ImageNet 256 defaults, with ``overrides`` applied.

    SiT: SD-VAE latents (4 x 32 x 32). LightningDiT: VA-VAE f16d32 latents (32 x 16 x 16) with the
    paper's options (SwiGLU, RoPE, RMSNorm). ``encoder_depth`` defaults to the official 8.
    RAEv2: DINOv3-L latents (1024 x 16 x 16), patch 1, 4 time + 8 class tokens in context, SwiGLU,
    RoPE, RMSNorm and qk-norm everywhere; ``encoder_depth`` is the official ``base_model_depth``.
    Unknown names raise KeyError with the list of known names.
    """
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    family = family_of(name)
    if family == Family.RAEV2:
        return _raev2_preset(name, overrides)
    size, patch = name.split("-", 1)[1].split("/")
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


def _raev2_preset(name: str, overrides: dict) -> ModelConfig:
    a = _RAEV2_SIZES[name.split("-", 1)[1]]
    fields = dict(
        family=Family.RAEV2,
        name=name,
        input_size=16,
        patch_size=1,
        in_channels=1024,
        hidden_size=a.hidden_size,
        depth=a.depth,
        num_heads=a.num_heads,
        encoder_depth=a.base_model_depth,
        decoder_hidden_size=a.head_hidden_size,
        head_depth=a.head_depth,
        head_num_heads=a.head_num_heads,
        time_tokens=4,
        class_tokens=8,
        use_swiglu=True,
        use_rope=True,
        use_rmsnorm=True,
        qk_norm=True,
        encoder_depth_source=f"preset {name} (official base_model_depth {a.base_model_depth})",
        num_heads_source=f"preset {name}",
    )
    fields.update(overrides)
    return ModelConfig(**fields)
