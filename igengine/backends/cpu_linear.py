"""Linear layers on the CPU: each dtype takes the fastest correct GEMM this CPU has, GELU fused where it follows.

Routes (``linear_route(dtype)``), decided by what the CPU has (``cpu_features``), never by what was fast
on another machine:

| dtype | CPU | route | what runs |
|---|---|---|---|
| fp32 | AVX-512 (ATen's CPU capability AVX512) | ``onednn`` | oneDNN's GEMM on a pre-packed weight |
| fp32 | anything else (AVX2, ARM, ...) | ``aten`` | ``nn.Linear`` as torch runs it (MKL's ``addmm``) |
| bf16 | oneDNN has bf16 here (AVX512 BW/VL/DQ or AVX-NE-CONVERT) | ``onednn`` | oneDNN's bf16 GEMM, packed weight |
| bf16 | anything else (AVX2-only CPUs) | ``fp32-gemm`` | the bf16 values through the fp32 GEMM (MKL), one rounding to bf16 |
| other | any | ``aten`` | ``nn.Linear`` |

Why these: on the AMD EPYC (Zen, AVX-512 BF16) of 2026-12-02 oneDNN's fp32 GEMM ran 2.3x MKL's for the DiT's
shapes (400 vs 170 GFLOP/s) and its bf16 GEMM 1.9x its fp32 one. On an AVX2-only EPYC (2026-12-07, from
outside) oneDNN's fp32 routing was slower than MKL (SiT-S/2 batch 4: 68.2% against 72.2% MFU) and oneDNN
refuses bf16 there outright (``mkldnn_reorder_linear_weight: bf16 path needs the cpu support
avx_ne_convert or avx512bw, avx512vl and avx512dq``). On such a CPU torch's own bf16 ``addmm`` takes a
generic loop: M = 1024, K = 768, N = 3072 took 128 ms against 29 ms for the ``fp32-gemm`` route (AVX2
emulated on the EPYC above with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``, 2 threads), with the same error against float64 (1.56e-2 max abs).

The ``fp32-gemm`` route is a bf16 GEMM in all but the kernel: its inputs are bf16 values (exact in fp32), it
accumulates in fp32 as oneDNN's bf16 GEMM does, and it rounds the output to bf16 once, after the bias and
(fused) GELU, as oneDNN's post-op does. Only the summation order differs. Its cost: an fp32 copy of each
routed bf16 weight, made once and kept like a packed weight.

The route is recorded: ``routes()`` (shown by ``igengine info``) and each CPU backend's ``describe()`` (so
the manifest) say which route every linear dtype of the run took.

fp32 maths: the ``onednn`` route computes the same sums as MKL in another order (about 1e-7 relative), so
the ``reference`` precision, whose job is to reproduce the official code bit for bit, keeps ``nn.Linear``
on every CPU.

GELU fusion: the fc1 -> GELU(tanh) of SiT's MLP runs as one call (``cpu_linear(..., activation="gelu_tanh")``):
on the ``onednn`` route GELU is the GEMM's post-op, applied to the fp32 accumulator before any bf16 rounding
(1.1-1.3x on that pair, fp32 and bf16, M = 1024, K = 768, N = 3072; its error against float64 equals the
unfused pair's: 3.5e-6 fp32, 1.6e-2 bf16 max abs there); on ``fp32-gemm`` GELU is applied to the fp32
product before its one rounding, the same maths.

Packed weights: oneDNN computes with its weight in a blocked layout of its own and, given a plain weight,
reorders it at every call. ``packed_weight`` makes that layout once per weight
(``torch.ops.mkldnn._reorder_linear_weight``) and keeps it, keyed by the tensor's identity and checked against
its version counter and storage, so an in-place change of the weight repacks it (the ``fp32-gemm`` route's
fp32 copies are kept the same way). Results are bit-identical (a layout change only; tested). Measured on
the AVX-512 BF16 EPYC of 2026-12-02, one linear of the DiT's shapes: 1.0-1.13x fp32, 1.13-1.16x bf16.

The eager backend swaps the class of each ``nn.Linear`` whose dtype has a route other than ``aten`` for
``CpuLinear`` and of each GELU(tanh) ``Mlp`` for ``CpuMlp`` (same parameters, same state dict); the compiled
backend routes Dynamo's linear nodes (and a linear -> GELU(tanh) pair) of those dtypes to a custom op
(``igengine.backends.compiled.cpu_linear_op``) that calls ``cpu_linear``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from igengine.models.layers import Mlp

ROUTE_ONEDNN = "onednn"
ROUTE_FP32_GEMM = "fp32-gemm"
ROUTE_ATEN = "aten"
ROUTES = (ROUTE_ONEDNN, ROUTE_FP32_GEMM, ROUTE_ATEN)
ACTIVATIONS = ("none", "gelu_tanh")
ROUTED_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes that may take a route other than aten


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def cpu_native_low_precision(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` (bf16 or fp16) matmuls on this CPU's own units (its bf16 check: AVX512
    BW/VL/DQ or AVX-NE-CONVERT; fp16: AVX512-FP16 or AMX-FP16)."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if check is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class CpuFeatures:
    """What decides the routes: ATen's CPU capability ("AVX512", "AVX2", ...), oneDNN's linear, oneDNN's bf16."""

    capability: str
    onednn: bool
    onednn_bf16: bool

    @property
    def avx512(self) -> bool:
        return self.capability.upper().startswith("AVX512")


