"""The files of an exported graph are the ones it was exported with: checked against export.json before use.

An export folder's ``export.json`` records the size and sha256 of ``model.onnx`` and of every
external-data file (``model.onnx.data``, the weights). A graph's own record (``contract``) names the
checkpoint it came from, but the weights live in the other file: a ``model.onnx.data`` copied in from
another export would run without complaint and give other samples. So before a backend is built
(ONNX Runtime, or a TensorRT engine built from the graph), ``verify_graph_files`` checks each file:

  * its size, always (a stat);
  * its sha256, read in full at first use and remembered in a small memo per file under
    ``<cache root>/verified/``, keyed by (resolved path, size, mtime_ns, inode, ctime_ns): a later run
    whose stat still matches skips the read; any rewrite, touch, copy or rename hashes it again.

A mismatch is a GraphMismatchError naming the file, what export.json expects (bytes, sha256, the
checkpoint) and what to do (export again). A graph with no export.json beside it, or whose
export.json records no digest for a file, is used as before with a RuntimeWarning saying that its
files were not checked (folders written by ``igengine export`` always record them).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from igengine.errors import GraphMismatchError
from igengine.export.contract import SIDECAR, external_files
from igengine.safeload import file_sha256
from igengine.store.atomic import atomic_write_json

MEMO_VERSION = 1


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def _memo_path(memo_dir: Path, path: Path) -> Path:
    return memo_dir / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")


def known_sha256(path: Path, memo_dir: Path | None) -> str:
    """sha256 of ``path``: from its memo when the file's stat is unchanged since it was hashed, else read now.

    The memo is best effort: an unreadable or unwritable memo folder only means hashing again.
    """
    stat = _fingerprint(path)
    memo = _memo_path(memo_dir, path) if memo_dir is not None else None
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved.get("version") == MEMO_VERSION and saved.get("stat") == stat:
                return str(saved["sha256"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    sha = file_sha256(path)
    if memo is not None and _fingerprint(path) == stat:  # not changed while it was read
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo, {"version": MEMO_VERSION, "stat": stat, "sha256": sha})
        except OSError:
            pass
    return sha


def _unchecked(graph: Path, why: str) -> None:
    warnings.warn(f"igengine: the files of {graph} are not checked: {why} (export it again with `igengine export` "
                  "to record them)", RuntimeWarning, stacklevel=3)


def verify_graph_files(graph: Path, memo_dir: Path | None = None, fix: str | None = None) -> list[Path]:
    """Check ``graph`` and its external-data files against the sizes and sha256s its export.json records.

    Returns the files checked. ``fix`` replaces the advice of the error (e.g. for the export cache:
    delete the folder). Raises GraphMismatchError for a file that is missing, of another size or of
    another sha256.
    """
    graph = Path(graph)
    fix = fix or "export it again with `igengine export` (or omit `onnx` to use the export cache)"
    data = external_files(graph)
    for f in data:
        if not f.is_file():
            raise GraphMismatchError(f"{graph} keeps its weights in {f}, which is missing; {fix}")
    sidecar = graph.parent / SIDECAR
    try:
        exported = json.loads(sidecar.read_text())
    except FileNotFoundError:
        _unchecked(graph, f"there is no {SIDECAR} beside it")
        return []
    except (OSError, ValueError) as e:
        raise GraphMismatchError(f"{sidecar} cannot be read ({e}), so the weights of {graph} cannot be checked; {fix}") from None
    recorded = exported.get("files") if isinstance(exported, dict) else None
    if not isinstance(recorded, dict):
        _unchecked(graph, f"its {SIDECAR} records no file digests")
        return []
    record = exported.get("record") if isinstance(exported.get("record"), dict) else {}
    source = f"checkpoint sha256 {str(record.get('checkpoint_sha256', '?'))[:16]}..."
    ckpt_path = (exported.get("checkpoint") or {}).get("path") if isinstance(exported.get("checkpoint"), dict) else None
    if ckpt_path:
        source += f" ({ckpt_path})"
    checked, missing = [], []
    for f in [graph, *data]:
        want = recorded.get(f.name)
        if not isinstance(want, dict) or "sha256" not in want or "bytes" not in want:
            missing.append(f.name)
            continue
        size = f.stat().st_size
        what = "graph" if f == graph else "weights file"
        if size != want["bytes"]:
            raise GraphMismatchError(
                f"{what} {f} is {size} bytes but {sidecar} records {want['bytes']} for the export of {source}: "
                f"it was replaced or changed after the export; {fix}"
            )
        sha = known_sha256(f, memo_dir)
        if sha != want["sha256"]:
            raise GraphMismatchError(
                f"{what} {f} has sha256 {sha[:16]}... but {sidecar} records {str(want['sha256'])[:16]}... for the "
                f"export of {source}: it was replaced or changed after the export; {fix}"
            )
        checked.append(f)
    if missing:
        _unchecked(graph, f"its {SIDECAR} records no digest for {', '.join(missing)}")
    return checked


__all__ = ["known_sha256", "verify_graph_files"]
