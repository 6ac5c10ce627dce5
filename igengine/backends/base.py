"""The backend contract (DESIGN.md section 7).

A backend turns (x [N,C,H,W] float32, t [N] float32, y [N] int64) into (v_final, v_inter), both
[N,C,H,W] float32, on its device. It knows nothing about guidance, solvers or noise; the sampler
knows nothing about how the network is run. ``max_batch`` (None = unbounded) is the largest N the
backend accepts in one call: the sampler splits larger calls (a CFG step feeds 2N rows).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from igengine.config import ModelConfig


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ModelConfig
    device: torch.device
    max_batch: int | None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def describe(self) -> dict:
        """JSON-able facts for the manifest (backend name, device, dtype, versions)."""
        ...
