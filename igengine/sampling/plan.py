"""Time grids and step plans of both families (docs/CONTRACTS.md, "Time conventions and solvers").

A sampling run is a precomputed ``Plan``: a tuple of ``Step`` records holding every scalar a step
needs (times, dt, which guidance is active at each network evaluation, the noise stream). The loop
that executes a plan (``igengine.sampling.loop``, ``igengine.sampling.fused``) therefore makes no
decisions of its own, and a fused kernel or a captured CUDA graph can consume the same records.
The per-element maths of one step lives in ``igengine.sampling.updates``.

SiT family (t = 1 noise, t = 0 data; official SiT/samplers.py, float64 state in ``reference``):
  * ``sde``: grid linspace(1, 0.04, N) then 0. Steps 0..N-2 are Euler-Maruyama with
    drift d = v - 0.5 g^2 score(v), g^2 = 2t, and noise sqrt(2t) sqrt(|dt|) eps; the last step
    (0.04 -> 0) is deterministic, x + dt d. CFG is applied to the drift.
  * ``ode-euler``: grid linspace(1, 0, N+1), x + dt v.
  * ``ode-heun``: as Euler plus a corrector at t_next (skipped on the last step); the corrector
    decides CFG (and IG) with t_cur, as the official code does. The official ODE sampler has no IG:
    here IG is applied to v before CFG, exactly as in the SDE sampler.
LightningDiT family (t = 0 noise, t = 1 data; official transport + torchdiffeq, fp32 state):
  * grid linspace(0, 1, N) in float32, optionally shifted t' = s t / (1 + (s - 1) t) (s > 0);
  * ``heun2``: torchdiffeq's fixed-grid Heun: k1 = f(t0, x), k2 = f(t0 + dt, x + dt k1),
    x + dt (k1/2 + k2/2); 2 evaluations on each of the N - 1 intervals (the last one included).
  * ``euler``: x + dt f(t0, x).
  Each evaluation decides CFG with its own time (float32 comparison, as ``t[0] < start``).
RAEv2 family (t = 1 noise, t = 0 data; official src/stage2/transport/sampler.py, fp32 state):
  * grid linspace(1, 0, N + 1) in float32, shifted t' = s t / (1 + (s - 1) t) (s = sqrt(latent
    numel / 4096) by default: 8 for 1024 x 16 x 16), plain Euler x <- x - (t_i - t_{i+1}) v with
    v = (x - x_hat) / max(t_i, 0.05) on the guided x-prediction x_hat; no special last step.
  * guidance decided per evaluation with float32 comparisons, intervals inclusive; IG on when
    ``GuidanceConfig.raev2_ig_on`` (a scale above 1, or an unconditional scale other than 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

import math

from igengine.config import SOLVERS_BY_FAMILY, Family, GuidanceConfig, SamplerConfig, Solver
from igengine.errors import ConfigError
from igengine.noise import sde_stream

SDE_T_END = 0.04  # the last stochastic time of the official SiT SDE grid
RAEV2_SHIFT_BASE = 4096  # RAEv2's misc.time_dist_shift_base: shift = sqrt(latent numel / base)


class StepKind(str, enum.Enum):
    SDE = "sde"  # Euler-Maruyama with noise
    SDE_LAST = "sde-last"  # deterministic last SDE step (mean only)
    EULER = "euler"
    HEUN = "heun"  # predictor + corrector (two evaluations)


@dataclass(frozen=True)
class Evaluation:
    """One network call: the time fed to the network and which guidance applies there.

    ``t`` is in the family's own convention (SiT: 1 = noise; LightningDiT: 0 = noise). When ``cfg``
    is set the call carries 2N rows (conditional, then unconditional); otherwise N.
    """

    t: float
    ig: bool
    cfg: bool


@dataclass(frozen=True)
class Step:
    """One solver step from ``t_cur`` to ``t_next``: x_next = x + dt * (field) [+ noise].

    ``dt = t_next - t_cur`` keeps its sign: negative for SiT (time runs from 1, noise, down to 0,
    data), positive for LightningDiT (0, noise, up to 1, data). ``evals`` are the step's network
    calls (two for Heun: the predictor at t_cur, the corrector). ``noise_stream`` is the
    noise-contract stream of an SDE step's Gaussian (None for deterministic steps).
    """

    index: int
    kind: StepKind
    t_cur: float
    t_next: float
    dt: float
    evals: tuple[Evaluation, ...]  # 1, or 2 for HEUN (predictor, corrector)
    noise_stream: int | None = None

    @property
    def diffusion(self) -> float:
        """g(t)^2 = 2 t of the official SiT SDE."""
        return 2.0 * self.t_cur


@dataclass(frozen=True)
class Plan:
    """A whole run's steps, precomputed, with the guidance scales they apply.

    Immutable and independent of batch, device and backend: the same plan drives the reference
    loop, the fused loop and a captured graph.
    """

    family: Family
    solver: Solver
    guidance: GuidanceConfig
    steps: tuple[Step, ...]

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (a CFG evaluation counts once: it is one call of 2N rows)."""
        return sum(len(s.evals) for s in self.steps)

    @property
    def network_rows(self) -> int:
        """Network rows per sample over the run (a CFG evaluation costs 2 rows, the others 1)."""
        return sum(2 if ev.cfg else 1 for s in self.steps for ev in s.evals)

    @property
    def uses_cfg(self) -> bool:
        return any(ev.cfg for s in self.steps for ev in s.evals)


def raev2_default_shift(latent_shape: tuple[int, int, int]) -> float:
    """RAEv2's timestep shift sqrt(C H W / 4096) (src/offline_eval.py): 8.0 for DINOv3-L latents 1024 x 16 x 16."""
    return math.sqrt(math.prod(latent_shape) / RAEV2_SHIFT_BASE)


