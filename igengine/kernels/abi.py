"""The C ABI of csrc/igk_api.h mirrored in ctypes: enums, the argument structs, function signatures,
and ``KernelError``, the error of a failed library call.

Keep this file and csrc/igk_api.h in lock-step; ``ABI_VERSION`` and the struct sizes are checked
against the library when it is loaded, so a stale build is refused instead of misread.

The lowest module of igengine.kernels: everything else here imports it, it imports nothing of igengine.
"""

from __future__ import annotations

import ctypes
import enum

ABI_VERSION = 3


class KernelError(RuntimeError):
    """A kernel library call failed (the message carries the library's own error text)."""


class Kind(enum.IntEnum):
    """What one launch does (``enum igk_kind``)."""

    SDE = 0
    SDE_LAST = 1
    EULER = 2
    HEUN_PREDICT = 3
    HEUN_CORRECT = 4


class FamilyCode(enum.IntEnum):
    """The model family of a launch (``enum igk_family``): its IG form, RAEv2's x-prediction velocity, its kinds."""

    SIT = 0
    LIGHTNINGDIT = 1
    RAEV2 = 2  # Euler only: v = (x - x_hat) / t_safe on the guided x-prediction x_hat


class DType(enum.IntEnum):
    """Element type of v_final / v_inter (``enum igk_dtype``)."""

    F32 = 0
    BF16 = 1
    F16 = 2


class Status(enum.IntEnum):
    OK = 0
    ERR_NULL = 1
    ERR_SIZE = 2
    ERR_DTYPE = 3
    ERR_KIND = 4
    ERR_CUDA = 5
    ERR_ARCH = 6


class Fault(enum.IntEnum):
    """Why an indexed launch ran nothing (``enum igk_fault``, written to the table's fault word)."""

    NONE = 0
    COUNTER = 1  # the counter is outside the table
    KIND = 2  # unknown kind or family, or flags that contradict the kind
    ROWS = 3  # v_rows != (cfg ? 2N : N), or net_rows < 2N under dup_next
    NULL = 4  # a buffer the launch's kind needs is missing


class StepParams(ctypes.Structure):
    """``igk_step_params``: the per-step scalars (float32 fields round the host's float64 values)."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("family", ctypes.c_int32),
        ("ig", ctypes.c_int32),
        ("cfg", ctypes.c_int32),
        ("drift", ctypes.c_int32),
        ("dup_next", ctypes.c_int32),
        ("step_index", ctypes.c_int32),
        ("noise_stream", ctypes.c_uint32),
        ("seed_lo", ctypes.c_uint32),
        ("seed_hi", ctypes.c_uint32),
        ("ig_w", ctypes.c_float),
        ("ig_w_uncond", ctypes.c_float),  # the IG weight of the unconditional rows (= ig_w but for RAEv2)
        ("cfg_w", ctypes.c_float),
        ("score_ratio", ctypes.c_float),
        ("score_var", ctypes.c_float),
        ("drift_t", ctypes.c_float),
        ("dt", ctypes.c_float),
        ("sqrt_abs_dt", ctypes.c_float),
        ("sqrt_diffusion", ctypes.c_float),
        ("t_safe", ctypes.c_float),  # RAEv2: the divisor max(t, 0.05) of v = (x - x_hat) / t_safe
    ]

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self._fields_)
        return f"StepParams({body})"


class StepBuffers(ctypes.Structure):
    """``igk_step_buffers``: raw pointers (host or device) and sizes of one launch."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("v_final", ctypes.c_void_p),
        ("v_inter", ctypes.c_void_p),
        ("k1_in", ctypes.c_void_p),
        ("indices", ctypes.c_void_p),
        ("x_out", ctypes.c_void_p),
        ("k1_out", ctypes.c_void_p),
        ("net_out", ctypes.c_void_p),
        ("first_bad", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("e", ctypes.c_int64),
        ("v_dtype", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class StepTable(ctypes.Structure):
    """``igk_step_table``: an indexed launch runs ``params[*counter]`` and then advances ``*counter``."""

    _fields_ = [
        ("params", ctypes.c_void_p),
        ("counter", ctypes.c_void_p),
        ("fault", ctypes.c_void_p),
        ("count", ctypes.c_int64),
        ("v_rows", ctypes.c_int64),
        ("net_rows", ctypes.c_int64),
    ]


_P = ctypes.POINTER
_COMMON = {
    "igk_abi_version": ([], ctypes.c_int),
    "igk_params_size": ([], ctypes.c_int),
    "igk_buffers_size": ([], ctypes.c_int),
    "igk_table_size": ([], ctypes.c_int),
    "igk_build_info": ([], ctypes.c_char_p),
    "igk_last_error": ([], ctypes.c_char_p),
}
_CPU = {
    "igk_cpu_step": ([_P(StepParams), _P(StepBuffers), ctypes.c_int], ctypes.c_int),
    "igk_cpu_step_indexed": ([_P(StepTable), _P(StepBuffers), ctypes.c_int], ctypes.c_int),
    "igk_cpu_philox": ([ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                        ctypes.c_void_p], ctypes.c_int),
    "igk_cpu_philox_raw": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], ctypes.c_int),
    "igk_cpu_gaussian": ([ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
}
_CUDA = {
    "igk_cuda_probe": ([ctypes.c_int], ctypes.c_int),
    "igk_cuda_step": ([_P(StepParams), _P(StepBuffers), ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    "igk_cuda_step_indexed": ([_P(StepTable), _P(StepBuffers), ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    "igk_cuda_philox": ([ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    "igk_cuda_gaussian": ([ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
}


def stale_version(lib: ctypes.CDLL) -> str | None:
    """A one-line reason if ``lib`` speaks another ABI version (checked before ``declare``: an older
    library lacks some of this version's functions, and that is what the user should be told)."""
    fn = lib.igk_abi_version
    fn.argtypes, fn.restype = [], ctypes.c_int
    version = fn()
    if version != ABI_VERSION:
        return f"ABI version {version}, expected {ABI_VERSION} (stale build: rebuild with python -m igengine.kernels.build)"
    return None


def declare(lib: ctypes.CDLL, kind: str) -> None:
    """Set argtypes/restype of every function a library of ``kind`` ('cpu' or 'cuda') exports.

    Raises AttributeError if the library lacks one of them (a foreign or truncated file).
    """
    table = dict(_COMMON)
    table.update(_CPU if kind == "cpu" else _CUDA)
    for name, (argtypes, restype) in table.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


def check_abi(lib: ctypes.CDLL) -> str | None:
    """None if ``lib`` speaks this ABI, else a one-line reason."""
    problem = stale_version(lib)
    if problem:
        return problem
    if (lib.igk_params_size() != ctypes.sizeof(StepParams) or lib.igk_buffers_size() != ctypes.sizeof(StepBuffers)
            or lib.igk_table_size() != ctypes.sizeof(StepTable)):
        return "struct sizes differ from igengine/kernels/abi.py (stale build: rebuild)"
    return None
