"""Finding and loading the kernel libraries, lazily, and saying which path a run will take.

Search order for ``libigengine_kernels_{cpu,cuda}`` (``.so`` / ``.dylib`` / ``.dll``):
  1. the folder named by the environment variable ``IGENGINE_KERNELS_DIR``;
  2. ``igengine/_lib/`` (where ``python -m igengine.kernels.build`` and the top-level CMakeLists.txt put them).
``IGENGINE_KERNELS=off`` disables both libraries (every run takes the plain PyTorch path).

Two builds of the CUDA kernels, tried in this order (``IGENGINE_KERNELS_BUILD`` = auto | cmake | nvrtc
narrows it to one):
  cmake  ``libigengine_kernels_cuda`` from the search above (developers, CI: python -m igengine.kernels.build);
  nvrtc  the same device code compiled at first use for the GPU present with NVRTC through cuda-python
         (``pip install 'igengine[nvrtc]'``), cached under $IGENGINE_CACHE/kernels (igengine.kernels.nvrtc).
Without either, a CUDA run takes the reference path; ``describe()`` says why.

Nothing here runs at import time. The CUDA library is opened only when asked for a CUDA device and
PyTorch sees a GPU; it is then probed once per device (``igk_cuda_probe`` loads every kernel; the
NVRTC build compiles or reads its image and loads every kernel). A library that cannot run on that
GPU (built for another architecture, stale ABI, driver too old) is refused with one warning and the
next build, or the reference path, is used instead.

This module only loads: it launches nothing. Whether a loaded CUDA build computes the right numbers
is checked one level up, by ``igengine.kernels.trusted`` (the self-test of ``igengine.kernels.selftest``,
once per device and build), which calls ``refuse`` for a build that fails; the loader then gives the
next build, or none. May import (within igengine.kernels): abi, nvrtc, nvrtc_library.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from igengine.kernels import abi
from igengine.kernels.abi import KernelError  # noqa: F401  (re-exported: raised by KernelLibrary's calls)

ENV_DIR = "IGENGINE_KERNELS_DIR"
ENV_SWITCH = "IGENGINE_KERNELS"
ENV_BUILD = "IGENGINE_KERNELS_BUILD"
BUILDS = ("auto", "cmake", "nvrtc")
CPU_STEM = "igengine_kernels_cpu"
CUDA_STEM = "igengine_kernels_cuda"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "_lib"

# The three paths a fused step can take (``kernel_path``).
PATH_CUDA = "cuda"
PATH_CPU = "cpu-twin"
PATH_REFERENCE = "reference"


@dataclass(frozen=True)
class LibraryStatus:
    """What happened when a library was looked for: state is loaded, missing, unusable, disabled or no-gpu.

    build: 'cmake' or 'nvrtc' (which build of the kernels is loaded; None when none is). path: the
    library file, or for nvrtc the cached image.
    """

    kind: str
    state: str
    path: str | None = None
    detail: str = ""
    build: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "state": self.state, "build": self.build, "path": self.path,
                "detail": self.detail}


class KernelLibrary:
    """One loaded library ('cpu' twin or 'cuda'): thin, checked wrappers of its C functions."""

    build = "cmake"

    def __init__(self, cdll: ctypes.CDLL, kind: str, path: Path):
        self.cdll = cdll
        self.kind = kind
        self.path = path
        self.build_info = cdll.igk_build_info().decode()

    def build_facts(self, device=None) -> dict:
        """Which build this is, for manifests: {'build': 'cmake', 'path': the file, 'info': igk_build_info}."""
        return {"build": self.build, "path": str(self.path), "info": self.build_info}

    def _check(self, rc: int, what: str) -> None:
        if rc != abi.Status.OK:
            try:
                name = abi.Status(rc).name
            except ValueError:
                name = f"status {rc}"
            text = self.cdll.igk_last_error().decode(errors="replace")
            raise KernelError(f"{self.path.name}: {what} failed ({name}): {text}")

    def step(self, params: abi.StepParams, buffers: abi.StepBuffers, num_threads: int = 0, device: int = 0,
             stream: int = 0) -> None:
        """Launch one fused step on raw pointers (no shape checks: see binding.fused_step for those).

        cpu: runs synchronously on ``num_threads`` threads (<= 0: all cores).
        cuda: enqueues on ``stream`` (a cudaStream_t as int, 0 = legacy default) of ``device``.
        """
        if self.kind == "cpu":
            rc = self.cdll.igk_cpu_step(ctypes.byref(params), ctypes.byref(buffers), int(num_threads))
        else:
            rc = self.cdll.igk_cuda_step(ctypes.byref(params), ctypes.byref(buffers), int(device),
                                         ctypes.c_void_p(stream))
        self._check(rc, "fused step")

    def step_indexed(self, table: abi.StepTable, buffers: abi.StepBuffers, num_threads: int = 0, device: int = 0,
                     stream: int = 0) -> None:
        """Launch ``table.params[*table.counter]`` on raw pointers, then advance the counter (see
        binding.fused_step_indexed for the checks).

        cpu: runs synchronously and raises KernelError for a launch whose scalars do not fit the
        buffers. cuda: enqueues the step and the counter advance on ``stream``; such a launch runs
        nothing and is recorded in ``table.fault`` (the host cannot see it without waiting).
        """
        if self.kind == "cpu":
            rc = self.cdll.igk_cpu_step_indexed(ctypes.byref(table), ctypes.byref(buffers), int(num_threads))
        else:
            rc = self.cdll.igk_cuda_step_indexed(ctypes.byref(table), ctypes.byref(buffers), int(device),
                                                 ctypes.c_void_p(stream))
        self._check(rc, "indexed fused step")

    def philox(self, seed: int, stream: int, indices_ptr: int, n: int, blocks: int, out_ptr: int,
               device: int = 0, cuda_stream: int = 0) -> None:
        """Raw words of the noise contract into out (uint32 [n, blocks, 4])."""
        if self.kind == "cpu":
            rc = self.cdll.igk_cpu_philox(seed, stream, indices_ptr, n, blocks, out_ptr)
        else:
            rc = self.cdll.igk_cuda_philox(seed, stream, indices_ptr, n, blocks, out_ptr, device,
                                           ctypes.c_void_p(cuda_stream))
        self._check(rc, "philox")

    def philox_raw(self, counters, keys):
        """Philox4x32-10 on arbitrary counters (CPU twin only): uint32 (M, 4), (M, 2) -> uint32 (M, 4)."""
        import numpy as np

        if self.kind != "cpu":
            raise KernelError("philox_raw is a CPU-twin function")
        ctr = np.ascontiguousarray(counters, dtype=np.uint32).reshape(-1, 4)
        key = np.ascontiguousarray(keys, dtype=np.uint32).reshape(-1, 2)
        if key.shape[0] != ctr.shape[0]:
            raise ValueError(f"{ctr.shape[0]} counters but {key.shape[0]} keys")
        out = np.empty_like(ctr)
        rc = self.cdll.igk_cpu_philox_raw(ctr.ctypes.data, key.ctypes.data, ctr.shape[0], out.ctypes.data)
        self._check(rc, "philox_raw")
        return out

    def gaussian(self, seed: int, stream: int, indices_ptr: int, n: int, numel: int, out_ptr: int,
                 num_threads: int = 0, device: int = 0, cuda_stream: int = 0) -> None:
        """Gaussians of the noise contract into out (float32 [n, numel])."""
        if self.kind == "cpu":
            rc = self.cdll.igk_cpu_gaussian(seed, stream, indices_ptr, n, numel, out_ptr, int(num_threads))
        else:
            rc = self.cdll.igk_cuda_gaussian(seed, stream, indices_ptr, n, numel, out_ptr, device,
                                             ctypes.c_void_p(cuda_stream))
        self._check(rc, "gaussian")


def library_filename(stem: str) -> str:
    if sys.platform == "win32":
        return f"{stem}.dll"
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    return f"lib{stem}.so"


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    dirs.append(DEFAULT_DIR)
    return dirs


def _disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no", "reference")


def _find(stem: str) -> Path | None:
    for d in search_dirs():
        p = d / library_filename(stem)
        if p.is_file():
            return p
    return None


def _open(kind: str, path: Path) -> tuple[KernelLibrary | None, str]:
    try:
        cdll = ctypes.CDLL(str(path))
        stale = abi.stale_version(cdll)
        if stale is None:
            abi.declare(cdll, kind)
    except (OSError, AttributeError) as exc:
        return None, f"cannot load: {exc}"
    if stale:
        return None, stale
    problem = abi.check_abi(cdll)
    if problem:
        return None, problem
    return KernelLibrary(cdll, kind, path), ""


def load_library(path: Path | str, kind: str) -> KernelLibrary:
    """Open the library file ``path`` of ``kind`` ('cpu' or 'cuda') directly, bypassing the search.

    Raises KernelError if it cannot be loaded or speaks another ABI. A CUDA library is not probed
    here: call ``lib.cdll.igk_cuda_probe(device)`` (or use ``cuda_library``) before launching.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    lib, problem = _open(kind, Path(path))
    if lib is None:
        raise KernelError(f"{path}: {problem}")
    return lib


