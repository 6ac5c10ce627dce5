"""fp32 linear layers on the CPU through oneDNN instead of MKL's ``addmm``.

Why: on the CPUs we measured (AMD EPYC, AVX2, 1 and 2 threads), oneDNN's fp32 GEMM is 1.0-1.4x
faster than the MKL ``addmm`` / ``mm`` + ``add_`` that ``nn.Linear`` calls, for the DiT's shapes
(M = tokens x rows, K and N in 768..4096); the linears are ~85% of an eager forward. Measured on
LightningDiT-B/1 and SiT-B/2 eager fp32, batch 2 and 4, one thread (thread CPU time, interleaved):
1.22x per forward. Same maths in fp32 (no reduced precision unless
``torch.backends.mkldnn.matmul.fp32_precision`` is changed from its default), but a different
summation order: results differ from MKL's by rounding (about 1e-7 relative), so the ``reference``
precision, whose job is to reproduce the official code bit for bit, keeps ``nn.Linear``.

The eager backend swaps the class of each fp32 ``nn.Linear`` on the CPU for ``OneDNNLinear`` (same
parameters, same state dict); the compiled backend routes Dynamo's linear nodes to a custom op
(``igengine.backends.compiled.onednn_linear_op``) that calls the same kernel.
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_available() -> bool:
    """Whether this torch has oneDNN's fp32 linear kernel (``torch.ops.mkldnn._linear_pointwise``)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN (CPU tensors)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs through oneDNN while its tensors are fp32 on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32:
            return onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


def route_linears(model: nn.Module, onednn: bool = True) -> int:
    """Make every fp32 CPU ``nn.Linear`` of ``model`` a ``OneDNNLinear`` (``onednn``), or every
    ``OneDNNLinear`` a plain ``nn.Linear`` again (not ``onednn``), in place; returns how many
    linears run through oneDNN afterwards (0 where this torch lacks oneDNN's linear)."""
    available = onednn and onednn_available()
    count = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, OneDNNLinear):  # never a subclass of our own or of others
            continue
        fits = module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
        module.__class__ = OneDNNLinear if (available and fits) else nn.Linear
        count += module.__class__ is OneDNNLinear
    return count


__all__ = ["OneDNNLinear", "onednn_available", "onednn_linear", "route_linears"]
