"""Building a backend with what it runs: the exported graph (found, or exported into the cache) and engine.

The backend factory (``igengine.backends.create_backend``) only constructs backends; finding or making
their artifacts is export work, done here, by the jobs that need a backend (sample, bench). Runtimes
are checked first, so a missing one fails at once, before anything is exported or built.

``EagerFallback``: the compiled backend of a sampling run (not of a benchmark, whose rows must time
what they name), falling back to the eager torch backend of the same precision when it fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from igengine.backends import Artifacts, BackendName, create_backend, network
from igengine.backends.factory import backend_name
from igengine.config import Precision, SamplerConfig
from igengine.errors import NetworkReplaced, interruption
from igengine.models.checkpoint import LoadedCheckpoint
from igengine.sampling import Fallback, ModelFacts, Sampler, build_plan
from igengine.sampling.randomness import Randomness
from igengine.sampling.sampler import is_runtime_failure, one_line

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


class EagerFallback:
    """A compiled backend that, when it fails, hands over to the eager torch backend of the same precision.

    The compiled backend compiles at its first call (every row count at once) and may recompile
    later; a failure there, or of a compiled kernel (``sampling.sampler.is_runtime_failure``: not a
    bad input, not running out of memory, not an interrupt), builds ``TorchBackend`` on the same
    model (already cast to the precision and on the device; the two run the same maths) and raises
    ``NetworkReplaced``, so that the Sampler computes the batch in flight again, from its start,
    on the eager backend, which every later call uses. The compiled backend's other attributes
    (``recompiles``, ...) are reachable as before. With a ``setup`` log, the compile (``warmup``, or
    the first call) is announced there before it starts and timed (``SetupLog.compiling``).
    """

    capturable = False  # the Sampler decides its loops once; the compiled backend is not captured

    def __init__(self, compiled, setup: SetupLog | None = None):
        self.compiled = compiled
        self.eager = None
        self.cause: str | None = None
        self.setup = setup

    def __getattr__(self, name: str):
        if name in ("compiled", "eager", "cause", "setup"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.compiled, name)

    def _compiling(self):
        """The compile (the warm-up), announced and timed on ``setup`` (``SetupLog.compiling``) when there is one."""
        c = self.compiled
        if self.setup is None or c.warm:
            return contextlib.nullcontext()
        rows = " and ".join(map(str, c.row_counts))
        what = f"{c.config.name} ({c.precision.value}, {rows} rows per call, on {c.device})"
        return self.setup.compiling(what, c.cache_dir if c.use_cache else "(no cache: use_cache off)")

    def warmup(self) -> dict[int, float]:
        """The compiled backend's ``warmup``, announced on ``setup``."""
        with self._compiling():
            return self.compiled.warmup()

    @property
    def name(self) -> str:
        return self.compiled.name if self.eager is None else self.eager.name

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eager is not None:
            return self.eager(x, t, y)
        try:
            with self._compiling():  # the first call compiles, unless ``warmup`` ran
                return self.compiled(x, t, y)
        except Exception as e:  # noqa: BLE001 - Dynamo's and Inductor's errors have many types
            if (stop := interruption(e)) is not None:  # a stop that a library wrapped is still a stop
                raise stop from None
            if not is_runtime_failure(e):
                raise
            from igengine.backends.torch_backend import TorchBackend

            c = self.compiled
            self.eager = TorchBackend(c.model, precision=c.precision, device=c.device, max_batch=c.max_batch)
            self.cause = one_line(e)
            raise NetworkReplaced(c.name, self.eager.name, self.cause, "`backend` torch") from e

    def describe(self) -> dict:
        if self.eager is None:
            return self.compiled.describe()
        return {**self.eager.describe(), "replaced": {"backend": self.compiled.name, "cause": self.cause,
                                                      "facts": self.compiled.describe()}}


def with_eager_fallback(backend, setup: SetupLog | None = None):
    """``backend`` wrapped in ``EagerFallback`` when it is the compiled backend; any other as it is.
    setup: where its compile is announced and timed (``SetupLog.compiling``); None: silently."""
    return EagerFallback(backend, setup) if getattr(backend, "name", None) == BackendName.COMPILED.value else backend


def sampler_for(backend, sampler: SamplerConfig, kernels: str = "auto", randomness: Randomness | None = None,
                device: str | torch.device | None = None, capture: str = "auto",
                on_fallback: Callable[[Fallback], None] | None = None) -> Sampler:
    """The Sampler of a run on ``backend``: its network, the plan of ``sampler``, the model's facts, one precision.

    ``backend`` is any backend (or a callable with ``config`` and ``device``, e.g. a test double).
    on_fallback: where the sampler reports a fall back (``Sampler``; None: a FallbackWarning).
    """
    net = network(backend) if hasattr(backend, "precision") else backend
    return Sampler(net, build_plan(backend.config.family, sampler), ModelFacts.of(backend.config), sampler.precision,
                   device if device is not None else backend.device, randomness, kernels, capture,
                   on_fallback=on_fallback)


__all__ = ["EagerFallback", "build_backend", "check_runtime", "graph_artifacts", "sampler_for", "with_eager_fallback"]
