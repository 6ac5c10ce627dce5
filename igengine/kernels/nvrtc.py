"""The CUDA kernels compiled at first use with NVRTC, for a GPU user who has no nvcc and no CMake.

``pip install 'igengine[nvrtc]'`` brings cuda-python's bindings (``cuda.bindings``) and NVRTC as a
wheel. The first time a fused step runs on a GPU without a CMake-built
``libigengine_kernels_cuda``, this module compiles the device code of ``csrc/igk_kernels.cuh``
(with ``igk_math.h`` and ``igk_api.h``: the same text the CMake build compiles) for that GPU and
caches the image; ``igengine.kernels.nvrtc_library`` loads it with the CUDA driver API.

Target: a cubin (SASS) for ``sm_<cc>`` when this NVRTC can compile for the GPU's compute
capability, else PTX for the newest architecture it knows below it, which the driver JIT-compiles.

Cache: ``<root>/kernels/igk-<target>-<key>.bin``, root = ``$IGENGINE_CACHE``, else
``$XDG_CACHE_HOME/igengine``, else ``~/.cache/igengine`` (the root of every igengine cache). The key
is a sha256 over the sources, the compiler options, the target, the NVRTC version and the driver
version, so a change of any of them compiles anew. A file starts with a magic word and the sha256
of the image; one that does not check out (truncated, corrupt) is compiled again and replaced.
Files are written to a temporary name and renamed, so a reader never sees half a file.

Command line (compiles into the cache; needs no GPU when given --arch)::

    python -m igengine.kernels.nvrtc              # for every visible GPU
    python -m igengine.kernels.nvrtc --arch 90    # for sm_90, without a GPU
    python -m igengine.kernels.nvrtc --force      # compile again even if cached

What to compile for is asked of the CUDA driver here too (``driver_version``, ``compute_capability``,
``device_targets``: the target and the cache key depend on them); ``igengine.kernels.nvrtc_library``
loads and launches the image through the same driver bindings.

Nothing here runs at import time, and importing this module imports neither cuda-python nor torch.
May import (within igengine.kernels): abi.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from igengine.config import cache_root
from igengine.kernels import abi
from igengine.store.atomic import atomic_write_bytes

# The kernels' entry points (extern "C" in csrc/igk_kernels.cuh), by (dtype code, vectorised).
STEP_KERNELS = {(0, False): "igk_k_step_f32", (0, True): "igk_k_step_f32_vec",
                (1, False): "igk_k_step_bf16", (1, True): "igk_k_step_bf16_vec",
                (2, False): "igk_k_step_f16", (2, True): "igk_k_step_f16_vec"}
STEP_INDEXED_KERNELS = {key: name.replace("igk_k_step_", "igk_k_step_indexed_") for key, name in STEP_KERNELS.items()}
KERNELS = (*STEP_KERNELS.values(), *STEP_INDEXED_KERNELS.values(), "igk_k_advance", "igk_k_gaussian", "igk_k_philox")
THREADS = 256  # IGK_THREADS

# The device code NVRTC compiles: the main file, then the headers it includes.
MAIN = "igk_kernels.cuh"
SOURCES = (MAIN, "igk_math.h", "igk_api.h")
# --fmad=false: every float32 operation rounds once, as in the CMake build (csrc/README.md). The
# sizes: igk_kernels.cuh static_asserts that the device's structs are abi.py's (the CMake library
# is checked on load through igk_*_size(); an NVRTC module has no such functions).
OPTIONS = ("--fmad=false", "--std=c++17", f"-DIGK_ABI_VERSION_EXPECTED={abi.ABI_VERSION}",
           f"-DIGK_PARAMS_SIZE={ctypes.sizeof(abi.StepParams)}", f"-DIGK_BUFFERS_SIZE={ctypes.sizeof(abi.StepBuffers)}",
           f"-DIGK_TABLE_SIZE={ctypes.sizeof(abi.StepTable)}")
CACHE_FORMAT = 1
_MAGIC = b"IGKNVRTC"

_PACKAGE_SOURCES = Path(__file__).resolve().parents[1] / "_csrc"  # in a wheel (setup.py copies csrc/ there)
_CHECKOUT_SOURCES = Path(__file__).resolve().parents[2] / "csrc"  # in a source checkout / editable install


class NvrtcUnavailable(RuntimeError):
    """NVRTC cannot be used here (no cuda-python, no NVRTC library, no sources, GPU too old): the reason."""


class NvrtcError(RuntimeError):
    """NVRTC refused the sources (the message carries its log)."""


@dataclass(frozen=True)
class Target:
    """What to compile for: ``fmt`` 'cubin' (SASS for sm_<arch>) or 'ptx' (compute_<arch>, JIT by the driver)."""

    arch: int  # compute capability as major*10 + minor: 80, 90, 120
    fmt: str = "cubin"

    def __post_init__(self) -> None:
        if self.fmt not in ("cubin", "ptx"):
            raise ValueError(f"fmt must be 'cubin' or 'ptx', got {self.fmt!r}")
        if not isinstance(self.arch, int) or self.arch < 10:
            raise ValueError(f"arch must be a compute capability like 80 or 90, got {self.arch!r}")

    @property
    def option(self) -> str:
        return f"--gpu-architecture={'sm' if self.fmt == 'cubin' else 'compute'}_{self.arch}"

    @property
    def name(self) -> str:
        return f"{'sm' if self.fmt == 'cubin' else 'compute'}_{self.arch}"


def cache_dir(root: Path | str | None = None) -> Path:
    return (Path(root) if root is not None else cache_root()) / "kernels"


def source_dir() -> Path:
    """The folder holding SOURCES: the wheel's igengine/_csrc, else the checkout's csrc/."""
    for d in (_PACKAGE_SOURCES, _CHECKOUT_SOURCES):
        if all((d / name).is_file() for name in SOURCES):
            return d
    raise NvrtcUnavailable(f"the kernel sources ({', '.join(SOURCES)}) are in neither {_PACKAGE_SOURCES} nor "
                           f"{_CHECKOUT_SOURCES}: reinstall igengine")


def read_sources(folder: Path | str | None = None) -> dict[str, bytes]:
    """name -> contents of the device sources, in SOURCES order."""
    folder = Path(folder) if folder is not None else source_dir()
    return {name: (folder / name).read_bytes() for name in SOURCES}


def _nvrtc():
    """cuda.bindings.nvrtc, or NvrtcUnavailable saying what to install."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:  # cuda-python 12.0 - 12.5 named the module cuda.nvrtc
            from cuda import nvrtc  # type: ignore[no-redef]
        except ImportError:
            raise NvrtcUnavailable("cuda-python is not installed (pip install 'igengine[nvrtc]')") from None
    return nvrtc


