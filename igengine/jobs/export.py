"""`igengine export` as a library call: check the request, load the checkpoint, export, build the engine.

The CLI (``igengine.cli``) only parses flags into an ``ExportJob`` and calls ``run_export``.
Cheap checks come first (format, precision, opset, max batch, TensorRT and GPU presence), so a bad
request fails before a large checkpoint is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igengine.models.checkpoint import load_checkpoint
from igengine.export.config import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportConfig, ExportFormat
from igengine.export.cache import SetupLog
from igengine.export.contract import import_onnx
from igengine.errors import ExportError


@dataclass(frozen=True)
class ExportJob:
    """Everything `igengine export` was asked for. None means: the checkpoint's own value."""

    out: Path
    ckpt: Path | None = None  # None: the embedded digits model, as `igengine sample` takes
    model: str | None = None
    encoder_depth: int | None = None
    num_heads: int | None = None
    format: str = ExportFormat.ONNX.value
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    max_batch: int = DEFAULT_MAX_BATCH
    overwrite: bool = False


def run_export(job: ExportJob, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export ``job.ckpt`` into ``job.out``; returns a JSON-able summary (files, sizes, digests, timings).

    ``log`` gets a line when the export starts (once ``out`` is known to take it, so that a refusal
    stays the only line) and one saying how long it took.
    """
    log = log or (lambda line: None)
    try:
        fmt = ExportFormat(job.format)
    except ValueError:
        raise ExportError(f"unknown `format` {job.format!r}; choose from {', '.join(f.value for f in ExportFormat)}") from None
    config = ExportConfig(precision=job.precision, opset=job.opset, max_batch=job.max_batch)
    if fmt == ExportFormat.TENSORRT:
        from igengine.export.tensorrt import import_tensorrt, require_gpu

        import_tensorrt()
        require_gpu()

    import_onnx(exporter=True)
    from igengine.export.onnx import export_onnx, make_record, prepare_export_folder

    overrides = {"encoder_depth": job.encoder_depth, "num_heads": job.num_heads}
    from igengine.jobs.sample import DEFAULT_CHECKPOINT

    ckpt = Path(job.ckpt) if job.ckpt is not None else DEFAULT_CHECKPOINT
    loaded = load_checkpoint(ckpt, model_name=job.model, overrides=overrides)
    prepare_export_folder(Path(job.out), make_record(loaded, config), job.overwrite)  # refusals before the line
    setup = SetupLog(log)
    with setup.exporting(loaded.config.name, config.precision.value, str(job.out)):
        result = export_onnx(loaded, config, job.out, overwrite=job.overwrite)
    summary: dict[str, Any] = {
        "out": str(result.folder),
        "graph": str(result.graph),
        "model": loaded.config.name,
        "encoder_depth": loaded.config.encoder_depth,
        "precision": config.precision.value,
        "opset": config.opset,
        "max_batch": config.max_batch,
        "graph_sha256": result.sidecar["graph_sha256"],
        "files": result.sidecar["files"],
        "export_s": round(result.seconds, 3),
        "notes": loaded.notes,
    }
    if fmt == ExportFormat.TENSORRT:
        from igengine.export.contract import read_record
        from igengine.export.tensorrt import copy_engine_to, ensure_engine

        engine, key = ensure_engine(result.graph, read_record(result.graph), loaded.config.latent_shape,
                                    max_batch=config.max_batch, setup=setup)
        summary["engine"] = str(copy_engine_to(result.folder, engine, key))
        summary["engine_key"] = key.to_dict()
        if "engine_build_s" in setup.seconds:  # absent when an engine was found in the cache
            summary["engine_build_s"] = round(setup.seconds["engine_build_s"], 3)
    return summary
