"""The fused step and the noise kernel as torch custom ops, so that ``torch.compile`` sees them.

    import igengine.kernels.ops                      # registers the ops (torch >= 2.4)
    torch.ops.igengine.fused_step_indexed(table, counter, x, v_final, v_inter, indices, k1, net_out,
                                          first_bad, fault)
    eps = igengine.kernels.ops.gaussian(seed, indices, stream, shape)

The binding (``igengine.kernels.binding``) calls the libraries through ctypes, which Dynamo cannot
trace: each call would break the graph. As custom ops they are opaque nodes with a declared schema,
mutation set and a fake (meta) implementation, so a compiled function that calls them stays one
graph (tests/test_captured.py compiles one with ``fullgraph=True``).

  igengine::fused_step_indexed  ``binding.fused_step_indexed`` with x updated in place (x_out = x):
      mutates counter (advanced by one), x, k1, net_out, first_bad and fault; returns nothing.
      Every tensor argument but v_inter and indices is required: give a plan without Heun steps a
      k1 buffer all the same (an op's mutated arguments cannot be optional on every torch >= 2.4).
  igengine::gaussian  ``binding.gaussian`` on ``indices``' device: float32 (N, *shape). The seed is
      split into two 32-bit words because an op's integers are int64 and a seed spans [0, 2^64).

Both use the library a run may use on the tensors' device (``trusted.library_for``: self-tested on CUDA).
This module is not imported by ``import igengine`` or by the samplers; importing it needs torch >= 2.4.
"""

# No `from __future__ import annotations` here: torch 2.4's schema inference reads the annotations
# as objects, not strings.
import typing

import torch

from igengine.kernels import binding, trusted
from igengine.noise import check_seed

if not hasattr(torch.library, "custom_op") or not hasattr(torch.library, "register_fake"):
    raise ImportError(f"igengine.kernels.ops needs torch >= 2.4 (torch.library.custom_op); this is torch "
                      f"{torch.__version__}")

_Tensor = torch.Tensor
_OptTensor = typing.Optional[torch.Tensor]


@torch.library.custom_op("igengine::fused_step_indexed",
                         mutates_args=("counter", "x", "k1", "net_out", "first_bad", "fault"))
def fused_step_indexed(table: _Tensor, counter: _Tensor, x: _Tensor, v_final: _Tensor, v_inter: _OptTensor,
                       indices: _OptTensor, k1: _Tensor, net_out: _Tensor, first_bad: _Tensor,
                       fault: _Tensor) -> None:
    """Launch ``table[counter]`` on x in place, then ``counter += 1`` (see binding.fused_step_indexed)."""
    binding.fused_step_indexed(table, counter, x, v_final, v_inter, indices, k1, x, net_out, first_bad, fault=fault,
                               library=trusted.library_for(x.device))


@fused_step_indexed.register_fake
def _fused_step_indexed_fake(table, counter, x, v_final, v_inter, indices, k1, net_out, first_bad, fault) -> None:
    return None


@torch.library.custom_op("igengine::gaussian", mutates_args=())
def _gaussian(indices: _Tensor, seed_lo: int, seed_hi: int, stream: int, shape: typing.Sequence[int]) -> _Tensor:
    return binding.gaussian((seed_hi << 32) | seed_lo, indices, stream, shape, device=indices.device,
                            library=trusted.library_for(indices.device))


@_gaussian.register_fake
def _gaussian_fake(indices, seed_lo, seed_hi, stream, shape):
    return indices.new_empty((indices.shape[0], *shape), dtype=torch.float32)


def gaussian(seed: int, indices: torch.Tensor, stream: int, shape: typing.Sequence[int]) -> torch.Tensor:
    """The noise contract's Gaussians through ``igengine::gaussian``: float32 (len(indices), *shape)."""
    seed = check_seed(seed)
    return torch.ops.igengine.gaussian(indices, seed & 0xFFFFFFFF, seed >> 32, int(stream), list(shape))


__all__ = ["fused_step_indexed", "gaussian"]