_lock = threading.RLock()  # re-entrant: a look-up of the CUDA library may load the CPU twin's status too
_cpu: tuple[KernelLibrary | None, LibraryStatus] | None = None
_cuda_file: tuple[KernelLibrary | None, LibraryStatus] | None = None
_cuda_devices: dict[int, tuple[KernelLibrary | None, LibraryStatus]] = {}
_refused: dict[int, dict[str, str]] = {}  # device -> {build: why}: builds refused there after loading (self-test)


def cpu_library() -> KernelLibrary | None:
    """The CPU twin, or None (missing, unusable or disabled: see ``library_status('cpu')``)."""
    return _load_cpu()[0]


def _load_cpu() -> tuple[KernelLibrary | None, LibraryStatus]:
    global _cpu
    with _lock:
        if _cpu is None:
            _cpu = _load_file("cpu", CPU_STEM)
        return _cpu


def _load_file(kind: str, stem: str) -> tuple[KernelLibrary | None, LibraryStatus]:
    if _disabled():
        return None, LibraryStatus(kind, "disabled", None, f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)}")
    path = _find(stem)
    if path is None:
        where = ", ".join(str(d) for d in search_dirs())
        return None, LibraryStatus(kind, "missing", None,
                                   f"{library_filename(stem)} not in {where} (build: python -m igengine.kernels.build)")
    lib, problem = _open(kind, path)
    if lib is None:
        warnings.warn(f"igengine kernels: {path} {problem}; using the reference PyTorch path", RuntimeWarning,
                      stacklevel=3)
        return None, LibraryStatus(kind, "unusable", str(path), problem)
    return lib, LibraryStatus(kind, "loaded", str(path), lib.build_info, build="cmake")