def _check(nvrtc, result, what: str) -> tuple:
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(err)
        raise NvrtcError(f"{what}: {text.decode(errors='replace') if isinstance(text, bytes) else text}")
    return tuple(rest)


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-python finds; NvrtcUnavailable if there is none."""
    nvrtc = _nvrtc()
    try:
        major, minor = _check(nvrtc, nvrtc.nvrtcVersion(), "nvrtcVersion")
    except NvrtcError as exc:
        raise NvrtcUnavailable(str(exc)) from None
    except Exception as exc:  # cuda.pathfinder's DynamicLibNotFoundError, OSError, RuntimeError
        raise NvrtcUnavailable(f"the NVRTC library was not found ({type(exc).__name__}: {exc}); "
                               "pip install 'igengine[nvrtc]' brings it as a wheel") from None
    return int(major), int(minor)


def supported_archs() -> tuple[int, ...]:
    """The compute capabilities this NVRTC compiles for (e.g. 75, 80, ..., 120)."""
    nvrtc = _nvrtc()
    nvrtc_version()
    (archs,) = _check(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    return tuple(sorted(int(a) for a in archs))


def target_for(cc: int, archs: tuple[int, ...] | None = None) -> Target:
    """The target for a GPU of compute capability ``cc``: a cubin if NVRTC knows cc, else PTX for the
    newest architecture below it (forward-compatible); NvrtcUnavailable for a GPU older than all."""
    archs = supported_archs() if archs is None else tuple(sorted(archs))
    if cc in archs:
        return Target(cc, "cubin")
    older = [a for a in archs if a < cc]
    if not older:
        raise NvrtcUnavailable(f"NVRTC compiles for sm_{archs[0]} and newer, the GPU is sm_{cc}: use an older "
                               "NVRTC wheel, or build with CMake (python -m igengine.kernels.build)")
    return Target(older[-1], "ptx")


def cache_key(sources: dict[str, bytes], target: Target, options: tuple[str, ...], nvrtc: tuple[int, int],
              driver: int) -> str:
    """32 hex digits: sha256 over the sources, options, target, NVRTC version and driver version."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "target": target.name, "fmt": target.fmt, "options": list(options),
                         "nvrtc": list(nvrtc), "driver": int(driver), "files": sorted(sources)},
                        sort_keys=True).encode())
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return h.hexdigest()[:32]


