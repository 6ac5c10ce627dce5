"""The reference sampling loop: a plan, a network and a generator in; final latents out.

Pure functions (EDM2's sampler pattern): the network is a callable
``net(x [R,C,H,W] float32, t [R] float32, y [R] int64) -> (v_final, v_inter)``, its randomness a
``Randn`` (``igengine.sampling.randomness``), and the model facts the loop needs are a
``ModelFacts``. Nothing is read from a backend; nothing is kept between calls.

Outside the CFG interval only the conditional rows are sent to the network (the official
LightningDiT code computes and discards the unconditional half; skipping it changes no output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from igengine.config import Family, GuidanceConfig, ModelConfig
from igengine.errors import ConfigError, NonFiniteError
from igengine.noise import STREAM_INITIAL
from igengine.sampling.guidance import cfg_combine, ig_combine
from igengine.sampling.plan import Evaluation, Plan, Step, StepKind
from igengine.sampling.randomness import Randn
from igengine.sampling.updates import (euler_update, heun_correct, heun_predict, raev2_t_safe, sde_update, sit_drift,
                                      xpred_velocity)

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelFacts:
    """What a sampler needs to know about the model: no more.

    family: fixes the time convention and the IG formula's rounding; latent_shape: (C, H, W) of one
    sample; null_class: the label id of the unconditional (CFG) row, None when the label table has
    no such row (a model trained without label dropout cannot use CFG).
    """

    family: Family
    latent_shape: tuple[int, int, int]
    null_class: int | None

    @classmethod
    def of(cls, config: ModelConfig) -> "ModelFacts":
        return cls(config.family, tuple(config.latent_shape), config.null_class if config.has_null_class else None)

    def check_plan(self, plan: Plan) -> None:
        if Family(plan.family) != Family(self.family):
            raise ConfigError(f"the plan is for the {plan.family.value} family but the model is {self.family.value}")
        if plan.uses_cfg and self.null_class is None:
            raise ConfigError("CFG needs a null-class row in the label table, but this model was trained without "
                              "label dropout: set `cfg_scale` to 1")


def time_column(t: float, rows: int, device: torch.device) -> torch.Tensor:
    """The network's time input: built in float64 and cast to float32, as the official samplers do."""
    return torch.full((rows,), t, dtype=torch.float64, device=device).float()


def cfg_labels(y: torch.Tensor, null_class: int) -> torch.Tensor:
    """Labels of a CFG call: the conditional rows, then as many unconditional (null-class) rows."""
    return torch.cat([y, torch.full_like(y, null_class)])


def guided_field(net: Network, plan: Plan, facts: ModelFacts, x: torch.Tensor, y: torch.Tensor, ev: Evaluation,
                 drift: bool) -> torch.Tensor:
    """The guided velocity (or, for the SiT SDE, the guided drift) at state x (N, C, H, W), time ev.t.

    Computed in x's dtype (the state dtype) in each family's official order: IG on every row the
    network saw, then (SiT SDE) the drift, then CFG on all channels.
    """
    n = x.shape[0]
    g = plan.guidance
    rows, labels = (torch.cat([x, x]), cfg_labels(y, facts.null_class)) if ev.cfg else (x, y)
    v_final, v_inter = net(rows.float(), time_column(ev.t, rows.shape[0], x.device), labels)
    if facts.family == Family.RAEV2:
        return raev2_velocity(v_final.to(x.dtype), v_inter.to(x.dtype), x, g, ev)
    if facts.family == Family.SIT:
        v_final = v_final.to(x.dtype)
        v = ig_combine(v_final, v_inter.to(x.dtype), g.ig_scale, facts.family) if ev.ig else v_final
        f = sit_drift(v, rows, ev.t) if drift else v
    else:
        v = ig_combine(v_final.float(), v_inter.float(), g.ig_scale, facts.family) if ev.ig else v_final.float()
        f = v.to(x.dtype)
    return cfg_combine(f[:n], f[n:], g.cfg_scale) if ev.cfg else f