def cuda_library(device: int | None = None) -> KernelLibrary | None:
    """The CUDA library if it can run on CUDA device ``device`` (default: the current one), else None.

    Never raises for a missing library or GPU; warns once if the library exists but cannot run here.
    """
    return _load_cuda(device)[0]


def _build_choice() -> str:
    value = os.environ.get(ENV_BUILD, "").strip().lower() or "auto"
    if value not in BUILDS:
        warnings.warn(f"igengine kernels: {ENV_BUILD}={value!r} is not one of {', '.join(BUILDS)}; using auto",
                      RuntimeWarning, stacklevel=4)
        return "auto"
    return value


def _load_cuda(device: int | None) -> tuple[KernelLibrary | None, LibraryStatus]:
    import torch

    if _disabled():
        return None, LibraryStatus("cuda", "disabled", None, f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)}")
    if not torch.cuda.is_available():
        return None, LibraryStatus("cuda", "no-gpu", None, "torch.cuda.is_available() is False")
    if device is None:
        device = torch.cuda.current_device()
    global _cuda_file
    choice = _build_choice()
    with _lock:
        if device in _cuda_devices:
            return _cuda_devices[device]
        lib, status = None, None
        refused = _refused.get(device, {})
        if choice != "nvrtc":
            if _cuda_file is None:
                _cuda_file = _load_file("cuda", CUDA_STEM)
            lib, status = _cuda_file
            if lib is not None and "cmake" in refused:
                status = LibraryStatus("cuda", "unusable", str(lib.path), f"self-test: {refused['cmake']}")
                lib = None
            if lib is not None:
                rc = lib.cdll.igk_cuda_probe(int(device))
                if rc != abi.Status.OK:
                    text = lib.cdll.igk_last_error().decode(errors="replace")
                    then = "trying the NVRTC build" if choice == "auto" else "using the reference PyTorch path"
                    warnings.warn(f"igengine kernels: {lib.path.name} cannot run on cuda:{device} ({text}); {then}",
                                  RuntimeWarning, stacklevel=3)
                    status = LibraryStatus("cuda", "unusable", str(lib.path), text)
                    lib = None
        if lib is None and choice != "cmake":
            nlib, nstatus = _load_nvrtc(int(device), refused.get("nvrtc"))
            if nlib is not None or status is None:
                lib, status = nlib, nstatus
            else:
                state = "unusable" if "unusable" in (status.state, nstatus.state) else "missing"
                status = LibraryStatus("cuda", state, status.path or nstatus.path,
                                       f"cmake: {status.detail}; nvrtc: {nstatus.detail}")
        _cuda_devices[device] = (lib, status)
        return lib, status


