"""Writers: samples.npz, PNGs, latents and manifest.json, written so that nothing is ever half-written.

Every file goes to a temporary name in the same folder, is flushed and fsynced, then renamed over
its final name (atomic on POSIX). ``manifest.json`` is written last. An output folder that holds the
manifest of a *different* run is refused unless ``overwrite`` is set, so a typo cannot destroy an
earlier run's samples.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

import igengine

MANIFEST = "manifest.json"
SAMPLES = "samples.npz"


class OutputError(RuntimeError):
    """The output folder cannot be used; the message says why and what to do."""


def igengine_commit() -> str:
    """The git commit of the igengine source tree, when it runs from a checkout."""
    root = Path(igengine.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


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


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OutputError(f"{path} exists but cannot be read ({e}); move it away or pass --overwrite") from None


def prepare_output_folder(folder: Path, run_key: dict, overwrite: bool) -> None:
    """Create ``folder`` (or accept it) for a run identified by ``run_key``.

    Refuses a folder holding another run's manifest unless ``overwrite``; checks that it is writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output path {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable: {e.strerror}") from None
    existing = read_manifest(folder)
    if existing is not None and existing.get("run_key") != run_key and not overwrite:
        raise OutputError(
            f"{folder} holds the manifest of a different run (other checkpoint, settings or seed); "
            "choose another --out or pass --overwrite"
        )