def raev2_velocity(x_full: torch.Tensor, x_base: torch.Tensor, x: torch.Tensor, g: GuidanceConfig,
                   ev: Evaluation) -> torch.Tensor:
    """RAEv2: the guided x-prediction (IG on each half with its scale, then CFG), as a velocity at state x (N, ...).

    x_full / x_base: (R, C, H, W), R = 2N under CFG (conditional rows, then unconditional).
    """
    n = x.shape[0]
    if ev.ig:
        cond = ig_combine(x_full[:n], x_base[:n], g.ig_scale, Family.RAEV2)
        uncond = ig_combine(x_full[n:], x_base[n:], g.uncond_ig_scale, Family.RAEV2) if ev.cfg else None
    else:
        cond, uncond = x_full[:n], x_full[n:]
    x_hat = cfg_combine(cond, uncond, g.cfg_scale) if ev.cfg else cond
    return xpred_velocity(x, x_hat, raev2_t_safe(ev.t))


def reference_step(net: Network, plan: Plan, facts: ModelFacts, step: Step, x: torch.Tensor, y: torch.Tensor,
                   seed: int, indices: torch.Tensor, randn: Randn) -> torch.Tensor:
    """One plan step from state x (N, C, H, W) in the state dtype; returns the next state (a new tensor)."""
    if step.kind in (StepKind.SDE, StepKind.SDE_LAST):
        d = guided_field(net, plan, facts, x, y, step.evals[0], drift=True)
        noise = None
        if step.kind == StepKind.SDE:
            noise = randn(seed, indices, step.noise_stream, x.shape[1:], x.device, x.dtype)
        return sde_update(x, d, step, noise)
    k1 = guided_field(net, plan, facts, x, y, step.evals[0], drift=False)
    if step.kind == StepKind.EULER:
        return euler_update(x, k1, step.dt)
    k2 = guided_field(net, plan, facts, heun_predict(x, k1, step.dt), y, step.evals[1], drift=False)
    return heun_correct(x, k1, k2, step.dt)


def mark_nonfinite(first_bad: torch.Tensor, x: torch.Tensor, step_index: int) -> torch.Tensor:
    """first_bad (N,) int64: set to step_index where a row of x turned NaN/Inf and no earlier step did (on the device)."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    return torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step_index), first_bad)


def raise_if_nonfinite(first_bad: torch.Tensor, indices: torch.Tensor) -> None:
    """Raise NonFiniteError for the earliest step recorded in ``first_bad`` (-1 = row still finite).

    Called once, after the last step: the flags live on the device until then, so the loop never
    waits for the host.
    """
    first_bad = first_bad.cpu()
    hit = first_bad >= 0
    if bool(hit.any()):
        first = int(first_bad[hit].min())
        rows = torch.nonzero(first_bad == first).flatten()
        raise NonFiniteError(first, indices.cpu()[rows].tolist())


def run_reference(net: Network, plan: Plan, facts: ModelFacts, seed: int, indices: torch.Tensor,
                  labels: torch.Tensor, *, state_dtype: torch.dtype, device: torch.device, randn: Randn,
                  on_step: OnStep | None = None) -> torch.Tensor:
    """Final states (N, C, H, W) float32 of samples ``indices`` with class ``labels`` (both int64 (N,)).

    The initial state is stream 0 of the noise contract, every SDE step's noise its own stream, so
    a sample does not depend on the other samples of its batch.
    """
    idx = indices.to(device)
    y = labels.to(device)
    x = randn(seed, idx, STREAM_INITIAL, facts.latent_shape, device, state_dtype)
    first_bad = torch.full((x.shape[0],), -1, dtype=torch.int64, device=device)
    for k, step in enumerate(plan.steps):
        x = reference_step(net, plan, facts, step, x, y, seed, idx, randn)
        first_bad = mark_nonfinite(first_bad, x, step.index)
        if on_step is not None:
            on_step(k + 1, len(plan.steps))
    raise_if_nonfinite(first_bad, indices)
    return x.float()


__all__ = ["ModelFacts", "Network", "OnStep", "cfg_labels", "guided_field", "raev2_velocity", "mark_nonfinite", "raise_if_nonfinite",
           "reference_step", "run_reference", "time_column"]
