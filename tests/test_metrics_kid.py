"""KID (igengine.metrics.kid): the unbiased MMD^2 with the cubic kernel, and its mean/std over subsets.

Checked against things written here independently of the module:
  - a naive double loop in plain Python floats (float64) over tiny sets, for the kernel, the unbiased
    estimator (within-set sums without the diagonal, cross sum over every pair) and the subset
    procedure (numpy RandomState(seed); per subset the samples' indices, then the reference's);
  - the closed form of the population MMD^2 of N(0, I) against N(s, I) under this kernel;
  - unbiasedness itself: over many independent pairs of sets from one distribution the estimates
    average to 0 (and can be negative), where the biased estimate (diagonal kept) clearly does not.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from igengine.metrics.kid import (SEED, SUBSET_SIZE, SUBSETS, kernel_inception_distance, mmd2_unbiased,
                                  polynomial_kernel)


def naive_k(a, b) -> float:
    d = len(a)
    return (sum(float(u) * float(v) for u, v in zip(a, b)) / d + 1.0) ** 3


def naive_mmd2(xs, ys) -> float:
    """Gretton et al. (2012) MMD_u^2, written out as loops over pairs."""
    m, n = len(xs), len(ys)
    within_x = sum(naive_k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(naive_k(ys[i], ys[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(naive_k(x, y) for x in xs for y in ys) / (m * n)
    return within_x + within_y - 2.0 * cross


def test_defaults_are_torch_fidelitys():
    assert (SUBSETS, SUBSET_SIZE, SEED) == (100, 1000, 2020)


def test_kernel_is_the_cubic_polynomial_of_the_scaled_dot_product():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    got = polynomial_kernel(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    want = np.array([[naive_k(a, b) for b in y] for a in x])
    np.testing.assert_allclose(got, want, rtol=1e-14)


@pytest.mark.parametrize("m,n", [(2, 2), (5, 7), (6, 3)])
def test_unbiased_mmd2_equals_the_naive_double_loop_on_a_shifted_gaussian(m, n):
    rng = np.random.default_rng(m * 10 + n)
    x = rng.standard_normal((m, 3))
    y = rng.standard_normal((n, 3)) + np.array([0.7, -0.2, 0.4])  # shifted
    got = mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(naive_mmd2(x, y), rel=1e-12, abs=1e-12)
    # float32 input is computed in float64 too: same number from the same (rounded) values
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    assert mmd2_unbiased(torch.from_numpy(x32), torch.from_numpy(y32)) == pytest.approx(
        naive_mmd2(x32, y32), rel=1e-12, abs=1e-12)


def test_subsets_are_drawn_as_torch_fidelity_draws_them_and_averaged_with_population_std():
    rng = np.random.default_rng(3)
    smp, ref = rng.standard_normal((9, 3)), rng.standard_normal((7, 3)) * 1.3 + 0.2
    res = kernel_inception_distance(smp, ref, subsets=5, subset_size=4, seed=11)
    draw = np.random.RandomState(11)
    want = []
    for _ in range(5):
        i = draw.choice(9, 4, replace=False)
        j = draw.choice(7, 4, replace=False)
        want.append(naive_mmd2(smp[i], ref[j]))
    np.testing.assert_allclose(res.values, want, rtol=1e-12, atol=1e-12)
    assert res.mean == pytest.approx(statistics.fmean(want), rel=1e-12)
    assert res.std == pytest.approx(statistics.pstdev(want), rel=1e-9)
    assert (res.subsets, res.subset_size, res.seed) == (5, 4, 11)
    assert len(set(np.round(want, 12))) == 5  # the subsets differ: not one value repeated


def test_seeded_reproducible_and_the_seed_matters():
    rng = np.random.default_rng(4)
    smp, ref = rng.standard_normal((30, 6)).astype(np.float32), rng.standard_normal((25, 6)).astype(np.float32)
    a = kernel_inception_distance(smp, ref, subsets=10, subset_size=10)
    b = kernel_inception_distance(torch.from_numpy(smp), torch.from_numpy(ref), subsets=10, subset_size=10,
                                  device="cpu")
    c = kernel_inception_distance(smp, ref, subsets=10, subset_size=10, seed=SEED + 1)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.seed == SEED and not np.array_equal(a.values, c.values)


def test_subset_size_is_clipped_to_the_smaller_set():
    rng = np.random.default_rng(5)
    smp, ref = rng.standard_normal((8, 3)), rng.standard_normal((6, 3)) + 0.5
    res = kernel_inception_distance(smp, ref, subsets=4, subset_size=1000, seed=2)
    assert res.subset_size == 6
    draw = np.random.RandomState(2)
    for value in res.values:
        i, j = draw.choice(8, 6, replace=False), draw.choice(6, 6, replace=False)
        assert value == pytest.approx(naive_mmd2(smp[i], ref[j]), rel=1e-12)
    # the reference side is taken whole every time (a permutation): only the samples' subset varies
    full = kernel_inception_distance(smp[:6], ref, subsets=3, subset_size=1000)
    assert full.std == pytest.approx(0.0, abs=1e-12)
    assert full.mean == pytest.approx(naive_mmd2(smp[:6], ref), rel=1e-12)


def test_too_few_rows_or_mismatched_widths_are_refused():
    with pytest.raises(ValueError, match="at least 2 rows"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\[N, d\] and \[M, d\]"):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_unbiased_under_the_null_and_can_be_negative():
    """Independent pairs of sets of one distribution: the estimates average to 0 (within 4 standard
    errors), about half are negative; the biased estimate (diagonal kept) sits far above 0."""
    rng = np.random.default_rng(6)
    unbiased, biased = [], []
    for _ in range(200):
        x, y = rng.standard_normal((40, 4)), rng.standard_normal((40, 4))
        unbiased.append(mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)))
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        biased.append(float(polynomial_kernel(tx, tx).mean() + polynomial_kernel(ty, ty).mean()
                            - 2 * polynomial_kernel(tx, ty).mean()))
    u, b = np.array(unbiased), np.array(biased)
    sem = u.std() / math.sqrt(len(u))
    assert abs(u.mean()) < 4 * sem
    assert 0.2 < (u < 0).mean() < 0.8
    assert b.mean() > 10 * sem + abs(u.mean())  # the test would tell the biased estimator apart


def test_shifted_gaussian_matches_the_closed_form_population_mmd():
    """k(x, y) = sum_j C(3, j) d^-j <x^(x)j, y^(x)j>, so MMD^2 = sum_j C(3, j) d^-j |E x^(x)j - E y^(x)j|^2.
    For x ~ N(0, I_d), y ~ N(s, I_d), with r = |s|^2:
      j = 1: r;  j = 2: |s s^T|^2 = r^2;
      j = 3: |s^(x)3 + (s_a d_bc + s_b d_ac + s_c d_ab)|^2 = r^3 + 6 r^2 + 3 (d + 2) r.
    """
    d = 4
    s = np.array([0.6, -0.5, 0.4, 0.48])
    r = float(s @ s)
    want = 3 / d * r + 3 / d**2 * r**2 + (r**3 + 6 * r**2 + 3 * (d + 2) * r) / d**3
    rng = np.random.default_rng(7)
    values = np.array([mmd2_unbiased(torch.from_numpy(rng.standard_normal((800, d))),
                                     torch.from_numpy(rng.standard_normal((800, d)) + s)) for _ in range(40)])
    sem = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - want) < 4 * sem
    assert sem < 0.03 * want  # tight enough that a wrong constant (e.g. 1/d^2 for 1/d) would fail
