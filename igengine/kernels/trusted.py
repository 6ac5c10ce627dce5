"""The kernel library a run may use: loaded by ``library``, and for CUDA self-tested first.

``library`` only finds, opens and probes the libraries. Here, the first time a CUDA build is asked
for on a device, it runs ``selftest.check_against_reference`` there (noise, by-value and indexed
steps of SiT and RAEv2 with every output dtype, the scalar tail, the counter, CUDA-graph capture: a
few ms), once per (device, build). A build that fails is refused on that device (``library.refuse``)
with one warning naming the check, and the loader's next build (CMake -> NVRTC under
``IGENGINE_KERNELS_BUILD=auto``) is tested in its turn, or the run takes the reference path.

The samplers (``igengine.sampling``) and the custom ops ask for their library here
(``library_for``); ``describe`` is what ``igengine info`` shows. The CPU twin is not self-tested: it
is what the CUDA builds are compared with, and tests/test_kernels.py compares it with the reference
step bit for bit. May import (within igengine.kernels): library, selftest (and what they import).
"""

from __future__ import annotations

import threading
import warnings

from igengine.kernels import library, selftest
from igengine.kernels.abi import KernelError
from igengine.kernels.library import PATH_CPU, PATH_CUDA, PATH_REFERENCE, KernelLibrary

BUILD_NAMES = {"cmake": "CMake", "nvrtc": "NVRTC"}

_lock = threading.RLock()
# (device, build) -> (the library object, the notes of its passed self-test). A verdict holds for that
# object only: a library loaded anew (library._reset_for_tests, another search folder) is tested anew.
_notes: dict[tuple[int, str], tuple[KernelLibrary, list[str]]] = {}


def cuda_library(device: int | None = None) -> KernelLibrary | None:
    """The CUDA library for CUDA device ``device`` (default: the current one) once it has passed its
    self-test there, else None (no GPU, no usable build, or every build failed). Never raises."""
    import torch

    while True:
        lib = library.cuda_library(device)
        if lib is None:
            return None
        index = int(device) if device is not None else torch.cuda.current_device()
        key = (index, lib.build)
        with _lock:
            if key in _notes and _notes[key][0] is lib:
                return lib
            try:
                notes = selftest.check_against_reference(lib, index, library.cpu_library())
            except (selftest.SelfTestError, KernelError, RuntimeError) as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                library.refuse(index, lib.build, why)
                nxt = library.cuda_library(index)
                then = (f"trying the {BUILD_NAMES.get(nxt.build, nxt.build)} build" if nxt is not None
                        else "using the reference PyTorch path")
                warnings.warn(f"igengine kernels: the {BUILD_NAMES.get(lib.build, lib.build)} build failed its "
                              f"self-test on cuda:{index} ({why}); {then}", RuntimeWarning, stacklevel=2)
                continue
            _notes[key] = (lib, notes)
            return lib


def library_for(device) -> KernelLibrary | None:
    """The library that may run fused steps on tensors of ``device`` (a torch.device or string), or None:
    the CUDA library after its self-test on that device, the CPU twin as loaded."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return cuda_library(dev.index)
    if dev.type == "cpu":
        return library.cpu_library()
    return None


def kernel_path(device=None) -> str:
    """Which implementation a fused step takes: 'cuda', 'cpu-twin' or 'reference' (see
    ``library.kernel_path``), counting a CUDA build that fails its self-test as absent."""
    if device is not None:
        lib = library_for(device)
        return PATH_REFERENCE if lib is None else (PATH_CUDA if lib.kind == "cuda" else PATH_CPU)
    if cuda_library() is not None:
        return PATH_CUDA
    if library.cpu_library() is not None:
        return PATH_CPU
    return PATH_REFERENCE


def self_test_notes(device: int, build: str) -> list[str] | None:
    """The notes of the passed self-test of ``build`` on CUDA device ``device``; None if it has not passed."""
    with _lock:
        entry = _notes.get((int(device), build))
        return list(entry[1]) if entry is not None else None


def describe() -> dict:
    """``library.describe()`` after the self-test of the current device's CUDA build, with its notes
    (``cuda.self_test``; None where no CUDA build runs)."""
    import torch

    path = kernel_path()  # runs the self-test where there is a GPU
    facts = library.describe()
    facts["path"] = path
    notes = None
    if facts["cuda"]["state"] == "loaded" and torch.cuda.is_available():
        notes = self_test_notes(torch.cuda.current_device(), facts["cuda"]["build"])
    facts["cuda"]["self_test"] = notes
    return facts


def _reset_for_tests() -> None:
    with _lock:
        _notes.clear()


__all__ = ["cuda_library", "describe", "kernel_path", "library_for", "self_test_notes"]
