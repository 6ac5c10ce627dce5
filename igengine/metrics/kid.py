"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3 and appendix).

KID is the squared maximum mean discrepancy between the pool_3 features of two image sets, with the
cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3        (d = feature width: 2048 for pool_3)

estimated without bias (Gretton et al. 2012, JMLR, Lemma 6, eq. 3) from X = {x_1..x_m}, Y = {y_1..y_n}:

    MMD_u^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(m n) sum_{i, j} k(x_i, y_j)

The within-set sums leave out the diagonal (k(x, x)), the cross sum keeps every pair: each term is
then an unbiased estimate of its expectation, so the estimate can be negative when the sets come
from one distribution. As torch-fidelity (``kernel_inception_distance_mean`` / ``_std``) and
clean-fid, the estimate is taken on ``subsets`` pairs of random subsets of ``subset_size`` rows
each (drawn without replacement, independently per subset), and KID is the mean over subsets with
the population standard deviation (ddof 0) beside it. Defaults are torch-fidelity's: 100 subsets
of 1,000, seed 2020, and the subsets are drawn the way it draws them (``numpy.random.RandomState
(seed)``; per subset ``choice(len(samples), size, replace=False)`` then the same for the reference),
so that the same features in the same order give the same subsets. Unlike torch-fidelity (which
refuses), a subset size larger than a set is clipped to the smaller set's size, as clean-fid does.

Kernel sums are computed in float64 (on the features' device), one subset at a time: the whole sets
are never converted. The subsets' indices come from numpy on the host, so they do not depend on the
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 2020
DEGREE = 3
COEF0 = 1.0
KERNEL = "k(x, y) = (x.y / d + 1)^3"


@dataclass(frozen=True)
class KIDResult:
    """KID over subsets: ``mean`` and ``std`` (ddof 0) of the per-subset estimates ``values``."""

    mean: float
    std: float
    values: np.ndarray  # float64 [subsets]
    subsets: int
    subset_size: int
    seed: int

    def describe(self) -> dict:
        return {"subsets": self.subsets, "subset_size": self.subset_size, "seed": self.seed, "kernel": KERNEL,
                "estimator": "unbiased MMD^2 (diagonal left out of the within-set sums), mean and std (ddof 0) "
                             "over subsets"}


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for rows x [m, d], y [n, d]; [m, n] in their dtype."""
    d = x.shape[1]
    return (x @ y.T / d + COEF0) ** DEGREE


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of rows x [m, d] and y [n, d] (m, n >= 2) with the cubic kernel, in float64."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 rows per set, got {m} and {n}")
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    cross = polynomial_kernel(x, y).sum() / (m * n)
    return float(within_x + within_y - 2.0 * cross)


def kernel_inception_distance(samples: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, *,
                              subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE, seed: int = SEED,
                              device: torch.device | str | None = None) -> KIDResult:
    """KID of sample features [N, d] against reference features [M, d] (mean and std over subsets).

    ``subset_size`` is clipped to min(N, M); it must come out >= 2. ``device``: where the kernel sums
    run (default: the samples' device, the CPU for numpy input).
    """
    smp, ref = torch.as_tensor(samples), torch.as_tensor(reference)
    if smp.dim() != 2 or ref.dim() != 2 or smp.shape[1] != ref.shape[1]:
        raise ValueError(f"KID needs features [N, d] and [M, d], got {tuple(smp.shape)} and {tuple(ref.shape)}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    n_smp, n_ref = smp.shape[0], ref.shape[0]
    size = min(int(subset_size), n_smp, n_ref)
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 rows; the sets have {n_smp} and {n_ref} rows and the "
                         f"subset size is {subset_size}")
    device = torch.device(device) if device is not None else smp.device
    # The sets stay in their dtype (50,000 x 2048 float32 is 410 MB; float64 would double it): only
    # each subset is converted, in mmd2_unbiased.
    smp, ref = smp.to(device), ref.to(device)
    rng = np.random.RandomState(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        i = torch.from_numpy(rng.choice(n_smp, size, replace=False)).to(device)
        j = torch.from_numpy(rng.choice(n_ref, size, replace=False)).to(device)
        values[s] = mmd2_unbiased(smp[i], ref[j])
    return KIDResult(mean=float(values.mean()), std=float(values.std()), values=values, subsets=int(subsets),
                     subset_size=size, seed=int(seed))


__all__ = ["COEF0", "DEGREE", "KERNEL", "KIDResult", "SEED", "SUBSETS", "SUBSET_SIZE", "kernel_inception_distance",
           "mmd2_unbiased", "polynomial_kernel"]
