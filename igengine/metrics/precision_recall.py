"""Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds, as the ADM evaluator.

Each feature set is a manifold: the union of balls around its points, the radius of a point being its
squared distance to its k-th nearest neighbour in the same set (k = 3; the point itself is the 0th,
as in ADM's ``ManifoldEstimator``, which takes entry k of the sorted row that includes the zero
self-distance). Then
    precision = fraction of samples inside the reference manifold   (d(s, r)^2 <= radius_r for some r)
    recall    = fraction of reference points inside the samples' manifold.
Distances are squared Euclidean, ``max(|u|^2 - 2 u.v + |v|^2, 0)`` (ADM's ``_batch_pairwise_distances``),
computed in float32 in row blocks so that memory stays bounded (a block of ``rows`` x N distances)
instead of ADM's 10,000 x N. ADM computes them in float16 first (float32 only if that overflows);
float32 here is more precise, so a sample lying within float16 rounding of a radius can be counted
differently: P and R can differ from ADM's in the third or fourth decimal.
"""

from __future__ import annotations

import torch

K = 3
BLOCK_ELEMENTS = 1 << 26  # distances per block (256 MB in float32)


def _rows_per_block(n_cols: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, n_cols))


def squared_distances(a: torch.Tensor, b: torch.Tensor, a_norm: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] squared distances, clamped at 0 (in place: one block of memory, not four)."""
    d = a @ b.T
    return d.mul_(-2.0).add_(a_norm[:, None]).add_(b_norm[None, :]).clamp_(min=0.0)


def knn_radii(x: torch.Tensor, k: int = K, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Squared distance of each row of x [N, D] to its k-th nearest row (itself being the 0th); [N]."""
    n = x.shape[0]
    if n < k + 1:
        raise ValueError(f"k-NN radii with k = {k} need at least {k + 1} points, got {n}")
    x = x.float()
    norm = (x * x).sum(1)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    step = _rows_per_block(n, block_elements)
    for i in range(0, n, step):
        d = squared_distances(x[i:i + step], x, norm[i:i + step], norm)
        out[i:i + step] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
             block_elements: int = BLOCK_ELEMENTS) -> float:
    """Fraction of ``points`` [P, D] inside at least one ball (centre [C, D], squared radius [C])."""
    points, centres = points.float(), centres.float()
    p_norm, c_norm = (points * points).sum(1), (centres * centres).sum(1)
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    step = _rows_per_block(centres.shape[0], block_elements)
    for i in range(0, points.shape[0], step):
        d = squared_distances(points[i:i + step], centres, p_norm[i:i + step], c_norm)
        inside[i:i + step] = (d <= radii[None, :]).any(1)
    return float(inside.double().mean())


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = K,
                     block_elements: int = BLOCK_ELEMENTS) -> tuple[float, float]:
    """(precision, recall) of sample features against reference features, both [*, D]."""
    r_ref = knn_radii(reference, k, block_elements)
    r_smp = knn_radii(samples, k, block_elements)
    precision = coverage(samples, reference, r_ref, block_elements)
    recall = coverage(reference, samples, r_smp, block_elements)
    return precision, recall


__all__ = ["K", "coverage", "knn_radii", "precision_recall", "squared_distances"]
