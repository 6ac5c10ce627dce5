"""Frechet distance and feature statistics, fed with features directly (no network).

Tolerances: everything is float64. A set against itself: |FD| <= 1e-6 as the issue asks (measured
~1e-13, also for rank-deficient covariances, where the square roots of rounding noise would otherwise
add ~1e-6). Closed forms: relative 1e-9 (the moments are exact by construction; what remains is float64
rounding through eigh on matrices with condition number <= 1e3). Streamed statistics against np.cov:
relative 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from igengine.metrics.errors import MetricsError
from igengine.metrics.fid import frechet_distance, trace_sqrt_product
from igengine.metrics.stats import Moments


def rows_with_exact_moments(rng, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n rows whose sample mean is ``mean`` and sample covariance (ddof 1) is ``cov``, exactly up to rounding."""
    d = mean.shape[0]
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    # whiten: sample covariance of z becomes I
    c = np.cov(z, rowvar=False)
    w, v = np.linalg.eigh(c)
    z = z @ (v / np.sqrt(w)) @ v.T
    lw, lv = np.linalg.eigh(cov)
    root = (lv * np.sqrt(np.clip(lw, 0, None))) @ lv.T
    return z @ root + mean


def streamed_stats(x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    m = Moments(x.shape[1])
    for i in range(0, len(x), batch):
        m.update(torch.from_numpy(x[i:i + batch]))
    s = m.result()
    return s.mu, s.sigma


@pytest.mark.parametrize("n,d", [(400, 32), (60, 128), pytest.param(12, 2048, marks=pytest.mark.slow)])
def test_fid_of_a_feature_set_against_itself_is_zero(n, d):
    x = np.random.default_rng(d).standard_normal((n, d)) * 0.3 + 0.5
    mu, sigma = streamed_stats(x, batch=7)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 16
    a, b = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    x = rows_with_exact_moments(rng, 500, m1, np.diag(a))
    y = rows_with_exact_moments(rng, 300, m2, np.diag(b))
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(*streamed_stats(x, 64), *streamed_stats(y, 5))
    assert got == pytest.approx(want, rel=1e-9)


def test_fid_matches_closed_form_for_rotated_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T (dense, non-diagonal): tr sqrt(S1 S2) = sum sqrt(a b)."""
    rng = np.random.default_rng(2)
    d = 24
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.05, 3.0, d), rng.uniform(0.05, 3.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    m1, m2 = rng.standard_normal(d), np.zeros(d)
    x = rows_with_exact_moments(rng, 1000, m1, s1)
    y = rows_with_exact_moments(rng, 800, m2, s2)
    want = m1 @ m1 + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(*streamed_stats(x, 100), *streamed_stats(y, 33)) == pytest.approx(want, rel=1e-9)


def test_fid_matches_closed_form_for_non_commuting_2x2():
    """For 2x2 PSD A, B: tr sqrt(AB) = sqrt(tr(AB) + 2 sqrt(det(AB)))."""
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.3, -0.2], [-0.2, 1.5]])
    ab = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(ab) + 2 * np.sqrt(np.linalg.det(ab)))
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.5, 0.25])
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    rng = np.random.default_rng(3)
    x = rows_with_exact_moments(rng, 50, mu1, s1)
    y = rows_with_exact_moments(rng, 70, mu2, s2)
    assert frechet_distance(*streamed_stats(x, 4), *streamed_stats(y, 70)) == pytest.approx(want, rel=1e-9)
    assert trace_sqrt_product(s1, s2) == pytest.approx(tr_sqrt, rel=1e-12)


def test_trace_sqrt_matches_scipy_sqrtm_on_well_conditioned_matrices():
    rng = np.random.default_rng(4)
    d = 40
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    want = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(want, rel=1e-9)


def test_fid_is_symmetric_and_grows_with_the_mean_shift():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((200, 8)), rng.standard_normal((150, 8)) * 1.5
    sx, sy = streamed_stats(x, 200), streamed_stats(y, 150)
    assert frechet_distance(*sx, *sy) == pytest.approx(frechet_distance(*sy, *sx), rel=1e-9)
    shifted = streamed_stats(y + 3.0, 150)
    assert frechet_distance(*sx, *shifted) > frechet_distance(*sx, *sy) + 8 * 9 * 0.9


@pytest.mark.parametrize("batch", [1, 3, 64, 1000])
def test_streamed_moments_equal_numpy_mean_and_cov(batch):
    x = np.random.default_rng(6).standard_normal((257, 20)) * 4.0 + 100.0  # large mean: cancellation-prone
    mu, sigma = streamed_stats(x, batch)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_moments_need_two_rows_and_fid_rejects_mismatched_statistics():
    m = Moments(4)
    m.update(np.ones((1, 4)))
    with pytest.raises(MetricsError):
        m.result()
    with pytest.raises(MetricsError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricsError):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
