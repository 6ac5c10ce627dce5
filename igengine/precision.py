"""One source of truth for a run's numerics: everything follows from (precision, family).

A run's precision is chosen once (``Precision``); ``policy`` derives every consequence from it:

| precision | network dtype | state and guidance dtype | fused kernels | TF32 (CUDA matmul, cuDNN) |
|---|---|---|---|---|
| reference | fp32 | SiT float64, LightningDiT float32 (the official numerics) | no | off |
| fp32 | fp32 | float32 | yes | off |
| tf32 | fp32, CUDA matmuls and convolutions in TF32 (the official scripts' GPU numerics) | float32 | yes | on |
| bf16 / fp16 | attention and MLP matmuls in bf16/fp16, the rest fp32 | float32 | yes | off |

Backends build their network from ``policy.network_dtype``; the sampler keeps its state in
``policy.state_dtype`` and refuses a network built for another precision. Global flags (TF32) are
set only inside ``numerics(policy)``, around the calls that need them, and restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from igengine.config import Family, Precision
from igengine.errors import PrecisionMismatchError

NETWORK_DTYPE = {
    Precision.REFERENCE: torch.float32,
    Precision.FP32: torch.float32,
    Precision.TF32: torch.float32,
    Precision.BF16: torch.bfloat16,
    Precision.FP16: torch.float16,
}


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a precision means for one model family (see the module docstring)."""

    precision: Precision
    family: Family
    network_dtype: torch.dtype
    state_dtype: torch.dtype
    fused_kernels: bool  # the fused guidance + update kernels may run (they keep float32 state)
    allow_tf32: bool  # TF32 in CUDA matmuls and cuDNN convolutions

    def describe(self) -> dict:
        return {
            "precision": self.precision.value,
            "network_dtype": str(self.network_dtype).replace("torch.", ""),
            "state_dtype": str(self.state_dtype).replace("torch.", ""),
            "tf32": self.allow_tf32,
        }


def policy(precision: Precision | str, family: Family | str) -> PrecisionPolicy:
    """The PrecisionPolicy of ``precision`` for ``family``."""
    precision, family = Precision(precision), Family(family)
    reference = precision == Precision.REFERENCE
    return PrecisionPolicy(
        precision=precision,
        family=family,
        network_dtype=NETWORK_DTYPE[precision],
        state_dtype=torch.float64 if (reference and family == Family.SIT) else torch.float32,
        fused_kernels=not reference,
        allow_tf32=precision == Precision.TF32,
    )


def default_precision(device: torch.device | str) -> Precision:
    """What `precision` auto means: bf16 on a CUDA GPU (the fast path), reference on the CPU.

    On the CPU the faithful mode is the default although it is not the fastest: against the official
    code `reference` ran 0.9-1.2x, `fp32` (oneDNN linears, fused steps) 1.9-2.6x and `bf16` 3.0-4.1x
    (3.2-4.3x compiled) on the AVX-512 BF16 CPU of 2026-12-02 (README, `igengine bench`), but a CPU
    run is for checking and small jobs, where results that match the official code bit for bit, on
    any CPU, matter more than speed; the note says so (``default_precision_note``). On a GPU bf16 runs
    several times faster than fp32.
    """
    return Precision.BF16 if torch.device(device).type == "cuda" else Precision.REFERENCE


def default_precision_note(device: torch.device | str, cpu_routes: dict | None = None) -> str:
    """The line a run prints when it took ``default_precision(device)``: what it chose and why.

    cpu_routes: on the CPU, the GEMM route of each linear dtype here (``igengine.backends.cpu_linear.routes()``),
    so that the note says what is true of this CPU: whether `fp32` and `bf16` have faster GEMMs than
    `reference` (oneDNN) or the same ones (MKL's fp32 GEMM, on CPUs without AVX-512)."""
    device = torch.device(device)
    if device.type != "cpu":
        why = "the fast path on a GPU"
    elif cpu_routes is None:
        why = "the official numerics"
    else:
        faster = [p for p, dtype in (("fp32", "float32"), ("bf16", "bfloat16")) if cpu_routes.get(dtype) == "onednn"]
        parts = []
        if faster:
            parts.append(f"{' and '.join(f'`{p}`' for p in faster)} run{'s' if len(faster) == 1 else ''} faster "
                         "GEMMs (oneDNN) on this CPU")
        if "fp32" not in faster:
            parts.append(f"`fp32` runs the same fp32 GEMMs as `reference` here (CPU capability "
                         f"{cpu_routes.get('cpu_capability', '?')}), so little faster")
        if "bf16" not in faster:
            parts.append("`bf16` has no bf16 GEMM on this CPU (its linears run the fp32 GEMM): no faster than `fp32`")
        why = "the official numerics; " + "; ".join(parts)
    return f"precision {default_precision(device).value} (the default on {device.type}: {why}; choose with `precision`)"


def check_network_precision(network_precision: Precision | str | None, run: PrecisionPolicy) -> None:
    """Raise PrecisionMismatchError when a network declares another precision than the run's."""
    if network_precision is None:
        return
    if Precision(network_precision) != run.precision:
        raise PrecisionMismatchError(
            f"the network was built for precision {Precision(network_precision).value!r} but the sampler runs "
            f"{run.precision.value!r}: build both from the same `precision`"
        )


@contextlib.contextmanager
def numerics(p: PrecisionPolicy) -> Iterator[None]:
    """Set the process-global matmul flags the policy needs for the duration of the block, then restore them."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = p.allow_tf32
    torch.backends.cudnn.allow_tf32 = p.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


__all__ = ["NETWORK_DTYPE", "PrecisionPolicy", "check_network_precision", "default_precision", "default_precision_note", "numerics", "policy"]
