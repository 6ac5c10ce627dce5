"""Inception Score as the ADM evaluator computes it (Salimans et al. 2016, sec. 4; OpenAI improved-gan).

    p(y|x) = softmax(pool_3(x) W)   W: the graph's ``softmax/logits/MatMul`` weight [2048, 1008], NO bias
    IS     = mean over splits of exp( mean_x KL(p(y|x) || p(y)) ),   p(y) = mean of p(y|x) over the split

Splits are consecutive blocks of ``split_size`` = 5000 samples (the last one shorter; 50,000 samples
give 10 splits), and the score is the plain mean of the split scores (no standard deviation), as in
ADM's ``compute_inception_score``. Computed in float64 from log-softmax (no log of 0).
"""

from __future__ import annotations

import numpy as np
import torch

SPLIT_SIZE = 5000


def split_scores(log_probs: torch.Tensor) -> float:
    """exp(mean KL(p(y|x) || p(y))) of one split; log_probs float64 [n, classes]."""
    p = log_probs.exp()
    log_marginal = torch.logsumexp(log_probs, 0) - np.log(log_probs.shape[0])  # log mean_x p(y|x)
    kl = (p * (log_probs - log_marginal)).sum(1)
    return float(torch.exp(kl.mean()))


def inception_score(pool: np.ndarray | torch.Tensor, logits_weight: torch.Tensor,
                    split_size: int = SPLIT_SIZE) -> float:
    """IS of pool_3 features [N, 2048] with the softmax weight [classes, 2048] (pytorch-fid's fc.weight)."""
    w = logits_weight.to(torch.float64)
    pool = torch.as_tensor(pool)
    scores = []
    for start in range(0, pool.shape[0], split_size):
        part = pool[start:start + split_size].to(device=w.device, dtype=torch.float64)
        scores.append(split_scores(torch.log_softmax(part @ w.T, dim=1)))
    return float(np.mean(scores))


__all__ = ["SPLIT_SIZE", "inception_score", "split_scores"]
