"""The export cache: graphs (and TensorRT engines) made on demand, keyed so that none is reused wrongly.

Root: ``$IGENGINE_CACHE`` if set, else ``$XDG_CACHE_HOME/igengine``, else ``~/.cache/igengine``.
  onnx/<model>-<precision>-<key>/   an export folder (model.onnx, model.onnx.data, export.json)
  tensorrt/                         engines and timing caches (``igengine.export.tensorrt``)
  verified/                         sha256 memos of graph files, keyed by their stat (``igengine.export.integrity``)
The ONNX key is a sha256 over the checkpoint's sha256, its architecture, the ExportConfig, the
graph contract and the exporter (torch / onnxscript versions): a different checkpoint, config,
precision, opset or exporter gives a different folder. A graph found there is still checked
against the run (``contract.verify_record``) before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from igengine.models.checkpoint import LoadedCheckpoint
from igengine.config import Precision
from igengine.export.config import ExportConfig, graph_precision
from igengine.export.contract import (
    GRAPH_CONTRACT,
    GRAPH_FILE,
    SIDECAR,
    GraphRecord,
    architecture,
    graph_path,
    import_onnx,
    read_record,
    verify_record,
)
from igengine.export.integrity import verify_graph_files


VERIFIED = "verified"


def cache_root() -> Path:
    """Root folder of igengine's caches (see the module docstring)."""
    if os.environ.get("IGENGINE_CACHE"):
        return Path(os.environ["IGENGINE_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "igengine"


def graph_key(loaded: LoadedCheckpoint, config: ExportConfig) -> str:
    """24 hex digits identifying the graph ``export_onnx(loaded, config)`` produces."""
    from igengine.export.onnx import exporter_name

    blob = json.dumps({
        "contract": GRAPH_CONTRACT,
        "checkpoint_sha256": loaded.sha256,
        "architecture": architecture(loaded.config.to_dict()),
        "export": config.to_dict(),
        "exporter": exporter_name(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def graph_folder(loaded: LoadedCheckpoint, config: ExportConfig, root: Path | None = None) -> Path:
    """Where the cached export of (``loaded``, ``config``) lives."""
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", loaded.config.name).strip("-")
    return (root or cache_root()) / "onnx" / f"{name}-{config.precision.value}-{graph_key(loaded, config)}"


def cached_graph(loaded: LoadedCheckpoint, config: ExportConfig, root: Path | None = None) -> Path:
    """The cached graph of (``loaded``, ``config``), exported now if the cache has none (not yet verified).

    Concurrent runs may export the same key at once: each writes a private folder and renames it
    into place; the first rename wins and the others use its result.
    """
    from igengine.export.onnx import export_onnx  # needs onnx and onnxscript (checked by ``locate_graph``)

    folder = graph_folder(loaded, config, root)
    if not (folder / SIDECAR).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            export_onnx(loaded, config, tmp)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / SIDECAR).is_file():  # not a lost race: something else is in the way
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / GRAPH_FILE


def locate_graph(loaded: LoadedCheckpoint, precision: Precision | str, onnx_path: str | Path | None = None,
                 root: Path | None = None) -> tuple[Path, GraphRecord]:
    """The graph a run of ``loaded`` at ``precision`` uses, checked against the run, and its record.

    With ``onnx_path`` (a .onnx file or an export folder) that graph, refused with GraphMismatchError
    if it was exported for another checkpoint, architecture or precision; without it the cached
    export for (checkpoint, config, precision), made now if missing. Either way its files must be
    those its export.json records (``integrity.verify_graph_files``; digests remembered under
    ``<root>/verified``).
    """
    import_onnx(exporter=onnx_path is None)
    if onnx_path is not None:
        graph, fix = graph_path(onnx_path), None
    else:
        graph = cached_graph(loaded, ExportConfig(precision=graph_precision(precision)), root)
        fix = f"delete {graph.parent} so that the next run exports it again"
    record = read_record(graph)
    verify_record(record, loaded, precision, graph)
    verify_graph_files(graph, (root or cache_root()) / VERIFIED, fix)
    return graph, record
