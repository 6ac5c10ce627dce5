"""Feature statistics: streamed mean and covariance (float64), and the statistics files igengine writes.

``Moments`` accumulates batches with the pairwise (Chan et al.) update of count, mean and centred
scatter, in float64 on the features' device: the result equals ``np.mean(x, 0)`` and
``np.cov(x, rowvar=False)`` (ddof 1, as the ADM evaluator) of all rows at once, up to float64
rounding, whatever the batch size, and without keeping the rows.

Statistics file (``igengine evaluate --save-stats FILE``): an uncompressed ``.npz`` with
  ``mu`` float64 [2048], ``sigma`` float64 [2048, 2048]      pool_3 statistics (ADM's names)
  (the widths are the network's: read_stats checks that each mean fits its covariance, and the job
  that they fit the network)
  ``mu_s`` float64 [2023], ``sigma_s`` float64 [2023, 2023]  mixed_6/conv[:7] statistics (sFID)
  ``pool_features`` float32 [N, 2048]                         kept for precision/recall
  ``igengine_stats`` uint8 [bytes]                            UTF-8 JSON: format, network, n, resolution
Everything is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from igengine.metrics.errors import MetricsError
from igengine.metrics.reader import npz_members

STATS_FORMAT = "igengine-fid-stats"
STATS_VERSION = 1
META = "igengine_stats"
FEATURES = "pool_features"


class StatsFormatError(MetricsError):
    """A statistics member is missing, mis-shaped or not finite."""


class Moments:
    """Running count, mean and centred scatter of rows of width ``dim`` (float64, on ``device``)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.n = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor | np.ndarray) -> None:
        """Add rows [b, dim] (any float dtype)."""
        x = torch.as_tensor(rows).to(device=self.mean.device, dtype=torch.float64)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows [b, {self.dim}], got {tuple(x.shape)}")
        b = x.shape[0]
        if b == 0:
            return
        mean_b = x.mean(0)
        c = x - mean_b
        scatter_b = c.T @ c
        n = self.n + b
        delta = mean_b - self.mean
        self.mean += delta * (b / n)
        self.scatter += scatter_b + torch.outer(delta, delta) * (self.n * b / n)
        self.n = n

    def result(self) -> "FIDStats":
        if self.n < 2:
            raise StatsFormatError(f"a covariance needs at least 2 feature rows, got {self.n}")
        return FIDStats(mu=self.mean.cpu().numpy().copy(),
                        sigma=(self.scatter / (self.n - 1)).cpu().numpy().copy(), n=self.n)


@dataclass(frozen=True)
class FIDStats:
    """Mean [d] and covariance [d, d] (float64) of a feature set; ``n`` rows, or None when unknown."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None


def check_stats(mu, sigma, where: str) -> FIDStats:
    """Mean [d] and covariance [d, d], floating point and finite; StatsFormatError otherwise."""
    mu = np.asarray(mu)
    sigma = np.asarray(sigma)
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise StatsFormatError(f"{where}: statistics must be floating point, got {mu.dtype} and {sigma.dtype}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsFormatError(f"{where}: expected a mean [d] and a covariance [d, d], got {mu.shape} and "
                               f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsFormatError(f"{where}: statistics hold NaN or infinite values")
    return FIDStats(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))


@dataclass(frozen=True)
class StatsFile:
    """What a reference ``.npz`` holds besides images: precomputed statistics, features, igengine metadata."""

    pool: FIDStats | None
    spatial: FIDStats | None
    has_features: bool
    meta: dict | None  # igengine's metadata when igengine wrote the file


def read_stats(path: Path) -> StatsFile:
    """The statistics members of ``path`` (ADM reference batch or igengine statistics file), checked."""
    path = Path(path)
    members = npz_members(path)
    pool = spatial = meta = None
    with np.load(path, allow_pickle=False) as z:
        if "mu" in members or "sigma" in members:
            if not {"mu", "sigma"} <= members:
                raise StatsFormatError(f"{path}: has only one of 'mu' and 'sigma'; both are needed")
            pool = check_stats(z["mu"], z["sigma"], f"{path}:mu/sigma")
        if "mu_s" in members or "sigma_s" in members:
            if not {"mu_s", "sigma_s"} <= members:
                raise StatsFormatError(f"{path}: has only one of 'mu_s' and 'sigma_s'; both are needed")
            spatial = check_stats(z["mu_s"], z["sigma_s"], f"{path}:mu_s/sigma_s")
        if META in members:
            try:
                meta = json.loads(bytes(z[META]).decode())
            except (ValueError, TypeError):
                raise StatsFormatError(f"{path}: {META!r} is not igengine's JSON metadata") from None
            if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
                raise StatsFormatError(f"{path}: {META!r} is not an igengine statistics header")
            if pool is not None and meta.get("n") is not None:
                pool = FIDStats(pool.mu, pool.sigma, int(meta["n"]))
    has_features = FEATURES in members
    return StatsFile(pool=pool, spatial=spatial, has_features=has_features, meta=meta)


def read_features(path: Path) -> np.ndarray:
    """The ``pool_features`` float32 [N, 2048] of an igengine statistics file."""
    with np.load(Path(path), allow_pickle=False) as z:
        x = z[FEATURES]
    if x.ndim != 2 or x.dtype.kind != "f":
        raise StatsFormatError(f"{path}:{FEATURES} must be float [N, d], got {x.dtype} {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def write_stats(f: BinaryIO, *, pool: FIDStats, spatial: FIDStats | None, features: np.ndarray | None,
                meta: dict) -> None:
    """Write a statistics file to the binary file ``f`` (uncompressed .npz)."""
    arrays = {"mu": pool.mu, "sigma": pool.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    if features is not None:
        arrays[FEATURES] = np.ascontiguousarray(features, dtype=np.float32)
    header = {"format": STATS_FORMAT, "version": STATS_VERSION, **meta}
    arrays[META] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(f, **arrays)


__all__ = ["FEATURES", "FIDStats", "META", "Moments", "STATS_FORMAT", "StatsFile", "StatsFormatError",
           "check_stats", "read_features", "read_stats", "write_stats"]
