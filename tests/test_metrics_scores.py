"""Inception Score and precision/recall on features given directly (no network), against known answers
and against brute-force transcriptions of the ADM evaluator's definitions written here in numpy.

Tolerances: IS relative 1e-9 (float64 throughout). Precision/recall are fractions of counts: equal
exactly (the data are continuous random values, so no distance sits on a radius within rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igengine.metrics.inception_score import inception_score
from igengine.metrics.precision_recall import coverage, knn_radii, precision_recall


# ---------------------------------------------------------------- Inception Score

def adm_style_is(probs: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score on softmax outputs (transcribed from its definition)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_of_uniform_predictions_is_one():
    w = torch.zeros(10, 6, dtype=torch.float64)  # all logits 0 -> p(y|x) uniform
    pool = np.random.default_rng(0).standard_normal((40, 6))
    assert inception_score(pool, w) == pytest.approx(1.0, rel=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes, per_class = 8, 5
    w = torch.eye(classes, dtype=torch.float64) * 60.0  # logit 60 for the true class: p ~ 1 - 7e-26
    pool = np.repeat(np.eye(classes), per_class, axis=0)
    assert inception_score(pool, w) == pytest.approx(classes, rel=1e-9)


def test_inception_score_matches_adm_formula_with_splits():
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((23, 16))
    w = torch.from_numpy(rng.standard_normal((12, 16)))
    logits = pool @ w.numpy().T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for split in (5, 10, 23, 5000):
        assert inception_score(pool, w, split_size=split) == pytest.approx(adm_style_is(probs, split), rel=1e-9)
    # splits matter (else the parameter would be untested)
    assert inception_score(pool, w, split_size=5) != pytest.approx(inception_score(pool, w, split_size=23), rel=1e-3)


# ---------------------------------------------------------------- precision / recall

def brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Full float64 distance matrices and np.sort: ADM's definitions without any blocking."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
    r_smp = np.sort(sq(smp, smp), axis=1)[:, k]
    precision = (sq(smp, ref) <= r_ref[None, :]).any(1).mean()
    recall = (sq(ref, smp) <= r_smp[None, :]).any(1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((120, 10))
    smp = np.concatenate([rng.standard_normal((60, 10)) * 0.8, rng.standard_normal((40, 10)) * 2 + 1.5])
    want = brute_force_pr(ref, smp)
    got = precision_recall(torch.from_numpy(ref).float(), torch.from_numpy(smp).float())
    assert got == want
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0  # a case where both can be wrong


def test_precision_recall_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(3)
    ref, smp = (torch.from_numpy(rng.standard_normal((97, 6))).float() for _ in range(2))
    whole = precision_recall(ref, smp)
    for block in (1, 7, 500):
        assert precision_recall(ref, smp, block_elements=block) == whole


def test_knn_radius_counts_the_point_itself_as_the_zeroth_neighbour():
    x = torch.arange(10, dtype=torch.float32)[:, None]  # points 0, 1, ..., 9 on a line
    r = knn_radii(x, k=3)
    assert r[0].item() == 9.0  # third neighbour of 0 is 3: squared distance 9
    assert r[5].item() == 4.0  # neighbours of 5: 4, 6, then 3 or 7 at distance 2
    with pytest.raises(ValueError):
        knn_radii(x[:3], k=3)


def test_far_away_samples_have_zero_precision_and_reference_has_zero_recall():
    rng = np.random.default_rng(4)
    ref = torch.from_numpy(rng.standard_normal((50, 4))).float()
    far = ref + 100.0
    assert precision_recall(ref, far) == (0.0, 0.0)
    assert precision_recall(ref, ref.clone()) == (1.0, 1.0)
    half = torch.cat([ref[:25] + 1e-3, far[:25]])
    assert coverage(half, ref, knn_radii(ref)) == 0.5
