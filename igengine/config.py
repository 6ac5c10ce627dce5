"""Typed, frozen configuration records shared by every layer of igengine.

Each record serialises to plain JSON (``to_dict``) and is written beside every artifact, so that a
sample, an exported graph or a benchmark can always be traced back to the exact settings used.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igengine.errors import ConfigError

CACHE_ENV = "IGENGINE_CACHE"


def cache_root() -> Path:
    """Root folder of every igengine cache (ONNX exports, TensorRT engines, Inductor artifacts, NVRTC
    kernels, graph-file digests): ``$IGENGINE_CACHE`` if set, else ``$XDG_CACHE_HOME/igengine``,
    else ``~/.cache/igengine``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "igengine"


class Family(str, enum.Enum):
    """Model family; fixes the time convention and the official solver semantics.

    SIT: t = 1 is noise, t = 0 is data, v = eps - x0 (SiT/samplers.py).
    LIGHTNINGDIT: t = 0 is noise, t = 1 is data, v = x1 - eps (LightningDiT/transport).
    RAEV2: t = 1 is noise, t = 0 is data, x_t = (1 - t) x + t eps; the network predicts x and
    v = (x_t - x_hat) / max(t, 0.05) (RAEv2 src/stage2/transport).
    """

    SIT = "sit"
    LIGHTNINGDIT = "lightningdit"
    RAEV2 = "raev2"


class Precision(str, enum.Enum):
    """Numerical mode of a sampling run (``igengine.precision`` derives everything from it).

    REFERENCE: the family's official numerics (SiT: float64 state and guidance; LightningDiT:
    float32 state), fp32 network, TF32 disabled.
    FP32: fp32 network and fp32 state, TF32 disabled (IEEE fp32 matmuls).
    TF32: as FP32, but CUDA matmuls and convolutions may use TF32 tensor cores: what the official
    sampling scripts run on a GPU (they set allow_tf32 = True). On the CPU identical to FP32.
    BF16 / FP16: attention and MLP matmuls in low precision; normalisation, adaLN modulation,
    embeddings, output heads, the residual stream, the solver state and guidance stay fp32.
    """

    REFERENCE = "reference"
    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"
    FP16 = "fp16"


class Solver(str, enum.Enum):
    """Integrators. SiT: sde (Euler-Maruyama, default), ode-euler, ode-heun.
    LightningDiT: heun2 (torchdiffeq fixed-grid Heun, default), euler. RAEv2: euler (on x-predictions)."""

    SDE = "sde"
    ODE_EULER = "ode-euler"
    ODE_HEUN = "ode-heun"
    HEUN2 = "heun2"
    EULER = "euler"


class BackendName(str, enum.Enum):
    """How the network runs (``igengine.backends``): eager torch, torch.compile, ONNX Runtime, TensorRT."""

    TORCH = "torch"
    COMPILED = "compiled"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    @property
    def needs_graph(self) -> bool:
        """Runs an exported ONNX graph (or an engine built from one)."""
        return self in (BackendName.ONNXRUNTIME, BackendName.TENSORRT)


SOLVERS_BY_FAMILY: dict[Family, tuple[Solver, ...]] = {
    Family.SIT: (Solver.SDE, Solver.ODE_EULER, Solver.ODE_HEUN),
    Family.LIGHTNINGDIT: (Solver.HEUN2, Solver.EULER),
    Family.RAEV2: (Solver.EULER,),
}

# RAEv2-only fields of ModelConfig and GuidanceConfig: left out of ``to_dict`` while None, so that the
# records (and run keys) of the other families are the ones earlier versions wrote.
_OPTIONAL_WHEN_NONE = frozenset({"head_depth", "head_num_heads", "time_tokens", "class_tokens", "ig_scale_uncond"})


