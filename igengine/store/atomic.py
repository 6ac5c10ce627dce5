"""Atomic writes: a file appears under its name complete, or not at all.

Every file goes to a temporary name in the same folder, is flushed and fsynced, then renamed over
its final name (atomic on POSIX) and the folder is fsynced. It gets the permissions ``open()``
would give it (``0o666 & ~umask``), not the private 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


_FALLBACK_UMASK: int | None = None


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``, Linux >= 4.7).

    Elsewhere it is read once per process with ``os.umask`` (set and restored at once), since that
    briefly changes the umask of every thread.
    """
    global _FALLBACK_UMASK
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if _FALLBACK_UMASK is None:
        _FALLBACK_UMASK = os.umask(0o022)
        os.umask(_FALLBACK_UMASK)
    return _FALLBACK_UMASK


def file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_writer(path: Path, tag: str = "") -> Iterator[BinaryIO]:
    """A binary file object that becomes ``path`` only if the ``with`` block completes.

    The data goes to a temporary name in the same folder (``.NAME.<tag><random>.tmp``), is flushed
    and fsynced, then renamed over ``path`` (atomic on POSIX) and the folder is fsynced. On any
    exception (disk full, kill by signal, ...) the temporary file is removed (a SIGKILL leaves it
    behind under its hidden ``.tmp`` name, never under ``path``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{tag}", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes it 0600: give it what open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from None  # a failed write(): name its file
        raise
    _fsync_dir(path.parent)


def output_file_problem(path: Path) -> str | None:
    """Why ``atomic_writer`` could not write ``path`` (it is a folder, its folder is missing, or a file
    cannot be created there), or None. Meant for a check before long work whose result goes there."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        return "it is a folder; give a file name"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    try:  # create and remove a file, as the writer will: os.access misleads root and special file systems
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"folder {folder} is not writable ({e.strerror})"
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


