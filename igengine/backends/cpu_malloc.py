"""glibc's malloc told to keep freed memory for the next network call instead of returning it to the OS.

Why: a CPU forward allocates and frees the same large activations every call (LightningDiT-B/1 fp32
at 4 rows: 16 MB SwiGLU hiddens). glibc returns the freed top of its heap to the OS once it exceeds
the trim threshold, and the next call faults every page back in, zeroed by the kernel: 12,000 minor
page faults per 4-row forward (about 47 MB), 574 ms against 527 ms without them (measured on the
AVX-512 BF16 EPYC of 2026-12-02, eager fp32; 2 rows were unaffected). Inductor plans its buffers and
suffers less. This is why jemalloc or tcmalloc are the usual advice for CPU inference; glibc can be
told the same at run time:
  * M_TRIM_THRESHOLD = 1 GiB: freed memory at the top of the heap stays with the process, up to 1 GiB;
  * M_MMAP_THRESHOLD = 32 MiB (glibc's maximum on 64-bit, which its dynamic threshold reaches at
    most too): blocks below it come from the heap. Setting either option freezes glibc's dynamic
    threshold, so both are set (the trim threshold alone left the mmap threshold at whatever it had
    reached, 128 KiB in a fresh process).
Only how memory is obtained changes: no result changes, by construction. The cost is a resident
size up to the largest forward's working set (freed memory is kept, not returned). It is process
wide, applied once by the first CPU backend, and skipped where the C library is not glibc or where
``IGENGINE_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "IGENGINE_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30
MMAP_THRESHOLD = 32 << 20

_applied: dict[str, object] = {}  # "result": the outcome of the first call in this process


def _libc():
    """glibc's handle, or None where the C library is another one (musl, macOS) or cannot be loaded."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> str:
    """Set the two thresholds once per process; returns what happened, for a backend's ``describe``:
    "applied", "off" (``IGENGINE_KEEP_FREED_MEMORY=0``), "not glibc" or "refused by glibc"."""
    if "result" in _applied:
        return _applied["result"]  # type: ignore[return-value]
    if os.environ.get(ENV, "").strip() == "0":
        result = "off"
    elif (libc := _libc()) is None:
        result = "not glibc"
    else:
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        result = "applied" if ok else "refused by glibc"
    _applied["result"] = result
    return result


__all__ = ["ENV", "keep_freed_memory"]
