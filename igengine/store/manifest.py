"""The run record beside every output: ``manifest.json``, and the folder rules that protect earlier runs.

``manifest.json`` is written last. An output folder that holds the manifest of a *different* run is
refused unless ``overwrite`` is set, so a typo cannot destroy an earlier run's samples.
"""

from __future__ import annotations

import json
import os
import re
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
    if existing is None or overwrite:
        return
    stored, asked = existing.get("run_key"), json.loads(json.dumps(run_key))  # as it would be stored
    if stored != asked:
        why = (run_key_difference(stored, asked) if isinstance(stored, dict)
               else "its manifest records no run_key")
        raise OutputError(f"{folder} holds the manifest of a different run ({why}); "
                          "choose another `out` or pass `overwrite`")


SHOWN = 3  # differences a refusal names; the rest are counted
LONG = 40  # characters of a value shown before it is elided
_HASH = re.compile(r"^[0-9a-f]{13,}$")
_ABSENT = object()


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, folder's value, new value) for each setting that differs; dicts on both sides are walked,
    in the order of the new key, then the keys only the folder has."""
    found = []
    for name in list(new) + [k for k in old if k not in new]:
        a, b = old.get(name, _ABSENT), new.get(name, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            found.append((f"{prefix}{name}", a, b))
    return found


def _shown(value: object) -> str:
    """A run_key value in a message: hashes cut to 12 hex digits, printable strings bare, the rest as JSON, long ones elided."""
    if value is _ABSENT:
        return "absent"
    if isinstance(value, str) and value.isprintable():
        text = value[:12] if _HASH.match(value) else value
    else:
        text = json.dumps(value, sort_keys=True)
    return text if len(text) <= LONG else text[:LONG - 3] + "..."


def run_key_difference(stored: dict, asked: dict) -> str:
    """The settings in which two run keys differ, for one line: "sampler.steps: 50 in the folder, 20 asked; ...".

    Keys are dotted paths into the run key, in the order of the new run's key (then keys only the folder
    has); at most ``SHOWN`` are named and the rest counted ("+2 more").
    """
    differ = _differences(stored, asked)
    parts = [f"{path}: {_shown(a)} in the folder, {_shown(b)} asked" for path, a, b in differ[:SHOWN]]
    if len(differ) > SHOWN:
        parts.append(f"+{len(differ) - SHOWN} more")
    return "; ".join(parts) if parts else "the same settings, stored differently"
