"""The run record beside every output: ``manifest.json``, and the folder rules that protect earlier runs.

``manifest.json`` is written last. An output folder that holds the manifest of a *different* run is
refused unless ``overwrite`` is set, so a typo cannot destroy an earlier run's samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import igengine
from igengine.errors import OutputError

MANIFEST = "manifest.json"
SAMPLES = "samples.npz"


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


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{path} exists but cannot be read ({e}); move it away or pass `overwrite`") from None
    if not isinstance(manifest, dict):
        raise OutputError(f"{path} holds JSON that is not an igengine manifest (a {type(manifest).__name__}, not an "
                          "object); move it away or pass `overwrite`")
    return manifest


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
    try:
        existing = read_manifest(folder)
    except OutputError:
        if not overwrite:  # a foreign or unreadable manifest: `overwrite` replaces it, as it replaces another run's
            raise
        existing = None
    if existing is not None and existing.get("run_key") != run_key and not overwrite:
        raise OutputError(
            f"{folder} holds the manifest of a different run (other checkpoint, settings or seed); "
            "choose another `out` or pass `overwrite`"
        )
