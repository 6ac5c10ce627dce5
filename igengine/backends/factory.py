"""``create_backend``: one place that turns a backend name and a loaded checkpoint into a Backend.

  torch        the PyTorch model in eager mode (``TorchBackend``).
  onnxruntime  an exported graph on ONNX Runtime (``OnnxRuntimeBackend``).
  tensorrt     a TensorRT engine built from an exported graph (``TensorRTBackend``; CUDA only).
  compiled     the PyTorch model through torch.compile / Inductor, one static-shape graph per row
               count in ``row_counts`` (``CompiledBackend``; compiles on first use, cached under
               $IGENGINE_CACHE/inductor).

The factory runs nothing but the backend: the caller finds (or exports) the graph and builds the
engine (``igengine.export.cache.locate_graph``, ``igengine.export.tensorrt.ensure_engine``; the
sample job does both) and hands them over as ``artifacts``. ONNX Runtime and TensorRT are imported
only when their backend is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from igengine.backends.torch_backend import TorchBackend
from igengine.config import BackendName, Precision
from igengine.errors import BackendError
from igengine.models.checkpoint import LoadedCheckpoint


BACKENDS: tuple[str, ...] = tuple(b.value for b in BackendName)


@dataclass(frozen=True)
class Artifacts:
    """What a graph backend runs: the exported graph and its record, and (TensorRT) the built engine."""

    graph: Path
    record: object  # igengine.export.contract.GraphRecord
    engine: Path | None = None
    engine_key: object | None = None  # igengine.export.tensorrt.EngineKey


def backend_name(name: str | BackendName) -> BackendName:
    try:
        return BackendName(name)
    except ValueError:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})") from None


def create_backend(name: str | BackendName, loaded: LoadedCheckpoint, precision: Precision | str,
                   device: str | torch.device, artifacts: Artifacts | None = None, max_batch: int | None = None,
                   row_counts: tuple[int, ...] | None = None, cache_root: Path | None = None):
    """Build the backend ``name`` for ``loaded`` at the run's ``precision`` on ``device``.

    max_batch: most rows per network call (``backends.network`` splits larger calls). torch: None
    means unbounded; onnxruntime: default the graph's recorded max_batch; tensorrt: the engine's
    profile maximum. row_counts: the row counts a compiled backend specialises to, e.g. (N, 2N)
    (default: (max_batch,); ignored by the others); cache_root replaces $IGENGINE_CACHE as the root of
    its Inductor cache. Raises BackendError for an unknown name or missing artifacts,
    BackendUnavailable for a missing runtime or GPU.
    """
    kind = backend_name(name)
    precision = Precision(precision)
    if kind == BackendName.TORCH:
        if artifacts is not None:
            raise BackendError("an exported graph only applies to the onnxruntime and tensorrt backends")
        return TorchBackend(loaded.model, precision=precision, device=device, max_batch=max_batch)
    if kind == BackendName.COMPILED:
        if artifacts is not None:
            raise BackendError("an exported graph only applies to the onnxruntime and tensorrt backends")
        from igengine.backends.compiled import CompiledBackend, inductor_cache_dir

        counts = row_counts or ((max_batch,) if max_batch else None)
        if not counts:
            raise BackendError("the compiled backend needs the row counts it will be fed (`row_counts`, e.g. (N, 2N)) "
                               "or a `max_batch`")
        cache_dir = inductor_cache_dir(torch.device(device), cache_root) if cache_root is not None else None
        return CompiledBackend(loaded.model, row_counts=tuple(counts), precision=precision, device=device,
                               max_batch=max_batch, cache_dir=cache_dir, allow_tf32=precision == Precision.TF32)
    if artifacts is None:
        raise BackendError(f"the {kind.value} backend needs an exported graph (igengine.export.cache.locate_graph)")
    if kind == BackendName.ONNXRUNTIME:
        from igengine.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifacts.graph, artifacts.record, loaded.config, device, max_batch=max_batch,
                                  precision=precision)
    from igengine.backends.tensorrt_backend import TensorRTBackend

    if artifacts.engine is None:
        raise BackendError("the tensorrt backend needs a built engine (igengine.export.tensorrt.ensure_engine)")
    return TensorRTBackend(artifacts.engine, artifacts.engine_key, artifacts.record, loaded.config, device,
                           precision=precision)
