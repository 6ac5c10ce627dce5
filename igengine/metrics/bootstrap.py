"""Paired bootstrap standard errors of FID over sample indices, for comparing runs that share their noise.

Every point of an ``igengine sweep`` samples indices 0..n-1 with the same seed, hence the same
initial noise, SDE noise and labels (the noise contract). Their FIDs are therefore correlated, and
the noise in a *difference* of two FIDs is much smaller than the noise in either FID. A paired
bootstrap keeps that pairing: resample b draws n indices with replacement, ONCE, and every point's
FID is recomputed on the rows of its features at those same indices. The reference statistics are
held fixed (the reference does not change between points, so it adds no noise to a difference).

    SE(FID_p)            = std_b FID_p(b)                   (ddof 1)
    SE(FID_p - FID_best) = std_b (FID_p(b) - FID_best(b))   (ddof 1)

Cost: per resample and point, one covariance of the resampled features and one symmetric
eigendecomposition of a d x d matrix (d = 2048 for Inception pool_3: about 1-3 s on a few CPU
cores); the reference's square root is computed once. Hence a small default number of resamples
(``DEFAULT_RESAMPLES``): enough to tell a difference of 2 standard errors from one of 0.2, not to
pin the standard error itself to better than ~+-15 % (the relative error of a standard deviation
estimated from B draws is about 1 / sqrt(2 (B - 1))).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from igengine.metrics.errors import MetricsError

DEFAULT_RESAMPLES = 20
DEFAULT_SEED = 0
METHOD = ("paired bootstrap over sample indices: each resample draws n indices with replacement once and "
          "recomputes every point's FID on the same indices (reference statistics fixed); SE = std over "
          "resamples (ddof 1), for each FID and each difference from the best point")


def _rounding_floor(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues at or below d * eps * max (rounding noise of a rank-deficient covariance) set to 0,
    as ``igengine.metrics.fid`` does."""
    top = float(eigenvalues.max(initial=0.0))
    tol = top * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


class FixedReferenceFID:
    """FID of feature sets against one fixed reference N(mu_r, sigma_r): sigma_r^(1/2) computed once,
    then one ``eigvalsh`` per set (the same maths as ``igengine.metrics.fid.frechet_distance``)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        sigma = np.asarray(sigma, dtype=np.float64)
        d = self.mu.shape[0]
        if sigma.shape != (d, d):
            raise MetricsError(f"reference statistics do not match: mean {self.mu.shape}, covariance {sigma.shape}")
        sigma = (sigma + sigma.T) * 0.5
        w, v = np.linalg.eigh(sigma)
        self.root = (v * np.sqrt(_rounding_floor(w))) @ v.T
        self.trace = float(np.trace(sigma))

    def of_moments(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        m = self.root @ sigma @ self.root
        m = (m + m.T) * 0.5
        diff = mu - self.mu
        tr_sqrt = float(np.sqrt(_rounding_floor(np.linalg.eigvalsh(m))).sum())
        return float(diff @ diff + self.trace + np.trace(sigma) - 2.0 * tr_sqrt)

    def of_features(self, features: np.ndarray) -> float:
        """FID of the rows ``features`` [n, d] (mean, covariance with ddof 1, in float64)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mu.shape[0] or x.shape[0] < 2:
            raise MetricsError(f"features of shape {x.shape} do not match reference statistics of width "
                               f"{self.mu.shape[0]} (or have fewer than 2 rows)")
        return self.of_moments(x.mean(0), np.cov(x, rowvar=False, ddof=1))


@dataclass(frozen=True)
class PairedErrors:
    """Result of ``paired_bootstrap`` for P feature sets (points)."""

    fid: list[float]  # FID of each point's full features [P]
    se: list[float]  # bootstrap standard error of each FID [P]
    best: int  # index of the smallest FID
    diff: list[float]  # FID_p - FID_best [P] (0 for the best)
    diff_se: list[float]  # paired standard error of each difference [P] (0 for the best)
    resamples: int
    seed: int

    def within_noise(self, p: int, k: float = 2.0) -> bool:
        """|FID_p - FID_best| < k standard errors of the difference (the best itself: True)."""
        return p == self.best or abs(self.diff[p]) < k * self.diff_se[p]

    def to_dict(self) -> dict:
        return {"method": METHOD, "resamples": self.resamples, "seed": self.seed, "best": self.best,
                "fid": self.fid, "se": self.se, "diff_from_best": self.diff, "diff_se": self.diff_se}


def paired_bootstrap(features: list[np.ndarray], ref_mu: np.ndarray, ref_sigma: np.ndarray,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> PairedErrors:
    """Paired bootstrap of FID over sample indices (module docstring).

    ``features``: one [n, d] array per point, row i the features of sample index i at that point
    (the same n for all). ``ref_mu`` [d], ``ref_sigma`` [d, d]: the reference's statistics.
    """
    if not features:
        raise MetricsError("no feature sets to bootstrap")
    n = features[0].shape[0]
    if any(f.shape[0] != n for f in features):
        raise MetricsError(f"the points' feature sets have different numbers of rows {[f.shape[0] for f in features]}: "
                           "a paired bootstrap needs the same sample indices at every point")
    if resamples < 2:
        raise MetricsError(f"a bootstrap standard error needs at least 2 resamples, got {resamples}")
    fd = FixedReferenceFID(ref_mu, ref_sigma)
    full = np.array([fd.of_features(f) for f in features])
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, len(features)))
    for b in range(resamples):
        idx = rng.integers(0, n, n)  # the same indices for every point: the pairing
        draws[b] = [fd.of_features(f[idx]) for f in features]
    best = int(np.argmin(full))
    diffs = draws - draws[:, [best]]
    return PairedErrors(fid=full.tolist(), se=draws.std(0, ddof=1).tolist(), best=best,
                        diff=(full - full[best]).tolist(), diff_se=diffs.std(0, ddof=1).tolist(),
                        resamples=resamples, seed=seed)


__all__ = ["DEFAULT_RESAMPLES", "METHOD", "FixedReferenceFID", "PairedErrors", "paired_bootstrap"]
