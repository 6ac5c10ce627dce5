"""Frechet distance between two Gaussians, in float64, with a symmetric-eigendecomposition square root.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

(Dowson & Landau 1982; FID = FD of Inception pool_3 statistics, Heusel et al. 2017, eq. 6.)

Only the trace of the square root is needed. For symmetric positive semi-definite S1 and S2, S1 S2
has the same eigenvalues as the symmetric matrix M = S1^(1/2) S2 S1^(1/2) (AB and BA share their
non-zero eigenvalues), all real and >= 0, so

    tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(M)),   S1^(1/2) = V diag(sqrt(max(w, 0))) V^T  (S1 = V diag(w) V^T)

Two ``numpy.linalg.eigh`` / ``eigvalsh`` calls (LAPACK syevd) on symmetric matrices: no
``scipy.linalg.sqrtm`` (whose blocked Schur algorithm has regressed on near-singular covariances in
some scipy releases, returning large errors or complex values), no complex arithmetic, no
``eps * I`` retry. Eigenvalues at or below the rounding level (d * eps * the largest), which is
what the zero eigenvalues of a rank-deficient covariance (fewer samples than 2048 features) come
out as, count as 0.
"""

from __future__ import annotations

import numpy as np

from igengine.metrics.errors import MetricsError

SQRTM_METHOD = ("tr sqrt(S1 S2) = sum sqrt(eigvalsh(S1^1/2 S2 S1^1/2)), S1^1/2 from eigh(S1); float64; "
                "eigenvalues below d*eps*max (rounding) count as 0; no scipy.linalg.sqrtm")


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) * 0.5


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices [d, d], in float64."""
    s1 = _sym(np.asarray(sigma1, dtype=np.float64))
    s2 = _sym(np.asarray(sigma2, dtype=np.float64))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(_drop_rounding(w))) @ v.T  # S1^(1/2), symmetric
    m = _sym(root1 @ s2 @ root1)
    return float(np.sqrt(_drop_rounding(np.linalg.eigvalsh(m))).sum())


def _drop_rounding(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues at or below the rounding level of the largest (d * eps * max) set to 0.

    A rank-deficient covariance (fewer rows than features) has exact zero eigenvalues that come out
    as +-1e-16-ish noise; their square roots (1e-8 each, hundreds of them) would otherwise bias the
    trace. Genuine eigenvalues that small are indistinguishable from that noise anyway.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    top = float(lam.max(initial=0.0))
    tol = top * lam.shape[0] * np.finfo(np.float64).eps
    return np.where(lam > tol, lam, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2); means [d], covariances [d, d]."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricsError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances "
                           f"{sigma1.shape} and {sigma2.shape}")
    for a in (mu1, mu2, sigma1, sigma2):
        if not np.isfinite(a).all():
            raise MetricsError("statistics hold NaN or infinite values")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


__all__ = ["SQRTM_METHOD", "frechet_distance", "trace_sqrt_product"]
