"""Helpers for the metrics tests: image files, and a cheap deterministic stand-in for the FID network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from igengine.metrics.inception import KnownWeights


class StandInNetwork(torch.nn.Module):
    """pixels -> 4x4 average thumbnail (48 values) -> fixed random projections (widths small by default:
    the FID of 2048-wide statistics costs seconds of eigendecomposition on 2 cores, and the plumbing
    under test does not depend on the width; the benchmark uses the real widths).

    Computed in float64 and rounded to float32, so every image's features are the same whatever
    the batch it is in (the property the streaming tests need from the real network too).
    """

    def __init__(self, seed: int = 0, pool_dim: int = 40, spatial_dim: int = 24):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(48, pool_dim, generator=g, dtype=torch.float64))
        self.register_buffer("b", torch.randn(48, spatial_dim, generator=g, dtype=torch.float64))

    def forward(self, pixels: torch.Tensor, spatial: bool = True) -> dict:
        x = F.adaptive_avg_pool2d(pixels.double() / 255.0, 4).flatten(1)  # (N, 48)
        out = {"pool": torch.relu(x @ self.a - 0.2 * self.a.sum(0) / 48).float()}
        if spatial:
            out["spatial"] = torch.tanh(x @ self.b).float()
        return out


@dataclass
class StandInLoaded:
    """Duck-types igengine.metrics.inception.LoadedInception."""

    model: torch.nn.Module
    logits_weight: torch.Tensor | None = None
    weights: KnownWeights = KnownWeights(name="stand-in", sha256="0" * 64, size=0, kind="test", has_logits=False,
                                         origin="tests/metrics_fixtures.py")
    path: Path = Path("stand-in")

    def describe(self) -> dict:
        return {"name": "stand-in (tests)", "weights": "stand-in", "sha256": self.weights.sha256,
                "logits": self.logits_weight is not None}


def stand_in(logits: bool = False, pool_dim: int = 40, spatial_dim: int = 24) -> StandInLoaded:
    w = torch.randn(16, pool_dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.05
    return StandInLoaded(model=StandInNetwork(pool_dim=pool_dim, spatial_dim=spatial_dim),
                         logits_weight=w if logits else None)


def random_images(seed: int, n: int, size: int = 16, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, size, size, 3), dtype=np.uint8)


def save_npz(path: Path, compressed: bool = False, **arrays) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def assert_one_line_exit_2(code, err, *needles):
    """A CLI refusal: exit status 2 and one `igengine: error:` line holding every needle, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("igengine: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