def compile_image(target: Target, sources: dict[str, bytes] | None = None,
                  options: tuple[str, ...] = OPTIONS) -> bytes:
    """Compile the kernels for ``target``: cubin (an ELF image) or PTX (text, NUL-terminated). No GPU needed."""
    nvrtc = _nvrtc()
    nvrtc_version()
    sources = read_sources() if sources is None else sources
    headers = list(sources)  # the main file only includes MAIN, so every source is a header
    main = f'#include "{MAIN}"\n'.encode()
    (prog,) = _check(nvrtc, nvrtc.nvrtcCreateProgram(main, b"igk_nvrtc.cu", len(headers),
                                                     [sources[n] for n in headers], [n.encode() for n in headers]),
                     "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (*options, target.option)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            text = log.rstrip(b"\0 ").decode(errors="replace")[-4000:]
            raise NvrtcError(f"NVRTC could not compile the kernels for {target.name}:\n{text}")
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if target.fmt == "cubin"
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        (size,) = _check(nvrtc, get_size(prog), "image size")
        image = b" " * size
        _check(nvrtc, get(prog, image), "image")
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _pack(image: bytes) -> bytes:
    return _MAGIC + hashlib.sha256(image).digest() + image


def _unpack(blob: bytes) -> bytes | None:
    """The image of a cache file, or None if the file is not one of ours or does not match its digest."""
    head = len(_MAGIC) + 32
    if len(blob) <= head or not blob.startswith(_MAGIC):
        return None
    image = blob[head:]
    return image if hashlib.sha256(image).digest() == blob[len(_MAGIC):head] else None


@dataclass(frozen=True)
class CachedImage:
    image: bytes
    path: Path
    target: Target
    nvrtc: tuple[int, int]
    hit: bool  # True: read from the cache; False: compiled now


def cached_image(target: Target, driver: int, root: Path | str | None = None, force: bool = False,
                 sources: dict[str, bytes] | None = None, options: tuple[str, ...] = OPTIONS,
                 on_compile=None) -> CachedImage:
    """The image for ``target`` from the cache, compiled (and stored) if absent, corrupt or ``force``.

    driver: the CUDA driver version (cuDriverGetVersion, e.g. 13000; 0 when compiling without a GPU).
    on_compile: called with (target, path) before a compilation (to tell the user it takes a while).
    """
    version = nvrtc_version()
    sources = read_sources() if sources is None else sources
    path = cache_dir(root) / f"igk-{target.name}-{cache_key(sources, target, options, version, driver)}.bin"
    if not force and path.is_file():
        try:
            image = _unpack(path.read_bytes())
        except OSError:
            image = None
        if image is not None:
            return CachedImage(image, path, target, version, True)
    if on_compile is not None:
        on_compile(target, path)
    image = compile_image(target, sources, options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _pack(image))
    except OSError as exc:  # a read-only cache still gives a working image, compiled every time
        print(f"igengine kernels: cannot write the NVRTC cache {path} ({exc}); compiling every run",
              file=sys.stderr)
    return CachedImage(image, path, target, version, False)


# ---- the CUDA driver: which GPU, which driver (cuda-python's driver API) ---------------------------

class DriverError(abi.KernelError):
    """A CUDA driver call failed (``arch``: the image holds no code this GPU can run)."""

    def __init__(self, message: str, arch: bool = False):
        super().__init__(message)
        self.arch = arch


def _driver():
    """cuda.bindings.driver, or NvrtcUnavailable saying what to install."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:  # cuda-python 12.0 - 12.5
            from cuda import cuda as driver  # type: ignore[no-redef]
        except ImportError:
            raise NvrtcUnavailable("cuda-python is not installed (pip install 'igengine[nvrtc]')") from None
    return driver


_ARCH_ERRORS = ("CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_PTX", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                "CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "CUDA_ERROR_INVALID_SOURCE")


def _call(drv, result, what: str) -> tuple:
    err, *rest = result
    if err != drv.CUresult.CUDA_SUCCESS:
        name = getattr(err, "name", str(err))
        _, text = drv.cuGetErrorString(err)
        text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        raise DriverError(f"{what}: {text} ({name})", arch=name in _ARCH_ERRORS)
    return tuple(rest)


_init_lock = threading.Lock()
_initialised = False


def _init(drv) -> None:
    global _initialised
    with _init_lock:
        if _initialised:
            return
        try:
            (err,) = drv.cuInit(0)
        except Exception as exc:  # cuda.pathfinder: libcuda.so not found (no NVIDIA driver)
            raise NvrtcUnavailable(f"the CUDA driver library was not found ({type(exc).__name__}: {exc})") \
                from None
        if err != drv.CUresult.CUDA_SUCCESS:
            raise NvrtcUnavailable(f"cuInit failed ({getattr(err, 'name', err)}): no usable CUDA driver or GPU")
        _initialised = True


def driver_version() -> int:
    """cuDriverGetVersion, e.g. 13000 for CUDA 13.0 (NvrtcUnavailable without a driver)."""
    drv = _driver()
    _init(drv)
    (v,) = _call(drv, drv.cuDriverGetVersion(), "cuDriverGetVersion")
    return int(v)


def compute_capability(device: int) -> int:
    """major * 10 + minor of CUDA device ``device`` (the ordinal PyTorch uses)."""
    drv = _driver()
    _init(drv)
    (dev,) = _call(drv, drv.cuDeviceGet(int(device)), f"cuDeviceGet({device})")
    attr = drv.CUdevice_attribute
    (major,) = _call(drv, drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc")
    (minor,) = _call(drv, drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc")
    return int(major) * 10 + int(minor)


def device_targets() -> list[tuple[Target, int]]:
    """(target, driver version) for every visible GPU, without duplicates."""
    drv = _driver()
    _init(drv)
    (count,) = _call(drv, drv.cuDeviceGetCount(), "cuDeviceGetCount")
    version = driver_version()
    out = []
    for d in range(int(count)):
        t = target_for(compute_capability(d))
        if (t, version) not in out:
            out.append((t, version))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m igengine.kernels.nvrtc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", default=[],
                    help="compute capability to compile for without a GPU, e.g. 90 (repeatable); "
                         "default: every visible GPU")
    ap.add_argument("--ptx", action="store_true", help="with --arch: PTX instead of a cubin")
    ap.add_argument("--force", action="store_true", help="compile again even if the cache has the image")
    args = ap.parse_args(argv)
    try:
        if args.arch:
            jobs = [(Target(a, "ptx" if args.ptx else "cubin"), 0) for a in args.arch]
        else:
            jobs = device_targets()
            if not jobs:
                print("error: no CUDA GPU visible; give --arch (e.g. --arch 90) to compile without one",
                      file=sys.stderr)
                return 1
        for target, driver in jobs:
            got = cached_image(target, driver, force=args.force,
                               on_compile=lambda t, p: print(f"compiling for {t.name} ...", flush=True))
            state = "cached" if got.hit else "compiled"
            print(f"{target.name}: {state} {got.path} ({len(got.image)} bytes, NVRTC {got.nvrtc[0]}.{got.nvrtc[1]})")
    except (NvrtcUnavailable, NvrtcError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main: under `python -m` this file is __main__, a second copy whose
    # exception classes are not those nvrtc_library raises.
    from igengine.kernels.nvrtc import main as _main

    sys.exit(_main())
