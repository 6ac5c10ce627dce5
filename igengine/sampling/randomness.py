"""Where a run's random numbers come from: the noise contract, computed on the host or on the device.

The samplers take their randomness as an argument (EDM2's ``randn_like`` pattern):

    randn(seed, indices, stream, shape, device, dtype) -> Tensor (len(indices), *shape)

Every generator here computes the same function, the noise contract of ``igengine.noise``
(Philox4x32-10 and Box-Muller, rounded to float32), so which one runs never changes a sample:
  * ``numpy``     the reference implementation on the host, copied to ``device``;
  * ``cuda-kernel`` / ``cpu-twin``  the kernel library's generator, on the device itself (no host
    work, no synchronous copy), bit-identical to the reference (tests/test_kernels*.py).
``default_randomness(device)`` picks the kernel library's generator when one is loaded for the
device, NumPy otherwise; the manifest records which one ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from igengine import noise
from igengine.kernels import library as kernel_library
from igengine.kernels import trusted

Randn = Callable[[int, torch.Tensor, int, Sequence[int], torch.device, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Randomness:
    """A named generator of the noise contract (``name`` goes into the manifest)."""

    name: str
    randn: Randn

    def __call__(self, seed: int, indices: torch.Tensor, stream: int, shape: Sequence[int],
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.randn(seed, indices, stream, shape, device, dtype)


def _numpy_randn(seed, indices, stream, shape, device, dtype) -> torch.Tensor:
    return noise.gaussian(seed, indices, stream, shape).to(device, dtype)


NUMPY = Randomness("numpy", _numpy_randn)


def kernel_randomness(lib: kernel_library.KernelLibrary) -> Randomness:
    """The generator of a loaded kernel library (CUDA or the CPU twin), on that library's device."""
    from igengine.kernels.binding import gaussian

    def randn(seed, indices, stream, shape, device, dtype) -> torch.Tensor:
        return gaussian(seed, indices, stream, shape, device=device, library=lib).to(dtype)

    return Randomness(kernel_library.PATH_CUDA + "-kernel" if lib.kind == "cuda" else kernel_library.PATH_CPU,
                      randn)


def default_randomness(device: torch.device | str) -> Randomness:
    """The kernel library's generator for ``device`` when it is loaded, else NumPy's (the same numbers)."""
    lib = trusted.library_for(device)
    return kernel_randomness(lib) if lib is not None else NUMPY


__all__ = ["NUMPY", "Randn", "Randomness", "default_randomness", "kernel_randomness"]
