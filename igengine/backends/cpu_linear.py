"""Linear layers on the CPU through oneDNN instead of MKL's ``addmm``, with GELU fused where it follows.

Why: oneDNN's fp32 GEMM is faster than the MKL ``addmm`` / ``mm`` + ``add_`` that ``nn.Linear`` calls,
for the DiT's shapes (M = tokens x rows, K and N in 768..4096); the linears are ~70-85% of an eager
forward. Measured, 2 threads: 1.0-1.4x on an AMD EPYC with AVX2 (LightningDiT-B/1 and SiT-B/2 eager
fp32, batch 2 and 4, thread CPU time, interleaved: 1.22x per forward), 2.3x on an AMD EPYC (Zen,
AVX-512) of 2026-12-02 (400 vs 170 GFLOP/s). Same maths in fp32 (no reduced precision unless
``torch.backends.mkldnn.matmul.fp32_precision`` is changed from its default), but a different
summation order: results differ from MKL's by rounding (about 1e-7 relative), so the ``reference``
precision, whose job is to reproduce the official code bit for bit, keeps ``nn.Linear``.

bf16 linears take the same kernel (aten's bf16 ``addmm`` on the CPU reaches oneDNN too where the CPU
has bf16 units, and a slow generic GEMM where it has not, which oneDNN's emulation beats), so the
GELU fusion below serves both dtypes.

GELU fusion: the fc1 -> GELU(tanh) of SiT's MLP runs as one oneDNN call with GELU as the GEMM's
post-op (``onednn_linear(..., activation="gelu_tanh")``), instead of a GEMM writing the (tokens, 4D)
product and a separate GELU pass reading it back: 1.1-1.3x on that pair (fp32 and bf16, M = 1024,
K = 768, N = 3072). The post-op applies GELU to the fp32 accumulator, before any bf16 rounding;
its error against float64 equals that of the unfused pair (3.5e-6 fp32, 1.6e-2 bf16 max abs there).

Packed weights: oneDNN computes with its weight in a blocked layout of its own and, given a plain
weight, reorders it at every call (a read and a write of the whole weight per linear). ``packed_weight``
makes that layout once per weight (``torch.ops.mkldnn._reorder_linear_weight``) and keeps it, keyed by
the tensor's identity and checked against its version counter and storage, so an in-place change of
the weight repacks it. Results are bit-identical (a layout change only; tested); the cost is one more
copy of every routed weight in memory. Measured on the AVX-512 BF16 EPYC of 2026-12-02, one linear
of the DiT's shapes: 1.0-1.13x fp32, 1.13-1.16x bf16.

The eager backend swaps the class of each fp32/bf16 ``nn.Linear`` on the CPU for ``OneDNNLinear`` and of
each GELU(tanh) ``Mlp`` for ``OneDNNMlp`` (same parameters, same state dict); the compiled backend
routes Dynamo's linear nodes (and a linear -> GELU(tanh) pair) to a custom op
(``igengine.backends.compiled.onednn_linear_op``) that calls the same kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from igengine.models.layers import Mlp

# The weight dtypes routed through oneDNN (fp16 is not: CPUs without AVX512-FP16 lack its kernels).
ROUTED_DTYPES = (torch.float32, torch.bfloat16)
ACTIVATIONS = ("none", "gelu_tanh")


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def cpu_native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU has native matmul units for ``dtype`` (bf16 or fp16), as oneDNN reports them."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if check is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


# weight -> (its version counter and data pointer when packed, the packed weight). Keyed by identity and
# held weakly: a model's packs go with its parameters.
_PACKED = WeakIdKeyDictionary()
PACKS = {"made": 0}  # how many weights were packed in this process (tests check that a run packs once)
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)  # None in a torch without it


def packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` in oneDNN's own blocked layout, made at the first use and kept while ``weight`` is
    unchanged (its version counter and storage); ``weight`` itself where it cannot be tracked (an
    inference-mode tensor) or this torch has no reorder. ``rows``: the GEMM's M, a layout hint only."""
    if _REORDER is None:
        return weight
    try:
        stamp = (weight._version, weight.data_ptr())
    except RuntimeError:  # inference tensors have no version counter: an in-place change would go unseen
        return weight
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != stamp:
        entry = (stamp, _REORDER(weight, rows))
        _PACKED[weight] = entry
        PACKS["made"] += 1
    return entry[1]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str = "none") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN (CPU tensors), then ``activation``:
    "none", or "gelu_tanh" (``F.gelu(..., approximate="tanh")``, fused as the GEMM's post-op).
    The weight runs pre-packed (``packed_weight``): bit-identical results, without the reorder oneDNN
    otherwise makes of a plain weight at every call."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    w = packed_weight(weight, x.numel() // max(1, x.shape[-1]))
    if activation == "gelu_tanh":
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _routable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == weight.dtype and weight.dtype in ROUTED_DTYPES


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs through oneDNN while its tensors are fp32 or bf16 on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _routable(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


class OneDNNMlp(Mlp):
    """An ``Mlp`` whose fc1 -> GELU(tanh) is one oneDNN call (GELU as the GEMM's post-op)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.fc1) is OneDNNLinear and _routable(x, self.fc1.weight):
            return self.fc2(onednn_linear(x, self.fc1.weight, self.fc1.bias, "gelu_tanh"))
        return super().forward(x)


def _fusable_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act", None)
    return isinstance(act, nn.GELU) and act.approximate == "tanh"


def route_linears(model: nn.Module, onednn: bool = True) -> int:
    """Make every fp32/bf16 CPU ``nn.Linear`` of ``model`` a ``OneDNNLinear`` and every GELU(tanh) ``Mlp`` a
    ``OneDNNMlp`` (``onednn``), or undo both (not ``onednn``), in place; returns how many linears run
    through oneDNN afterwards (0 where this torch lacks oneDNN's linear)."""
    available = onednn and onednn_available()
    count = 0
    for module in model.modules():
        if type(module) in (Mlp, OneDNNMlp):  # never a subclass of our own or of others
            module.__class__ = OneDNNMlp if (available and _fusable_mlp(module)) else Mlp
        if type(module) not in (nn.Linear, OneDNNLinear):
            continue
        fits = module.weight.dtype in ROUTED_DTYPES and module.weight.device.type == "cpu"
        module.__class__ = OneDNNLinear if (available and fits) else nn.Linear
        count += module.__class__ is OneDNNLinear
    return count


__all__ = ["ACTIVATIONS", "OneDNNLinear", "OneDNNMlp", "ROUTED_DTYPES", "cpu_native_low_precision", "onednn_available",
           "onednn_linear", "packed_weight", "route_linears"]