def shift_grid(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift t' = s t / (1 + (s - 1) t) of LightningDiT and RAEv2, in the grid's dtype (float32)."""
    if shift <= 0:
        return t
    return torch.stack([(shift * tn) / (1 + (shift - 1) * tn) for tn in t])


def _inside(t32: np.float32, interval: tuple[float, float]) -> bool:
    """lo <= t <= hi in float32, as a float32 time tensor compares with Python bounds (each rounded to float32)."""
    return bool(np.float32(interval[0]) <= t32 <= np.float32(interval[1]))


def _lightning_active(t32: np.float32, interval: tuple[float, float], scale: float) -> bool:
    return scale > 1.0 and _inside(t32, interval)


def build_plan(family: Family, cfg: SamplerConfig) -> Plan:
    """Precompute every step of a run. Raises ConfigError if the solver does not fit the family."""
    family = Family(family)
    if cfg.solver not in SOLVERS_BY_FAMILY[family]:
        allowed = ", ".join(s.value for s in SOLVERS_BY_FAMILY[family])
        raise ConfigError(f"`solver` {cfg.solver.value!r} is not a {family.value} solver (choose from {allowed})")
    if family == Family.SIT and cfg.timestep_shift not in (0, 0.0):
        raise ConfigError("`timestep_shift` applies to LightningDiT and RAEv2 models only")
    g = cfg.guidance
    if family != Family.RAEV2 and g.ig_scale_uncond is not None:
        raise ConfigError("`ig_scale_uncond` (a separate IG scale for the unconditional rows) applies to RAEv2 "
                          "models only: SiT and LightningDiT apply `ig_scale` to both halves")
    n = cfg.steps
    if family == Family.LIGHTNINGDIT and n < 2:  # euler here; heun2 is refused by SamplerConfig itself
        raise ConfigError("the LightningDiT solvers need `steps` >= 2 (grid linspace(0, 1, steps))")
    if family == Family.SIT:
        return Plan(family, cfg.solver, g, tuple(_sit_steps(cfg.solver, n, g)))
    if family == Family.RAEV2:
        return Plan(family, cfg.solver, g, tuple(_raev2_steps(n, cfg.timestep_shift, g)))
    return Plan(family, cfg.solver, g, tuple(_lightning_steps(cfg.solver, n, cfg.timestep_shift, g)))


def _sit_eval(t: float, g: GuidanceConfig) -> Evaluation:
    return Evaluation(t=t, ig=g.ig_active(t), cfg=g.cfg_active(t))


def _sit_steps(solver: Solver, n: int, g: GuidanceConfig):
    if solver == Solver.SDE:
        grid = torch.cat([torch.linspace(1.0, SDE_T_END, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        ts = grid.tolist()
        for i in range(n):
            t_cur, t_next = ts[i], ts[i + 1]
            last = i == n - 1
            yield Step(
                index=i,
                kind=StepKind.SDE_LAST if last else StepKind.SDE,
                t_cur=t_cur,
                t_next=t_next,
                dt=float(grid[i + 1] - grid[i]),
                evals=(_sit_eval(t_cur, g),),
                noise_stream=None if last else sde_stream(i),
            )
        return
    grid = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    ts = grid.tolist()
    for i in range(n):
        t_cur, t_next = ts[i], ts[i + 1]
        first = _sit_eval(t_cur, g)
        heun = solver == Solver.ODE_HEUN and i < n - 1
        # The official corrector is evaluated at t_next but keeps t_cur's guidance decision.
        evals = (first, Evaluation(t=t_next, ig=first.ig, cfg=first.cfg)) if heun else (first,)
        yield Step(
            index=i,
            kind=StepKind.HEUN if heun else StepKind.EULER,
            t_cur=t_cur,
            t_next=t_next,
            dt=float(grid[i + 1] - grid[i]),
            evals=evals,
        )


def _lightning_eval(t32: np.float32, g: GuidanceConfig) -> Evaluation:
    return Evaluation(
        t=float(t32),
        ig=_lightning_active(t32, g.ig_interval, g.ig_scale),
        cfg=_lightning_active(t32, g.cfg_interval, g.cfg_scale),
    )


def _lightning_steps(solver: Solver, n: int, shift: float, g: GuidanceConfig):
    grid = shift_grid(torch.linspace(0.0, 1.0, n), shift).numpy().astype(np.float32)
    for i in range(n - 1):
        t0, t1 = grid[i], grid[i + 1]
        dt = np.float32(t1 - t0)
        first = _lightning_eval(t0, g)
        if solver == Solver.HEUN2:
            evals = (first, _lightning_eval(np.float32(t0 + dt), g))
            kind = StepKind.HEUN
        else:
            evals = (first,)
            kind = StepKind.EULER
        yield Step(index=i, kind=kind, t_cur=float(t0), t_next=float(t1), dt=float(dt), evals=evals)


def _raev2_steps(n: int, shift: float, g: GuidanceConfig):
    grid = shift_grid(torch.linspace(1.0, 0.0, n + 1), shift).numpy().astype(np.float32)
    ig_on = g.raev2_ig_on
    for i in range(n):
        t0, t1 = grid[i], grid[i + 1]
        h = np.float32(t0 - t1)  # the official step size, a float32 tensor; x - h v == x + (-h) v bit for bit
        ev = Evaluation(
            t=float(t0),
            ig=ig_on and _inside(t0, g.ig_interval),
            cfg=_lightning_active(t0, g.cfg_interval, g.cfg_scale),
        )
        yield Step(index=i, kind=StepKind.EULER, t_cur=float(t0), t_next=float(t1), dt=-float(h), evals=(ev,))