def _load_nvrtc(device: int, refused: str | None = None):
    """The NVRTC build on ``device``: (library, status); never raises (cuda-python may be absent).

    refused: why this build was refused on ``device`` after loading (its self-test), if it was.
    """
    from igengine.kernels import nvrtc, nvrtc_library

    lib = nvrtc_library.shared_library()
    if refused is not None:
        return None, LibraryStatus("cuda", "unusable", str(lib.path) if lib.path else None, f"self-test: {refused}")
    try:
        lib.load(device)
    except nvrtc.NvrtcUnavailable as exc:
        return None, LibraryStatus("cuda", "missing", None, str(exc), build=None)
    except Exception as exc:  # NvrtcError (compilation), DriverError (loading), anything cuda-python raises
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"igengine kernels: the NVRTC build cannot run on cuda:{device} ({text}); "
                      "using the reference PyTorch path", RuntimeWarning, stacklevel=4)
        return None, LibraryStatus("cuda", "unusable", str(lib.path) if lib.path else None, str(exc))
    facts = lib.build_facts(device)
    return lib, LibraryStatus("cuda", "loaded", facts["path"], facts["info"], build="nvrtc")


def refuse(device: int, build: str, why: str) -> None:
    """Stop giving the ``build`` ('cmake' or 'nvrtc') of the CUDA kernels for CUDA device ``device``.

    Called by ``igengine.kernels.trusted`` when a loaded build fails its self-test there. The next
    look-up for that device takes the next build (``IGENGINE_KERNELS_BUILD=auto``) or none (the
    reference path), and the status says ``self-test: why``. Warns nothing: the caller does.
    """
    if build not in ("cmake", "nvrtc"):
        raise ValueError(f"build must be 'cmake' or 'nvrtc', got {build!r}")
    with _lock:
        _refused.setdefault(int(device), {})[build] = why
        _cuda_devices.pop(int(device), None)


def library_status(kind: str, device: int | None = None) -> LibraryStatus:
    """Load (if not yet) and report the library of ``kind`` ('cpu' or 'cuda')."""
    return _load_cpu()[1] if kind == "cpu" else _load_cuda(device)[1]


def library_for(device) -> KernelLibrary | None:
    """The library that can run fused steps on tensors of ``device`` (a torch.device or string), or None."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return cuda_library(dev.index)
    if dev.type == "cpu":
        return cpu_library()
    return None


def kernel_path(device=None) -> str:
    """Which implementation a fused step takes: 'cuda', 'cpu-twin' or 'reference'.

    With ``device`` (torch.device or string): the path for tensors on that device (a CUDA device
    without a usable CUDA library, or an MPS/XPU device, gets 'reference'). Without: 'cuda' if a GPU
    and a usable CUDA library are present, else 'cpu-twin' if the twin loads, else 'reference'.
    """
    if device is not None:
        lib = library_for(device)
        return PATH_REFERENCE if lib is None else (PATH_CUDA if lib.kind == "cuda" else PATH_CPU)
    if cuda_library() is not None:
        return PATH_CUDA
    if cpu_library() is not None:
        return PATH_CPU
    return PATH_REFERENCE


def describe() -> dict:
    """JSON-able facts for ``igengine info`` and manifests: the default path, which CUDA build is in
    use ('cmake', 'nvrtc' or None) and both libraries' status."""
    from igengine.kernels.nvrtc import cache_dir

    cuda = library_status("cuda")
    return {
        "path": kernel_path(),
        "cuda_build": cuda.build if cuda.state == "loaded" else None,
        "cuda": cuda.to_dict(),
        "cpu": library_status("cpu").to_dict(),
        "search_dirs": [str(d) for d in search_dirs()],
        "nvrtc_cache": str(cache_dir()),
    }


def _reset_for_tests() -> None:
    """Forget every loaded library (tests that change IGENGINE_KERNELS_DIR / IGENGINE_KERNELS)."""
    global _cpu, _cuda_file
    with _lock:
        _cpu = None
        _cuda_file = None
        _cuda_devices.clear()
        _refused.clear()
    from igengine.kernels import nvrtc_library

    nvrtc_library._reset_for_tests()
