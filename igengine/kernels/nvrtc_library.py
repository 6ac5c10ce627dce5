"""The NVRTC build of the CUDA kernels, loaded and launched through the CUDA driver API (cuda-python).

``NvrtcLibrary`` offers what ``library.KernelLibrary`` offers for 'cuda' (step, step_indexed,
philox, gaussian), on raw pointers, so ``binding`` and the samplers use it unchanged. Per device it
compiles (or reads from the cache: ``igengine.kernels.nvrtc``) the image for that GPU, loads it
with ``cuModuleLoadData`` into the device's primary context (the one PyTorch uses), and looks up
every kernel at once, so nothing loads lazily inside a CUDA-graph capture. A launch is
``cuLaunchKernel`` on the caller's stream: no allocation, copy or synchronisation, so launches can
be captured in a CUDA graph, as with the CMake library.

The C library checks its arguments again on the C side (``igk_common.h``); here the same checks
run in Python before a launch (``_validate``, ``_validate_indexed``), with the same texts.

Used by ``library.cuda_library`` when no usable CMake library is found (or when
``IGENGINE_KERNELS_BUILD=nvrtc``). Importing this module imports neither cuda-python nor torch.
May import (within igengine.kernels): abi, nvrtc (never the loader that uses it).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from igengine.kernels import abi, nvrtc
from igengine.kernels.abi import KernelError
# The driver queries live with the compiler (which target, which cache key); launching uses them too.
from igengine.kernels.nvrtc import (DriverError, _call, _driver, _init, compute_capability,  # noqa: F401
                                    device_targets, driver_version)

_MAX_GRID_X = 1 << 30
_MAX_GRID_Y = 65535


@contextmanager
def _current(drv, ctx):
    """Makes ``ctx`` the calling thread's current context for the block and restores the previous one."""
    (prev,) = _call(drv, drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
    switch = int(prev) != int(ctx)
    if switch:
        _call(drv, drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    try:
        yield
    finally:
        if switch:
            drv.cuCtxSetCurrent(prev)


@dataclass
class _Module:
    device: int
    ctx: object
    module: object
    functions: dict
    path: Path
    target: nvrtc.Target
    nvrtc_version: tuple[int, int]
    driver: int
    cc: int
    cached: bool

    def info(self) -> str:
        jit = ", JIT-compiled by the driver" if self.target.fmt == "ptx" else ""
        return (f"cuda nvrtc {self.nvrtc_version[0]}.{self.nvrtc_version[1]}, {self.target.fmt} {self.target.name}"
                f"{jit}, GPU sm_{self.cc}, driver {self.driver // 1000}.{(self.driver % 1000) // 10}")


def _announce(target: nvrtc.Target, path: Path) -> None:
    print(f"igengine kernels: compiling the CUDA kernels for {target.name} with NVRTC (once; cached as {path})",
          file=sys.stderr, flush=True)


class NvrtcLibrary:
    """The NVRTC-compiled kernels: KernelLibrary's 'cuda' operations through the driver API."""

    kind = "cuda"
    build = "nvrtc"

    def __init__(self, cache_root: Path | str | None = None, force: bool = False):
        self.cache_root = cache_root
        self.force = force
        self._modules: dict[int, _Module] = {}
        self._lock = threading.Lock()
        self.path: Path | None = None  # cache file of the last module loaded (messages, describe)
        self.build_info = "cuda nvrtc (not loaded)"

    # -- loading --------------------------------------------------------------------------------
    def load(self, device: int) -> _Module:
        """Compile (or read from the cache) and load the kernels for CUDA device ``device``.

        Raises NvrtcUnavailable (no cuda-python / NVRTC / driver), NvrtcError (compilation) or
        DriverError (the module does not load on this GPU).
        """
        device = int(device)
        with self._lock:
            mod = self._modules.get(device)
            if mod is None:
                mod = self._load(device)
                self._modules[device] = mod
                self.path = mod.path
                self.build_info = mod.info()
            return mod

    def _load(self, device: int) -> _Module:
        drv = _driver()
        _init(drv)
        (count,) = _call(drv, drv.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= device < int(count):
            raise DriverError(f"device {device} out of range ({int(count)} devices)")
        cc = compute_capability(device)
        version = driver_version()
        target = nvrtc.target_for(cc)
        got = nvrtc.cached_image(target, version, root=self.cache_root, force=self.force, on_compile=_announce)
        (dev,) = _call(drv, drv.cuDeviceGet(device), "cuDeviceGet")
        (ctx,) = _call(drv, drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        with _current(drv, ctx):
            try:
                (module,) = _call(drv, drv.cuModuleLoadData(got.image), f"cuModuleLoadData({got.path.name})")
            except DriverError as exc:
                raise DriverError(f"{exc}; the image is {target.name}, the GPU sm_{cc}", arch=exc.arch) from None
            functions = {}
            for name in nvrtc.KERNELS:
                (fn,) = _call(drv, drv.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
                # Load every kernel now: lazy loading (CUDA_MODULE_LOADING=LAZY) would otherwise load it
                # at its first launch, which may be inside a graph capture. cuFuncLoad: CUDA >= 12.4.
                if hasattr(drv, "cuFuncLoad"):
                    _call(drv, drv.cuFuncLoad(fn), f"cuFuncLoad({name})")
                _call(drv, drv.cuFuncGetAttribute(drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS, fn),
                      f"cuFuncGetAttribute({name})")
                functions[name] = fn
        return _Module(device, ctx, module, functions, got.path, target, got.nvrtc, version, cc, got.hit)

    def build_facts(self, device=None) -> dict:
        """Which build runs on ``device`` (an int, a torch.device or None: the last one loaded)."""
        index = getattr(device, "index", device)
        mod = self._modules.get(int(index)) if index is not None else None
        path = mod.path if mod is not None else self.path
        return {"build": self.build, "path": str(path) if path else None,
                "info": mod.info() if mod is not None else self.build_info}

    # -- launches -------------------------------------------------------------------------------
    def _launch(self, device: int, name: str, grid: tuple[int, int], threads: int, stream: int, args) -> None:
        try:
            mod = self.load(device)
        except (nvrtc.NvrtcUnavailable, nvrtc.NvrtcError) as exc:
            raise KernelError(f"nvrtc: {exc}") from None
        drv = _driver()
        ptrs = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        with _current(drv, mod.ctx):
            _call(drv, drv.cuLaunchKernel(mod.functions[name], grid[0], grid[1], 1, threads, 1, 1, 0,
                                          drv.CUstream(int(stream)), ctypes.addressof(ptrs), 0), f"{name} launch")

    def step(self, params: abi.StepParams, buffers: abi.StepBuffers, num_threads: int = 0, device: int = 0,
             stream: int = 0) -> None:
        """One fused step on raw device pointers, enqueued on ``stream`` of ``device`` (see KernelLibrary.step)."""
        _raise(_validate(params, buffers), "fused step")
        name = nvrtc.STEP_KERNELS[(int(buffers.v_dtype), _can_vectorise(buffers))]
        self._launch(device, name, _grid(buffers.n, (buffers.e + 3) // 4), nvrtc.THREADS, stream,
                     (params, buffers))

    def step_indexed(self, table: abi.StepTable, buffers: abi.StepBuffers, num_threads: int = 0, device: int = 0,
                     stream: int = 0) -> None:
        """The step ``table.params[*table.counter]``, then the counter advance, both on ``stream``."""
        _raise(_validate_indexed(table, buffers), "indexed fused step")
        name = nvrtc.STEP_INDEXED_KERNELS[(int(buffers.v_dtype), _can_vectorise(buffers))]
        self._launch(device, name, _grid(buffers.n, (buffers.e + 3) // 4), nvrtc.THREADS, stream,
                     (table, buffers))
        self._launch(device, "igk_k_advance", (1, 1), 1, stream, (ctypes.c_void_p(table.counter),))

    def philox(self, seed: int, stream: int, indices_ptr: int, n: int, blocks: int, out_ptr: int,
               device: int = 0, cuda_stream: int = 0) -> None:
        """Raw words of the noise contract into out (uint32 [n, blocks, 4])."""
        if not indices_ptr or not out_ptr:
            _raise((abi.Status.ERR_NULL, "indices and out must not be NULL"), "philox")
        if n <= 0 or blocks <= 0:
            _raise((abi.Status.ERR_SIZE, "n and blocks must be > 0"), "philox")
        self._launch(device, "igk_k_philox", _grid(n, blocks), nvrtc.THREADS, cuda_stream,
                     (ctypes.c_uint64(seed), ctypes.c_uint32(stream), ctypes.c_void_p(indices_ptr),
                      ctypes.c_int64(n), ctypes.c_int64(blocks), ctypes.c_void_p(out_ptr)))

    def gaussian(self, seed: int, stream: int, indices_ptr: int, n: int, numel: int, out_ptr: int,
                 num_threads: int = 0, device: int = 0, cuda_stream: int = 0) -> None:
        """Gaussians of the noise contract into out (float32 [n, numel])."""
        if not indices_ptr or not out_ptr:
            _raise((abi.Status.ERR_NULL, "indices and out must not be NULL"), "gaussian")
        if n <= 0 or numel <= 0:
            _raise((abi.Status.ERR_SIZE, "n and numel must be > 0"), "gaussian")
        self._launch(device, "igk_k_gaussian", _grid(n, (numel + 3) // 4), nvrtc.THREADS, cuda_stream,
                     (ctypes.c_uint64(seed), ctypes.c_uint32(stream), ctypes.c_void_p(indices_ptr),
                      ctypes.c_int64(n), ctypes.c_int64(numel), ctypes.c_void_p(out_ptr)))

    def philox_raw(self, counters, keys):
        raise KernelError("philox_raw is a CPU-twin function")


def _grid(rows: int, blocks: int) -> tuple[int, int]:
    return min((int(blocks) + nvrtc.THREADS - 1) // nvrtc.THREADS, _MAX_GRID_X), min(int(rows), _MAX_GRID_Y)


def _raise(problem: tuple[int, str] | None, what: str) -> None:
    if problem is not None:
        status, text = problem
        raise KernelError(f"nvrtc: {what} failed ({abi.Status(status).name}): {text}")


def _aligned(ptr: int | None, a: int) -> bool:
    return not ptr or ptr % a == 0


def _can_vectorise(b: abi.StepBuffers) -> bool:
    """igk::can_vectorise: whole blocks only, 16-byte fp32 buffers, 8-byte 16-bit v."""
    va = 16 if b.v_dtype == abi.DType.F32 else 8
    return (b.e % 4 == 0 and all(_aligned(p, 16) for p in (b.x, b.k1_in, b.x_out, b.k1_out, b.net_out))
            and _aligned(b.v_final, va) and _aligned(b.v_inter, va))


def _check_sizes(b: abi.StepBuffers) -> tuple[int, str] | None:
    if b.n <= 0 or b.e <= 0:
        return abi.Status.ERR_SIZE, f"n = {b.n} and e = {b.e} must be > 0"
    if b.n > (1 << 31) or b.e > (1 << 40):
        return abi.Status.ERR_SIZE, f"n = {b.n} or e = {b.e} too large"
    if not abi.DType.F32 <= b.v_dtype <= abi.DType.F16:
        return abi.Status.ERR_DTYPE, f"unknown v_dtype {b.v_dtype}"
    return None


def _validate(p: abi.StepParams, b: abi.StepBuffers) -> tuple[int, str] | None:
    """igk::validate (csrc/igk_common.h): the contract of igk_step_buffers for the kind."""
    if p is None or b is None:
        return abi.Status.ERR_NULL, "params and buffers must not be NULL"
    problem = _check_sizes(b)
    if problem:
        return problem
    K = abi.Kind
    if not K.SDE <= p.kind <= K.HEUN_CORRECT:
        return abi.Status.ERR_KIND, f"unknown kind {p.kind}"
    if not abi.FamilyCode.SIT <= p.family <= abi.FamilyCode.RAEV2:
        return abi.Status.ERR_KIND, f"unknown family {p.family}"
    sde = p.kind in (K.SDE, K.SDE_LAST)
    if sde != bool(p.drift):
        return abi.Status.ERR_KIND, "drift must be set exactly for the SDE kinds"
    if p.drift and p.family != abi.FamilyCode.SIT:
        return abi.Status.ERR_KIND, "the SDE drift is a SiT-family field"
    if p.family == abi.FamilyCode.RAEV2 and p.kind != K.EULER:
        return abi.Status.ERR_KIND, f"a RAEv2 launch is an Euler step (kind {p.kind} given)"
    checks = ((not b.x, "x is NULL"), (not b.v_final, "v_final is NULL"),
              (p.ig and not b.v_inter, "IG is active but v_inter is NULL"),
              (p.kind == K.SDE and not b.indices, "the SDE step needs the sample indices"),
              (p.kind == K.HEUN_CORRECT and not b.k1_in, "the Heun corrector needs k1_in"),
              (p.kind == K.HEUN_PREDICT and not b.k1_out, "the Heun predictor needs k1_out"),
              (p.kind != K.HEUN_PREDICT and not b.x_out, "x_out is NULL"),
              (p.dup_next and not b.net_out, "dup_next is set but net_out is NULL"))
    for bad, text in checks:
        if bad:
            return abi.Status.ERR_NULL, text
    return None


def _validate_indexed(t: abi.StepTable, b: abi.StepBuffers) -> tuple[int, str] | None:
    """igk::validate_indexed: what the host can check of an indexed launch."""
    if t is None or b is None:
        return abi.Status.ERR_NULL, "table and buffers must not be NULL"
    if not t.params or not t.counter:
        return abi.Status.ERR_NULL, "the table's params and counter must not be NULL"
    if t.count <= 0:
        return abi.Status.ERR_SIZE, f"the table has {t.count} launches, expected > 0"
    problem = _check_sizes(b)
    if problem:
        return problem
    if not b.x:
        return abi.Status.ERR_NULL, "x is NULL"
    if not b.v_final:
        return abi.Status.ERR_NULL, "v_final is NULL"
    if t.v_rows not in (b.n, 2 * b.n):
        return abi.Status.ERR_SIZE, f"v_rows = {t.v_rows}, expected n = {b.n} or 2n"
    if (t.net_rows not in (b.n, 2 * b.n)) if b.net_out else t.net_rows != 0:
        return abi.Status.ERR_SIZE, f"net_rows = {t.net_rows}, expected n or 2n (0 without net_out)"
    return None


_shared: NvrtcLibrary | None = None
_shared_lock = threading.Lock()


def shared_library() -> NvrtcLibrary:
    """The process's NvrtcLibrary (modules are loaded per device on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = NvrtcLibrary()
        return _shared


def _reset_for_tests() -> None:
    global _shared
    with _shared_lock:
        _shared = None
