"""Fused guidance + solver-update kernels (csrc/): CUDA, a bit-faithful CPU twin, or none.

Importing this package loads nothing and never touches CUDA: the libraries are opened on first use.

    >>> import igengine.kernels as K
    >>> K.kernel_path()          # 'cuda', 'cpu-twin' or 'reference'
    >>> K.describe()             # JSON-able status of both libraries and the CUDA build (for `igengine info`)

  abi      the C ABI (StepParams, StepBuffers, enums) mirrored with ctypes, and KernelError
  nvrtc    the CUDA kernels compiled at first use with NVRTC (cuda-python; ``pip install 'igengine[nvrtc]'``),
           cached under $IGENGINE_CACHE/kernels, and the driver queries that choose the target;
           ``python -m igengine.kernels.nvrtc`` compiles ahead
  nvrtc_library  that build loaded and launched through the CUDA driver API (used when no CMake library runs)
  library  finding, loading and probing the libraries (loads only: launches nothing)
  binding  checked entry points for torch tensors (fused_step, fused_step_indexed, pack_table, gaussian,
           philox_words)
  selftest a CUDA build against the CPU twin on its own GPU (noise, by-value and indexed steps, every
           output dtype, the scalar tail, the counter, CUDA-graph capture)
  trusted  the library a run may use: loaded, and for CUDA self-tested once per device and build
  ops      torch custom ops igengine::fused_step_indexed and igengine::gaussian, for torch.compile
           (torch >= 2.4; imported only on request: ``import igengine.kernels.ops``)
  build    ``python -m igengine.kernels.build`` (CMake; the CUDA library where nvcc is found)

Inside the package each module imports only those listed above it (tests/test_layers.py checks
that no import, lazy ones included, closes a circle).

May import: igengine.config, errors, noise, store.atomic. The sampling loop that uses them is igengine.sampling.fused.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "kernel_path": "igengine.kernels.trusted",
    "describe": "igengine.kernels.trusted",
    "cpu_library": "igengine.kernels.library",
    "cuda_library": "igengine.kernels.trusted",
    "library_for": "igengine.kernels.trusted",
    "load_library": "igengine.kernels.library",
    "KernelError": "igengine.kernels.abi",
    "SelfTestError": "igengine.kernels.selftest",
    "fused_step": "igengine.kernels.binding",
    "fused_step_indexed": "igengine.kernels.binding",
    "pack_table": "igengine.kernels.binding",
    "gaussian": "igengine.kernels.binding",
    "philox_words": "igengine.kernels.binding",
    "KernelInputError": "igengine.kernels.binding",
    "KernelUnavailable": "igengine.kernels.binding",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'igengine.kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
