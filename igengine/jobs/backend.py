"""Building a backend with what it runs: the exported graph (found, or exported into the cache) and engine.

The backend factory (``igengine.backends.create_backend``) only constructs backends; finding or making
their artifacts is export work, done here, by the jobs that need a backend (sample, bench). Runtimes
are checked first, so a missing one fails at once, before anything is exported or built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from igengine.backends import Artifacts, BackendName, create_backend, network
from igengine.backends.factory import backend_name
from igengine.config import Precision, SamplerConfig
from igengine.models.checkpoint import LoadedCheckpoint
from igengine.sampling import ModelFacts, Sampler, build_plan
from igengine.sampling.randomness import Randomness

if TYPE_CHECKING:
    from igengine.export.cache import SetupLog


def check_runtime(name: str | BackendName, precision: Precision | str, device: str | torch.device) -> None:
    """Raise BackendUnavailable at once where backend ``name`` cannot run ``precision`` on ``device``
    here: its runtime is missing, TensorRT sees no GPU, or ONNX Runtime could only give a bf16 graph
    to its CPU provider (which has no bf16 MatMul). Nothing is exported or built."""
    kind = backend_name(name)
    if kind == BackendName.ONNXRUNTIME:
        from igengine.backends.onnxruntime_backend import cpu_bf16_refusal, cpu_provider_only, import_onnxruntime
        from igengine.errors import BackendUnavailable
        from igengine.export.config import graph_precision

        ort = import_onnxruntime()
        if graph_precision(precision) == Precision.BF16 and cpu_provider_only(ort, device):
            raise BackendUnavailable(cpu_bf16_refusal())
    elif kind == BackendName.TENSORRT:
        from igengine.export.tensorrt import import_tensorrt, require_gpu

        import_tensorrt()
        require_gpu(device)


def graph_artifacts(name: str | BackendName, loaded: LoadedCheckpoint, precision: Precision | str,
                    device: str | torch.device, onnx: str | Path | None = None,
                    max_batch: int | None = None, cache_root: Path | None = None,
                    setup: SetupLog | None = None) -> Artifacts | None:
    """The graph (and TensorRT engine) backend ``name`` runs for ``loaded`` at ``precision``; None for torch.

    onnx: a .onnx file or an `igengine export` folder (refused if made for another checkpoint,
    architecture or precision); None: the export cache (exported on first use, announced on
    ``setup.log`` and timed in ``setup.seconds``).
    """
    kind = backend_name(name)
    if not kind.needs_graph:
        return None
    from igengine.export.cache import locate_graph

    check_runtime(kind, precision, device)
    if kind == BackendName.ONNXRUNTIME:
        return Artifacts(*locate_graph(loaded, precision, onnx, cache_root, setup))
    from igengine.export.tensorrt import ensure_engine

    graph, record = locate_graph(loaded, precision, onnx, cache_root, setup)
    engine, key = ensure_engine(graph, record, loaded.config.latent_shape, device, max_batch=max_batch,
                                root=cache_root, setup=setup)
    return Artifacts(graph, record, engine, key)


def build_backend(name: str | BackendName, loaded: LoadedCheckpoint, precision: Precision | str,
                  device: str | torch.device, onnx: str | Path | None = None, max_batch: int | None = None,
                  cache_root: Path | None = None, row_counts: tuple[int, ...] | None = None,
                  setup: SetupLog | None = None):
    """The backend ``name`` for ``loaded`` at the run's ``precision`` on ``device``, with its artifacts.

    row_counts: the network row counts the run feeds (N and 2N per batch size), for backends that
    specialise to them (the compiled backend); ignored by the others. setup: where an export into
    the cache is announced and timed (``igengine.export.cache.SetupLog``); None: silently.
    """
    if onnx is not None and not backend_name(name).needs_graph:
        from igengine.errors import BackendError

        raise BackendError("`onnx` only applies to the onnxruntime and tensorrt backends")
    artifacts = graph_artifacts(name, loaded, precision, device, onnx, max_batch, cache_root, setup)
    return create_backend(name, loaded, precision, device, artifacts=artifacts, max_batch=max_batch,
                          row_counts=row_counts, cache_root=cache_root)


def sampler_for(backend, sampler: SamplerConfig, kernels: str = "auto", randomness: Randomness | None = None,
                device: str | torch.device | None = None, capture: str = "auto") -> Sampler:
    """The Sampler of a run on ``backend``: its network, the plan of ``sampler``, the model's facts, one precision.

    ``backend`` is any backend (or a callable with ``config`` and ``device``, e.g. a test double).
    """
    net = network(backend) if hasattr(backend, "precision") else backend
    return Sampler(net, build_plan(backend.config.family, sampler), ModelFacts.of(backend.config), sampler.precision,
                   device if device is not None else backend.device, randomness, kernels, capture)


__all__ = ["build_backend", "check_runtime", "graph_artifacts", "sampler_for"]
