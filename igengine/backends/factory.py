"""``create_backend``: one place that turns a backend name and a loaded checkpoint into a Backend.

  torch        the PyTorch model in eager mode (``TorchBackend``).
  onnxruntime  an exported graph on ONNX Runtime (``OnnxRuntimeBackend``).
  tensorrt     a TensorRT engine built from an exported graph (``TensorRTBackend``; CUDA only).
  compiled     the PyTorch model through torch.compile / Inductor, one static-shape graph per row
               count in ``row_counts`` (``CompiledBackend``; compiles on first use, cached under
               $IGENGINE_CACHE/inductor).

Graphs: ``onnx_path`` (a .onnx file or an export folder, ``igengine sample --onnx``) is used when
given and refused if it was exported for another checkpoint, architecture or precision; otherwise
the export cache supplies one (exported on first use, see ``igengine.export.cache``). TensorRT
engines come from beside the graph or from the engine cache, and are built on first use.

ONNX Runtime and TensorRT are imported only when their backend is asked for, and are checked
before any graph is exported, so a missing runtime fails at once with a line naming what to install.
"""

from __future__ import annotations

from pathlib import Path

import torch

from igengine.backends.errors import BackendError
from igengine.backends.torch_backend import TorchBackend
from igengine.checkpoint import LoadedCheckpoint
from igengine.config import Precision

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt", "compiled")


def create_backend(
    name: str,
    loaded: LoadedCheckpoint,
    precision: Precision | str,
    device: str | torch.device,
    onnx_path: str | Path | None = None,
    max_batch: int | None = None,
    cache_root: Path | None = None,
    row_counts: tuple[int, ...] | None = None,
):
    """Build the backend ``name`` for ``loaded`` at ``precision`` on ``device``.

    max_batch: most rows per network call (the sampler splits larger calls). torch: None means
    unbounded; onnxruntime: default the graph's recorded --max-batch; tensorrt: the engine's
    profile maximum, default the graph's recorded --max-batch.
    Raises BackendError for an unknown name, BackendUnavailable for a missing runtime or GPU,
    GraphMismatchError for a graph made for something else.
    compiled: ``row_counts`` are the row counts the run feeds, e.g. (N, 2N) (default: (max_batch,));
    ``cache_root`` replaces $IGENGINE_CACHE as the root of its Inductor cache.
    """
    precision = Precision(precision)
    if name in ("torch", "compiled") and onnx_path is not None:
        raise BackendError("--onnx only applies to --backend onnxruntime or tensorrt")
    if name == "torch":
        return TorchBackend(loaded.model, precision=precision, device=device, max_batch=max_batch)
    if name == "compiled":
        from igengine.backends.compiled import CompiledBackend, inductor_cache_dir

        counts = row_counts or ((max_batch,) if max_batch else None)
        if not counts:
            raise BackendError("the compiled backend needs the row counts it will be fed (row_counts, e.g. (N, 2N)) "
                               "or a max_batch")
        cache_dir = inductor_cache_dir(torch.device(device), cache_root) if cache_root is not None else None
        return CompiledBackend(loaded.model, row_counts=tuple(counts), precision=precision, device=device,
                               max_batch=max_batch, cache_dir=cache_dir)
    if name not in BACKENDS:
        raise BackendError(f"unknown --backend {name!r} (available: {', '.join(BACKENDS)})")

    from igengine.export.cache import locate_graph

    if name == "onnxruntime":
        from igengine.backends.onnxruntime_backend import OnnxRuntimeBackend, import_onnxruntime

        import_onnxruntime()
        graph, record = locate_graph(loaded, precision, onnx_path, cache_root)
        return OnnxRuntimeBackend(graph, record, loaded.config, device, max_batch=max_batch)

    from igengine.backends.tensorrt_backend import TensorRTBackend
    from igengine.export.tensorrt import ensure_engine, import_tensorrt, require_gpu

    import_tensorrt()
    require_gpu(device)
    graph, record = locate_graph(loaded, precision, onnx_path, cache_root)
    engine, key = ensure_engine(graph, record, loaded.config.latent_shape, device, max_batch=max_batch, root=cache_root)
    return TensorRTBackend(engine, key, record, loaded.config, device)
