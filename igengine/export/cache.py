"""The export cache: graphs (and TensorRT engines) made on demand, keyed so that none is reused wrongly.

Root: ``$IGENGINE_CACHE`` if set, else ``$XDG_CACHE_HOME/igengine``, else ``~/.cache/igengine``.
  onnx/<model>-<precision>-<key>/   an export folder (model.onnx, model.onnx.data, export.json)
  tensorrt/                         engines and timing caches (``igengine.export.tensorrt``)
  verified/                         sha256 memos of graph files, keyed by their stat (``igengine.export.integrity``)
The ONNX key is a sha256 over the checkpoint's sha256, its architecture, the ExportConfig, the
graph contract and the exporter (torch / onnxscript versions): a different checkpoint, config,
precision, opset or exporter gives a different folder. A graph found there is still checked
against the run (``contract.verify_record``) before use.

An export on demand takes a while (tens of seconds for a large model, more than a short run's
sampling): ``SetupLog`` lets the caller show that it is happening and keep its duration apart from
the sampling loop's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

from igengine.models.checkpoint import LoadedCheckpoint
from igengine.config import Precision, cache_root
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


@dataclass
class SetupLog:
    """What preparing a run's artifacts reports: ``log`` gets a line before and after each slow step
    (an export into the cache, a TensorRT engine build, a torch.compile), ``seconds`` how long each took
    (``{"export_s": 36.2}``, summed per kind)."""

    log: Callable[[str], None] = lambda line: None
    seconds: dict[str, float] = field(default_factory=dict)

    def took(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def step(self, announce: str, key: str, done: str) -> Iterator[None]:
        """Log ``announce``, run the block, then log "``done`` in S s" and add S to ``seconds[key]``
        (only when the block completes)."""
        self.log(announce)
        t0 = perf_counter()
        yield
        seconds = perf_counter() - t0
        self.took(key, seconds)
        self.log(f"{done} in {seconds:.1f} s")

    def exporting(self, name: str, precision: str, where: str, why: str = "this takes a while"):
        """``step`` for an export of model ``name`` at ``precision`` into ``where`` (``seconds["export_s"]``)."""
        return self.step(f"exporting {name} ({precision}) to {where}: {why}", "export_s", "exported")

    def compiling(self, what: str, where: str):
        """``step`` for a torch.compile of ``what``, its artifacts cached in ``where`` (``seconds["compile_s"]``)."""
        return self.step(f"compiling {what} with torch.compile (Inductor): a cold compile takes a while, "
                         f"later runs load it from the cache at {where}", "compile_s", "compiled")

    def timing(self) -> dict[str, float]:
        """``seconds`` rounded to milliseconds, for a manifest's "timing"."""
        return {key: round(value, 3) for key, value in self.seconds.items()}


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


def cached_graph(loaded: LoadedCheckpoint, config: ExportConfig, root: Path | None = None,
                 setup: SetupLog | None = None) -> Path:
    """The cached graph of (``loaded``, ``config``), exported now if the cache has none (not yet verified).

    An export is announced on ``setup.log`` before it starts and when it is done, and its duration
    added to ``setup.seconds["export_s"]``; a cache hit reports nothing.
    Concurrent runs may export the same key at once: each writes a private folder and renames it
    into place; the first rename wins and the others use its result.
    """
    from igengine.export.onnx import export_onnx  # needs onnx and onnxscript (checked by ``locate_graph``)

    setup = setup or SetupLog()
    folder = graph_folder(loaded, config, root)
    if not (folder / SIDECAR).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            with setup.exporting(loaded.config.name, config.precision.value, f"the ONNX cache at {folder}",
                                 "first use, this takes a while"):
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
                 root: Path | None = None, setup: SetupLog | None = None) -> tuple[Path, GraphRecord]:
    """The graph a run of ``loaded`` at ``precision`` uses, checked against the run, and its record.

    With ``onnx_path`` (a .onnx file or an export folder) that graph, refused with GraphMismatchError
    if it was exported for another checkpoint, architecture or precision; without it the cached
    export for (checkpoint, config, precision), made now if missing. Either way its files must be
    those its export.json records (``integrity.verify_graph_files``; digests remembered under
    ``<root>/verified``). An export into the cache is reported to ``setup`` (``cached_graph``).
    """
    import_onnx(exporter=onnx_path is None)
    if onnx_path is not None:
        graph, fix = graph_path(onnx_path), None
    else:
        graph = cached_graph(loaded, ExportConfig(precision=graph_precision(precision)), root, setup)
        fix = f"delete {graph.parent} so that the next run exports it again"
    record = read_record(graph)
    verify_record(record, loaded, precision, graph)
    verify_graph_files(graph, (root or cache_root()) / VERIFIED, fix)
    return graph, record
