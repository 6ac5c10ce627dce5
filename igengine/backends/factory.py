"""``create_backend``: one place that turns a backend name and a loaded checkpoint into a Backend.

  torch        the PyTorch model in eager mode (``TorchBackend``).
  onnxruntime  an exported graph on ONNX Runtime (``OnnxRuntimeBackend``).
  tensorrt     a TensorRT engine built from an exported graph (``TensorRTBackend``; CUDA only).

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

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")


def create_backend(
    name: str,
    loaded: LoadedCheckpoint,
    precision: Precision | str,
    device: str | torch.device,
    onnx_path: str | Path | None = None,
    max_batch: int | None = None,
    cache_root: Path | None = None,
):
    """Build the backend ``name`` for ``loaded`` at ``precision`` on ``device``.

    max_batch: most rows per network call (the sampler splits larger calls). torch: None means
    unbounded; onnxruntime: default the graph's recorded --max-batch; tensorrt: the engine's
    profile maximum, default the graph's recorded --max-batch.
    Raises BackendError for an unknown name, BackendUnavailable for a missing runtime or GPU,
    GraphMismatchError for a graph made for something else.
    """
    precision = Precision(precision)
    if name == "torch":
        if onnx_path is not None:
            raise BackendError("--onnx only applies to --backend onnxruntime or tensorrt")
        return TorchBackend(loaded.model, precision=precision, device=device, max_batch=max_batch)
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