def _without_unset(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not (k in _OPTIONAL_WHEN_NONE and v is None)}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an IG diffusion transformer.

    ``encoder_depth`` is the number of blocks after which the intermediate IG head
    (``final_layer_xr``) reads the token stream. It cannot be recovered from tensor shapes, so
    ``encoder_depth_source`` records where the value came from (flag, checkpoint args, preset).

    RAEv2 (a DiT trunk with in-context condition tokens plus a DDT head): ``hidden_size``, ``depth``
    and ``num_heads`` describe the trunk, ``decoder_hidden_size``, ``head_depth`` and
    ``head_num_heads`` the DDT head, ``encoder_depth`` is the official ``base_model_depth`` (the
    trunk block whose image tokens feed ``base_final_layer``), and ``time_tokens`` / ``class_tokens``
    count the condition tokens appended to the image tokens (official ``cond_arch``).
    """

    family: Family
    name: str  # e.g. "SiT-XL/2", "LightningDiT-XL/1", "SiT-digits"
    input_size: int  # spatial size of x (latent or pixel grid)
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    encoder_depth: int
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 means the label table has a null-class row
    decoder_hidden_size: int | None = None  # SiT's decoder / RAEv2's DDT-head width; None = hidden_size
    qk_norm: bool = False
    use_swiglu: bool = False
    use_rope: bool = False
    use_rmsnorm: bool = False
    wo_shift: bool = False
    learn_sigma: bool = False
    pixel_space: bool = False  # True: x is an image in [-1, 1], no VAE needed
    encoder_depth_source: str = "unspecified"
    num_heads_source: str = "unspecified"
    head_depth: int | None = None  # RAEv2: blocks of the DDT head
    head_num_heads: int | None = None  # RAEv2: attention heads of the DDT head
    time_tokens: int | None = None  # RAEv2: in-context time tokens
    class_tokens: int | None = None  # RAEv2: in-context class tokens

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 1 <= self.encoder_depth <= self.depth:
            problems.append(f"encoder_depth {self.encoder_depth} must lie in [1, depth={self.depth}]")
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.use_rope and (self.hidden_size // self.num_heads) % 4:
            problems.append("RoPE needs a head dimension divisible by 4")
        if self.family == Family.SIT and (self.use_swiglu or self.use_rope or self.use_rmsnorm or self.wo_shift):
            problems.append("SwiGLU, RoPE, RMSNorm and no-shift adaLN are LightningDiT options")
        raev2 = ("head_depth", "head_num_heads", "time_tokens", "class_tokens")
        if self.family == Family.RAEV2:
            unset = [k for k in raev2 + ("decoder_hidden_size",) if getattr(self, k) is None]
            if unset:
                problems.append(f"a RAEv2 model needs {', '.join(unset)}")
            elif self.decoder_hidden_size % self.head_num_heads:
                problems.append(f"the DDT head's width {self.decoder_hidden_size} is not divisible by its "
                                f"{self.head_num_heads} heads")
            elif (self.decoder_hidden_size // self.head_num_heads) % 4:
                problems.append("RoPE needs a DDT-head head dimension divisible by 4")
        elif any(getattr(self, k) is not None for k in raev2):
            problems.append(f"{', '.join(raev2)} are RAEv2 fields")
        if problems:
            raise ValueError(f"invalid model config {self.name}: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (CFG) row: the last row of the label table."""
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def head_hidden_size(self) -> int:
        return self.decoder_hidden_size or self.hidden_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _without_unset(_jsonable(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> "ModelConfig":
        """The inverse of ``to_dict``; unknown keys or bad values raise ConfigError naming ``source``."""
        d = _known_keys(cls, d, source)
        return _build(cls, source, family=_enum(Family, d.pop("family", None), source, "family"), **d)


@dataclass(frozen=True)
class GuidanceConfig:
    """IG and CFG scales with their intervals, in the family's own time convention.

    IG is active at time t when ``ig_scale > 1`` and ``ig_interval[0] <= t <= ig_interval[1]``.
    CFG is active when ``cfg_scale > 1`` and ``cfg_interval[0] <= t <= cfg_interval[1]``.
    For SiT, t = 1 is noise (paper: CFG for t <= 0.7, i.e. interval (0, 0.7)); for LightningDiT,
    t = 0 is noise (paper: CFG for t >= 0.19, i.e. interval (0.19, 1)); for RAEv2, t = 1 is noise
    (paper: IG 1.78 for t >= 0.10, CFG off).

    ``ig_scale_uncond`` (RAEv2 only): the IG scale of the unconditional rows of a CFG call, None =
    ``ig_scale`` (the official ``guidance.ig.unconditional_scale``). RAEv2's IG is on when
    ``ig_scale > 1`` or ``ig_scale_uncond`` is set and not 1 (``GuidanceConfig.use_ig`` of
    src/configs/stage2.py), and then extrapolates with the scales as given.
    """

    ig_scale: float = 1.0
    ig_interval: tuple[float, float] = (0.0, 1.0)
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    ig_scale_uncond: float | None = None

    def __post_init__(self) -> None:
        for name in ("ig_scale", "cfg_scale", "ig_scale_uncond"):
            v = getattr(self, name)
            if v is None and name == "ig_scale_uncond":
                continue
            if not (v >= 0.0) or v != v or v == float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {v}")
        for name in ("ig_interval", "cfg_interval"):
            lo, hi = getattr(self, name)
            if not (0.0 <= lo <= hi <= 1.0):
                raise ValueError(f"`{name}` must be LOW,HIGH with 0 <= LOW <= HIGH <= 1, got {lo},{hi}")

    def ig_active(self, t: float) -> bool:
        return self.ig_scale > 1.0 and self.ig_interval[0] <= t <= self.ig_interval[1]

    def cfg_active(self, t: float) -> bool:
        return self.cfg_scale > 1.0 and self.cfg_interval[0] <= t <= self.cfg_interval[1]

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    @property
    def uncond_ig_scale(self) -> float:
        """The IG scale of the unconditional rows: ``ig_scale_uncond``, else ``ig_scale``."""
        return self.ig_scale if self.ig_scale_uncond is None else self.ig_scale_uncond

    @property
    def raev2_ig_on(self) -> bool:
        """RAEv2's rule (src/configs/stage2.py ``use_ig``): a scale above 1, or an unconditional scale other than 1."""
        return self.ig_scale > 1.0 or (self.ig_scale_uncond is not None and self.ig_scale_uncond != 1.0)

    def to_dict(self) -> dict[str, Any]:
        return _without_unset(_jsonable(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "guidance config") -> "GuidanceConfig":
        d = _known_keys(cls, d, source)
        for key in ("ig_interval", "cfg_interval"):
            if key in d:
                d[key] = _interval(d[key], source, key)
        return _build(cls, source, **d)


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that defines the numbers a sampling run produces, apart from model weights."""

    solver: Solver
    steps: int
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    timestep_shift: float = 0.0  # LightningDiT, RAEv2: t' = s t / (1 + (s - 1) t) when s > 0
    precision: Precision = Precision.REFERENCE

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {self.steps}")
        if self.solver in (Solver.SDE,) and self.steps < 2:
            raise ValueError("the SDE solver needs `steps` >= 2 (linspace(1, 0.04, steps) then 0)")
        if self.solver == Solver.HEUN2 and self.steps < 2:
            raise ValueError("the LightningDiT solvers need `steps` >= 2 (grid linspace(0, 1, steps))")
        if not (self.timestep_shift >= 0.0 and self.timestep_shift != float("inf")):
            raise ValueError(f"`timestep_shift` must be a finite number >= 0, got {self.timestep_shift}")

    def to_dict(self) -> dict[str, Any]:
        d = _jsonable(dataclasses.asdict(self))
        d["guidance"] = _without_unset(d["guidance"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "sampler config") -> "SamplerConfig":
        """The inverse of ``to_dict``; unknown keys or bad values raise ConfigError naming ``source``."""
        d = _known_keys(cls, d, source)
        if "guidance" in d:
            g = d["guidance"]
            d["guidance"] = g if isinstance(g, GuidanceConfig) else GuidanceConfig.from_dict(_mapping(g, source, "guidance"), source)
        if "solver" in d:
            d["solver"] = _enum(Solver, d["solver"], source, "solver")
        if "precision" in d:
            d["precision"] = _enum(Precision, d["precision"], source, "precision")
        return _build(cls, source, **d)


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler settings given in part (a checkpoint's recommendation, a user's choices): None = not given.

    Flat, as users and checkpoints write them (``igengine.sampler_defaults`` metadata):
    ``{"solver": "sde", "steps": 50, "cfg_scale": 1.35, "cfg_interval": [0, 0.7], ...}``.
    ``over(base)`` lays them over a complete SamplerConfig.
    """

    solver: Solver | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    ig_scale: float | None = None
    ig_interval: tuple[float, float] | None = None
    timestep_shift: float | None = None
    ig_scale_uncond: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "sampler settings") -> "SamplerSettings":
        d = _known_keys(cls, _mapping(d, source, "sampler settings"), source)
        try:
            if d.get("solver") is not None:
                d["solver"] = _enum(Solver, d["solver"], source, "solver")
            if d.get("steps") is not None:
                if isinstance(d["steps"], bool) or float(d["steps"]) != int(d["steps"]):
                    raise ValueError
                d["steps"] = int(d["steps"])
            for key in ("cfg_scale", "ig_scale", "timestep_shift", "ig_scale_uncond"):
                if d.get(key) is not None:
                    d[key] = float(d[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: a value of {sorted(d)} has the wrong type") from None
        for key in ("cfg_interval", "ig_interval"):
            if d.get(key) is not None:
                d[key] = _interval(d[key], source, key)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in _jsonable(dataclasses.asdict(self)).items() if v is not None}

    def over(self, base: "SamplerConfig", source: str = "sampler settings") -> "SamplerConfig":
        """``base`` with every given field of these settings replacing its own."""
        g = base.guidance
        guidance = {k: getattr(self, k) if getattr(self, k) is not None else getattr(g, k)
                    for k in ("ig_scale", "ig_interval", "cfg_scale", "cfg_interval", "ig_scale_uncond")}
        top = {k: getattr(self, k) if getattr(self, k) is not None else getattr(base, k)
               for k in ("solver", "steps", "timestep_shift")}
        return _build(SamplerConfig, source, guidance=_build(GuidanceConfig, source, **guidance),
                      precision=base.precision, **top)


def _mapping(d: Any, source: str, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {what} must be a JSON object, got {type(d).__name__}")
    return dict(d)


def _known_keys(cls: type, d: Any, source: str) -> dict[str, Any]:
    d = _mapping(d, source, cls.__name__)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
    return d


def _enum(cls: type[enum.Enum], value: Any, source: str, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{source}: {key} {value!r} is not one of {', '.join(m.value for m in cls)}") from None


def _interval(value: Any, source: str, key: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be two numbers [LOW, HIGH], got {value!r}") from None
    return lo, hi


def _build(cls: type, source: str, **fields: Any) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
