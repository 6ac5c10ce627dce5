"""A plan as fused-kernel launches: the per-step scalars, computed once per run on the host in float64.

Each float field of ``StepParams`` (``igengine.kernels.abi``) is the float64 value the reference
code forms in Python, rounded to float32 by ctypes exactly as PyTorch rounds a Python scalar that
multiplies a float32 tensor. So the kernel multiplies by the very float32 numbers the reference
multiplies by, taken from the same helpers:

    IG        SiT: v_i + w (v_f - v_i)           ig_w = w            (guidance.ig_combine)
              LightningDiT: v_f + (w-1)(v_f - v_i)  ig_w = w - 1.0
              RAEv2: base + w (full - base)      ig_w = w, and ig_w_uncond = the unconditional scale
              (ig_w_uncond weighs the unconditional rows; SiT and LightningDiT use ig_w there too)
    drift     updates.sit_score_coefficients(t)
    CFG       cfg_w = w_cfg                                        (guidance.cfg_combine)
    RAEv2     t_safe = updates.raev2_t_safe(t): v = (x - x_hat) / t_safe (updates.xpred_velocity)
    update    dt and updates.sde_noise_scales(step)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from igengine.config import Family, GuidanceConfig
from igengine.kernels.abi import FamilyCode, Kind, StepParams
from igengine.noise import check_seed
from igengine.sampling.plan import Evaluation, Plan, Step, StepKind
from igengine.sampling.updates import raev2_t_safe, sde_noise_scales, sit_score_coefficients


_FAMILY_CODES = {Family.SIT: FamilyCode.SIT, Family.LIGHTNINGDIT: FamilyCode.LIGHTNINGDIT,
                 Family.RAEV2: FamilyCode.RAEV2}


class Phase(str, enum.Enum):
    """Which launch of a step: the only one (SDE, Euler), or the Heun predictor / corrector."""

    SINGLE = "single"
    PREDICT = "predict"
    CORRECT = "correct"


def _kind(step: Step, phase: Phase) -> Kind:
    if step.kind == StepKind.HEUN:
        if phase == Phase.SINGLE:
            raise ValueError(f"step {step.index} is a Heun step: choose Phase.PREDICT or Phase.CORRECT")
        return Kind.HEUN_PREDICT if phase == Phase.PREDICT else Kind.HEUN_CORRECT
    if phase != Phase.SINGLE:
        raise ValueError(f"step {step.index} ({step.kind.value}) has a single launch: use Phase.SINGLE")
    return {StepKind.SDE: Kind.SDE, StepKind.SDE_LAST: Kind.SDE_LAST, StepKind.EULER: Kind.EULER}[step.kind]


def step_params(family: Family, guidance: GuidanceConfig, step: Step, *, phase: Phase = Phase.SINGLE,
                dup_next: bool = False, seed: int = 0) -> StepParams:
    """The scalars of one launch.

    family, guidance: the run's model family and guidance scales (the step's evaluations say which
    guidance is active). step: a record of ``igengine.sampling.plan.build_plan``. phase: see ``Phase``.
    dup_next: the next network evaluation is inside the CFG interval, so the launch writes the next
    network input twice (rows 0..N-1 and N..2N-1). seed: in [0, 2^64), used by SDE noise only.
    """
    seed = check_seed(seed)
    kind = _kind(step, phase)
    ev: Evaluation = step.evals[1] if kind == Kind.HEUN_CORRECT else step.evals[0]
    family = Family(family)
    drift = kind in (Kind.SDE, Kind.SDE_LAST)
    if drift and family != Family.SIT:
        raise ValueError("the SDE kinds belong to the SiT family")
    if family == Family.RAEV2 and kind != Kind.EULER:
        raise ValueError(f"RAEv2 steps are Euler steps, step {step.index} is {step.kind.value}")
    p = StepParams()
    p.kind = int(kind)
    p.family = int(_FAMILY_CODES[family])
    p.ig = int(bool(ev.ig))
    p.cfg = int(bool(ev.cfg))
    p.drift = int(drift)
    p.dup_next = int(bool(dup_next))
    p.step_index = int(step.index)
    p.noise_stream = int(step.noise_stream) if kind == Kind.SDE else 0
    p.seed_lo = seed & 0xFFFFFFFF
    p.seed_hi = seed >> 32
    p.ig_w = guidance.ig_scale - 1.0 if family == Family.LIGHTNINGDIT else guidance.ig_scale
    p.ig_w_uncond = guidance.uncond_ig_scale if family == Family.RAEV2 else p.ig_w  # one weight for both halves
    p.cfg_w = guidance.cfg_scale
    score = sit_score_coefficients(float(ev.t))
    p.score_ratio = score.ratio
    p.score_var = score.var
    p.drift_t = score.drift_t
    p.dt = float(step.dt)
    sqrt_dt, sqrt_g2 = sde_noise_scales(step)
    p.sqrt_abs_dt = sqrt_dt
    p.sqrt_diffusion = sqrt_g2 if kind == Kind.SDE else 0.0
    p.t_safe = raev2_t_safe(ev.t) if family == Family.RAEV2 else 0.0
    return p


@dataclass(frozen=True)
class StepLaunches:
    """The launches of one plan step: ``single``, or ``predict`` then ``correct`` (Heun).

    ``rows_in`` / ``rows_mid``: network rows of the step's first / second evaluation (N or 2N, as a
    multiplier 1 or 2); ``rows_next``: rows the last launch writes for the next step (0: none).
    """

    step: Step
    launches: tuple[StepParams, ...]
    rows_in: int
    rows_mid: int
    rows_next: int


def plan_launches(plan: Plan, seed: int) -> tuple[StepLaunches, ...]:
    """Every launch of a run, precomputed (no per-step Python decisions remain in the loop)."""
    guidance = plan.guidance
    out = []
    steps = plan.steps
    for k, step in enumerate(steps):
        nxt = steps[k + 1].evals[0] if k + 1 < len(steps) else None
        rows_next = 0 if nxt is None else (2 if nxt.cfg else 1)
        if step.kind == StepKind.HEUN:
            mid = step.evals[1]
            launches = (
                step_params(plan.family, guidance, step, phase=Phase.PREDICT, dup_next=mid.cfg, seed=seed),
                step_params(plan.family, guidance, step, phase=Phase.CORRECT, dup_next=rows_next == 2, seed=seed),
            )
            rows_mid = 2 if mid.cfg else 1
        else:
            launches = (step_params(plan.family, guidance, step, dup_next=rows_next == 2, seed=seed),)
            rows_mid = 0
        out.append(StepLaunches(step, launches, 2 if step.evals[0].cfg else 1, rows_mid, rows_next))
    return tuple(out)