@functools.lru_cache(maxsize=None)
def cpu_features() -> CpuFeatures:
    """This process's CpuFeatures (read once: they cannot change while it runs)."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuFeatures(capability, onednn_available(), cpu_native_low_precision(torch.bfloat16))


def linear_route(dtype: torch.dtype) -> str:
    """The route a CPU linear of ``dtype`` takes on this CPU (see the module docstring's table)."""
    cpu = cpu_features()
    if dtype == torch.float32:
        return ROUTE_ONEDNN if cpu.onednn and cpu.avx512 else ROUTE_ATEN
    if dtype == torch.bfloat16:
        return ROUTE_ONEDNN if cpu.onednn and cpu.onednn_bf16 else ROUTE_FP32_GEMM
    return ROUTE_ATEN


def routes() -> dict:
    """Each routed dtype's route on this CPU and the features that chose it (``igengine info``)."""
    cpu = cpu_features()
    return {"float32": linear_route(torch.float32), "bfloat16": linear_route(torch.bfloat16),
            "cpu_capability": cpu.capability, "onednn_bf16": cpu.onednn_bf16}


# CPU flags of bf16 / fp16 arithmetic in hardware, as Linux names them in /proc/cpuinfo: x86 AVX512_BF16 and
# AMX-BF16, Arm FEAT_BF16; x86 AVX512-FP16 and AMX-FP16, Arm's half-precision SIMD arithmetic (asimdhp).
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "asimdhp")}


def _cpuinfo_flags(text: str | None = None) -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"), None where it cannot be read."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def native_low_precision(cpuinfo: str | None = None) -> dict:
    """``{"native_bf16": bool, "native_fp16": bool}``: whether this CPU has bf16 / fp16 arithmetic in hardware
    (``NATIVE_FLAGS``; ``igengine info``). A hardware fact, not a route: oneDNN also runs bf16 on AVX-512 CPUs
    without AVX512_BF16 (by conversion; ``routes()["onednn_bf16"]``), and a CPU held to AVX2 by
    ``ONEDNN_MAX_CPU_ISA`` keeps its flags. Where /proc/cpuinfo cannot be read, torch's own x86 checks answer."""
    flags = _cpuinfo_flags(cpuinfo)
    if flags is not None:
        return {f"native_{kind}": any(flag in flags for flag in names) for kind, names in NATIVE_FLAGS.items()}

    def torch_check(name: str) -> bool:
        try:
            return bool(getattr(torch.cpu, name)())
        except (AttributeError, RuntimeError):
            return False

    return {"native_bf16": torch_check("_is_avx512_bf16_supported") or torch_check("_is_amx_tile_supported"),
            "native_fp16": torch_check("_is_amx_fp16_supported") or cpu_native_low_precision(torch.float16)}


# weight -> {kind: (its version counter and data pointer when made, the derived weight)}. Keyed by identity
# and held weakly: a model's packs go with its parameters.
_DERIVED = WeakIdKeyDictionary()
PACKS = {"made": 0}  # how many oneDNN packs were made in this process (tests check that a run packs once)
UPCASTS = {"made": 0}  # how many fp32 copies the fp32-gemm route made
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)  # None in a torch without it


def _derived(weight: torch.Tensor, kind: str, make: Callable[[torch.Tensor], torch.Tensor], counter: dict) -> torch.Tensor:
    """``make(weight)``, made at the first use and kept while ``weight`` is unchanged (its version counter and
    storage); made afresh at every call where ``weight`` cannot be tracked (an inference-mode tensor)."""
    try:
        stamp = (weight._version, weight.data_ptr())
    except RuntimeError:  # inference tensors have no version counter: an in-place change would go unseen
        return make(weight)
    entries = _DERIVED.get(weight)
    if entries is None:
        entries = _DERIVED[weight] = {}
    entry = entries.get(kind)
    if entry is None or entry[0] != stamp:
        entry = entries[kind] = (stamp, make(weight))
        counter["made"] += 1
    return entry[1]


def packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` in oneDNN's own blocked layout, made at the first use and kept while ``weight`` is
    unchanged; ``weight`` itself where it cannot be tracked (an inference-mode tensor) or this torch has no
    reorder. ``rows``: the GEMM's M, a layout hint only."""
    if _REORDER is None:
        return weight
    try:
        weight._version
    except RuntimeError:  # an inference tensor: a pack per call would cost more than it saves
        return weight
    return _derived(weight, "onednn", lambda w: _REORDER(w, rows), PACKS)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str = "none") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN (CPU tensors), then ``activation``:
    "none", or "gelu_tanh" (``F.gelu(..., approximate="tanh")``, fused as the GEMM's post-op).
    The weight runs pre-packed (``packed_weight``): bit-identical results, without the reorder oneDNN
    otherwise makes of a plain weight at every call."""
    _check_activation(activation)
    w = packed_weight(weight, x.numel() // max(1, x.shape[-1]))
    if activation == "gelu_tanh":
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def fp32_gemm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str = "none") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` of low-precision tensors through the fp32 GEMM: inputs widened exactly,
    fp32 accumulation, bias and ``activation`` in fp32, one rounding to ``x.dtype`` at the end. The fp32 copy
    of ``weight`` is kept between calls (see ``packed_weight``)."""
    _check_activation(activation)
    w32 = _derived(weight, "fp32", lambda w: w.float(), UPCASTS)
    b32 = None if bias is None else bias.float()
    y = torch.nn.functional.linear(x.float(), w32, b32)
    if activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.to(x.dtype)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               activation: str = "none") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` then ``activation``, on the route ``linear_route(weight.dtype)`` picks."""
    return _linear_on(linear_route(weight.dtype), x, weight, bias, activation)


def _linear_on(route: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               activation: str = "none") -> torch.Tensor:
    if route == ROUTE_ONEDNN:
        return onednn_linear(x, weight, bias, activation)
    if route == ROUTE_FP32_GEMM:
        return fp32_gemm_linear(x, weight, bias, activation)
    _check_activation(activation)
    y = torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def routed(dtype: torch.dtype) -> bool:
    """Whether a CPU linear of ``dtype`` takes a route other than plain ``nn.Linear`` here."""
    return linear_route(dtype) != ROUTE_ATEN


def _route_of(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The route of a call of a routed linear, decided once per call; None where plain ``nn.Linear`` runs."""
    if x.device.type != "cpu" or x.dtype != weight.dtype:
        return None
    route = linear_route(weight.dtype)
    return None if route == ROUTE_ATEN else route


class CpuLinear(nn.Linear):
    """An ``nn.Linear`` whose forward takes its dtype's CPU route (``cpu_linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = _route_of(x, self.weight)
        if route is not None:
            return _linear_on(route, x, self.weight, self.bias)
        return super().forward(x)


class CpuMlp(Mlp):
    """An ``Mlp`` whose fc1 -> GELU(tanh) is one routed call (GELU fused before the output's rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = _route_of(x, self.fc1.weight) if type(self.fc1) is CpuLinear else None
        if route is not None:
            return self.fc2(_linear_on(route, x, self.fc1.weight, self.fc1.bias, "gelu_tanh"))
        return super().forward(x)


def _fusable_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act", None)
    return isinstance(act, nn.GELU) and act.approximate == "tanh"


def route_linears(model: nn.Module, fast: bool = True) -> dict[str, str]:
    """Make every CPU ``nn.Linear`` of ``model`` whose dtype has a route a ``CpuLinear``, and every GELU(tanh)
    ``Mlp`` whose fc1 is routed a ``CpuMlp`` (``fast``), or undo both (not ``fast``: plain ``nn.Linear``
    everywhere, the official kernels), in place. Returns the route of each linear dtype in the model,
    e.g. ``{"bfloat16": "onednn", "float32": "onednn"}`` (``aten`` for every dtype when not ``fast``)."""
    taken: dict[str, str] = {}
    for module in model.modules():
        if type(module) not in (nn.Linear, CpuLinear):
            continue
        dtype = module.weight.dtype
        go = fast and module.weight.device.type == "cpu" and routed(dtype)
        module.__class__ = CpuLinear if go else nn.Linear
        taken[str(dtype).replace("torch.", "")] = linear_route(dtype) if go else ROUTE_ATEN
    for module in model.modules():
        if type(module) in (Mlp, CpuMlp):  # never a subclass of our own or of others
            fc1_routed = type(getattr(module, "fc1", None)) is CpuLinear
            module.__class__ = CpuMlp if (fast and fc1_routed and _fusable_mlp(module)) else Mlp
    return dict(sorted(taken.items()))


def routed_count(model: nn.Module) -> int:
    """How many linears of ``model`` take a route other than plain ``nn.Linear``."""
    return sum(type(m) is CpuLinear for m in model.modules())


__all__ = ["ACTIVATIONS", "ROUTED_DTYPES", "ROUTES", "ROUTE_ATEN", "ROUTE_FP32_GEMM", "ROUTE_ONEDNN", "CpuFeatures",
           "CpuLinear", "CpuMlp", "cpu_features", "cpu_linear", "cpu_native_low_precision", "fp32_gemm_linear",
           "linear_route", "native_low_precision", "onednn_available", "onednn_linear", "packed_weight",
           "route_linears", "routed", "routed_count", "routes"]
