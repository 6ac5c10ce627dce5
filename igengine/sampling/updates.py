"""The per-element maths of one solver step, in the official order of operations.

Shapes: x, v, d, k1, k2, noise (N, C, H, W) tensors in the state dtype; t, dt Python floats.
These functions are the reference: the fused kernels (csrc/igk_math.h) reproduce them, and their
per-step scalars come from the same helpers (``sit_score_coefficients``), so each coefficient is
written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from igengine.sampling.plan import Step, StepKind


@dataclass(frozen=True)
class ScoreCoefficients:
    """The scalars of the SiT SDE drift at time t (linear path alpha = 1 - t, sigma = t).

    score(v, x) = (ratio * v - x) / var with ratio = alpha / alpha' = (1 - t) / -1 and
    var = sigma^2 - ratio * sigma' * sigma = t t - ratio 1.0 t; drift d = v - drift_t * score with
    drift_t = 0.5 g^2 = 0.5 (2 t). Each is the float64 value the official code forms in Python.
    """

    ratio: float
    var: float
    drift_t: float


def sit_score_coefficients(t: float) -> ScoreCoefficients:
    ratio = (1.0 - t) / -1.0
    return ScoreCoefficients(ratio=ratio, var=t * t - ratio * 1.0 * t, drift_t=0.5 * (2.0 * t))


def sit_drift(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """SDE drift of the SiT linear path: d = v - 0.5 g^2 score(v, x), g^2 = 2t."""
    c = sit_score_coefficients(t)
    score = (c.ratio * v - x) / c.var
    return v - c.drift_t * score


def sde_noise_scales(step: Step) -> tuple[float, float]:
    """(sqrt(|dt|), sqrt(g^2)) of an Euler-Maruyama step: the noise term is sqrt(2 t) * (sqrt(|dt|) eps)."""
    return math.sqrt(abs(step.dt)), math.sqrt(step.diffusion)


def sde_update(x: torch.Tensor, d: torch.Tensor, step: Step, noise: torch.Tensor | None) -> torch.Tensor:
    """x + d dt + sqrt(2 t) sqrt(|dt|) eps  (or the mean x + dt d on the last step)."""
    if step.kind == StepKind.SDE_LAST:
        return x + step.dt * d
    sqrt_dt, sqrt_g2 = sde_noise_scales(step)
    return x + d * step.dt + sqrt_g2 * (noise * sqrt_dt)


RAEV2_T_EPS = 0.05  # RAEv2's Transport.t_eps: v = (x_t - x_hat) / max(t, t_eps)


def raev2_t_safe(t: float) -> float:
    """max(t, 0.05) as the official float32 ``clamp_min`` forms it (the divisor of v = (x_t - x_hat) / t)."""
    return float(max(np.float32(t), np.float32(RAEV2_T_EPS)))


def xpred_velocity(x: torch.Tensor, x_hat: torch.Tensor, t_safe: float) -> torch.Tensor:
    """RAEv2's velocity from an x-prediction: (x_t - x_hat) / max(t, 0.05) (``Transport.convert_model_pred``).

    ``t_safe`` is ``raev2_t_safe(t)``. The official code divides by a float32 tensor of the batch's
    times; so does this (a Python scalar divisor becomes a multiplication by its reciprocal on CUDA,
    which can differ in the last bit).
    """
    return (x - x_hat) / torch.full((x.shape[0],) + (1,) * (x.dim() - 1), t_safe, dtype=x.dtype, device=x.device)


def euler_update(x: torch.Tensor, v: torch.Tensor, dt: float) -> torch.Tensor:
    return x + dt * v


def heun_predict(x: torch.Tensor, k1: torch.Tensor, dt: float) -> torch.Tensor:
    """Predictor of a Heun step: x + dt k1 (SiT's and torchdiffeq's, identical)."""
    return x + dt * k1


def heun_correct(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, dt: float) -> torch.Tensor:
    """Corrector of a Heun step: x + dt (k1/2 + k2/2) (SiT and torchdiffeq agree to the bit)."""
    return x + dt * (0.5 * k1 + 0.5 * k2)


__all__ = ["ScoreCoefficients", "euler_update", "heun_correct", "heun_predict", "sde_noise_scales", "sde_update",
           "sit_drift", "sit_score_coefficients", "RAEV2_T_EPS", "raev2_t_safe", "xpred_velocity"]
