"""The backend contract: (x, t, y) -> (v_final, v_inter), and what every backend shares.

A backend turns (x [N,C,H,W] float32, t [N] float32, y [N] int64) into (v_final, v_inter), both
[N,C,H,W] float32, on its device. It declares the ``precision`` it was built for (the sampler
refuses a mismatch) and ``max_batch``, the most rows one call accepts (None = unbounded). It knows
nothing about guidance, solvers or noise; the sampler knows nothing about how the network is run.
``network(backend)`` is the callable a sampler drives: it splits calls above ``max_batch``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from igengine.config import ModelConfig, Precision
from igengine.errors import BackendError


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ModelConfig
    device: torch.device
    precision: Precision
    max_batch: int | None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def describe(self) -> dict:
        """JSON-able facts for the manifest (backend name, device, dtype, versions)."""
        ...


def check_inputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, latent_shape: tuple[int, ...],
                 max_batch: int | None, what: str) -> int:
    """The row count N of a backend call, or BackendError naming what is wrong (``what``: 'graph', 'engine')."""
    n = x.shape[0]
    if tuple(x.shape[1:]) != tuple(latent_shape) or t.shape != (n,) or y.shape != (n,):
        raise BackendError(f"expected x [N,{','.join(map(str, latent_shape))}], t [N], y [N]; got "
                           f"x {list(x.shape)}, t {list(t.shape)}, y {list(y.shape)}")
    if max_batch is not None and n > max_batch:
        raise BackendError(f"batch of {n} rows is above the {what}'s maximum of {max_batch} "
                           f"(rebuild the {what} with a larger `max_batch`, or call it through backends.network())")
    return n


def output_pair(n: int, latent_shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh float32 output tensors ``v_final`` and ``v_inter`` of N rows on ``device``."""
    return {name: torch.empty((n, *latent_shape), dtype=torch.float32, device=device)
            for name in ("v_final", "v_inter")}


class SplitCalls:
    """A backend as a sampler's network: calls above its ``max_batch`` are split and concatenated.

    Declares the backend's ``precision`` so the sampler can check it, and whether its calls may be
    captured in a CUDA graph (``capturable``, False unless the backend says True).
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.precision = backend.precision
        self.max_batch = backend.max_batch
        self.capturable = getattr(backend, "capturable", False) is True

    @property
    def name(self) -> str | None:
        """The backend's name as it stands (a backend that replaced itself says what runs now)."""
        return getattr(self.backend, "name", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.max_batch
        if cap is None or x.shape[0] <= cap:
            return self.backend(x, t, y)
        parts = [self.backend(x[i:i + cap], t[i:i + cap], y[i:i + cap]) for i in range(0, x.shape[0], cap)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def network(backend: Backend) -> SplitCalls:
    """The callable ``(x, t, y) -> (v_final, v_inter)`` a sampler drives, for any backend."""
    return SplitCalls(backend)


__all__ = ["Backend", "SplitCalls", "check_inputs", "network", "output_pair"]
