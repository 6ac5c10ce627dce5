"""Each solver against an independent, plain re-derivation of the official semantics (docs/CONTRACTS.md)."""

import numpy as np
import pytest
import torch

from igengine.backends import TorchBackend
from igengine.config import Family, GuidanceConfig, Precision, SamplerConfig, Solver
from igengine.noise import STREAM_INITIAL, gaussian
from igengine.sampling.plan import StepKind, build_plan
from tests.conftest import sampler_for, tiny_model

SEED = 3
IDX = torch.arange(3)
LABELS = torch.tensor([1, 4, 7])


def ours(model, solver, steps, guidance, precision=Precision.REFERENCE, shift=0.0):
    cfg = SamplerConfig(solver=solver, steps=steps, guidance=guidance, precision=precision, timestep_shift=shift)
    return sampler_for(TorchBackend(model, precision=precision), cfg)(SEED, IDX, LABELS).double()


def net(model, x, t, y):
    with torch.no_grad():
        f, i = model(x.float(), torch.full((x.shape[0],), float(t)), y)
    return f.double(), i.double()


def plain_sit(model, solver, steps, g: GuidanceConfig):
    """SiT: x_t = (1-t) x0 + t eps. Written from the maths, not from igengine.sampling.plan:
    drift v - t * score with score = ((t-1) v - x) / t simplifies to d = (2 - t) v + x."""
    z = gaussian(SEED, IDX, STREAM_INITIAL, model.config.latent_shape).double()
    null = torch.full_like(LABELS, model.config.num_classes)

    def guided(x, t, t_decide, sde):
        use_cfg = g.cfg_scale > 1 and g.cfg_interval[0] <= t_decide <= g.cfg_interval[1]
        use_ig = g.ig_scale > 1 and g.ig_interval[0] <= t_decide <= g.ig_interval[1]
        outs = []
        for y in ([LABELS, null] if use_cfg else [LABELS]):
            f, i = net(model, x, t, y)
            v = i + g.ig_scale * (f - i) if use_ig else f
            outs.append((2 - t) * v + x if sde else v)
        return outs[1] + g.cfg_scale * (outs[0] - outs[1]) if use_cfg else outs[0]

    x = z.clone()
    if solver == Solver.SDE:
        ts = list(np.linspace(1.0, 0.04, steps)) + [0.0]
        for k in range(steps):
            t, dt = ts[k], ts[k + 1] - ts[k]
            d = guided(x, t, t, sde=True)
            if k < steps - 1:
                eps = gaussian(SEED, IDX, 1 + k, model.config.latent_shape).double()
                x = x + d * dt + np.sqrt(2 * t) * np.sqrt(-dt) * eps
            else:
                x = x + d * dt
        return x
    ts = np.linspace(1.0, 0.0, steps + 1)
    for k in range(steps):
        t, tn = ts[k], ts[k + 1]
        d1 = guided(x, t, t, sde=False)
        x_e = x + (tn - t) * d1
        if solver == Solver.ODE_HEUN and k < steps - 1:
            d2 = guided(x_e, tn, t, sde=False)  # corrector at t_next, guidance decided at t_cur
            x = x + (tn - t) * (d1 + d2) / 2
        else:
            x = x_e
    return x


@pytest.mark.parametrize("solver", [Solver.SDE, Solver.ODE_EULER, Solver.ODE_HEUN])
@pytest.mark.parametrize("g", [
    GuidanceConfig(),
    GuidanceConfig(ig_scale=1.4, cfg_scale=1.35, cfg_interval=(0.0, 0.7)),
    GuidanceConfig(ig_scale=1.8, ig_interval=(0.2, 0.6), cfg_scale=2.0, cfg_interval=(0.5, 1.0)),
])
def test_sit_solvers_match_plain_rederivation(solver, g):
    """float64 state on both sides; the only differences are the rounding of two equal formulas for the
    drift, which can flip the fp32 rounding of a network input: bound 1e-6 on latents of size ~3."""
    model = tiny_model("sit")
    ref = plain_sit(model, solver, 8, g)
    got = ours(model, solver, 8, g)
    assert (got - ref).abs().max() < 1e-6
    got32 = ours(model, solver, 8, g, precision=Precision.FP32)
    assert (got32 - ref).abs().max() < 1e-4


def lightning_guided(model, g):
    null_row = model.config.num_classes

    def f(t, x):
        t32 = np.float32(t.item())
        use_cfg = g.cfg_scale > 1 and np.float32(g.cfg_interval[0]) <= t32 <= np.float32(g.cfg_interval[1])
        use_ig = g.ig_scale > 1 and np.float32(g.ig_interval[0]) <= t32 <= np.float32(g.ig_interval[1])
        outs = []
        for y in ([LABELS, torch.full_like(LABELS, null_row)] if use_cfg else [LABELS]):
            with torch.no_grad():
                fo, io = model(x, torch.full((x.shape[0],), float(t32)), y)
            outs.append(fo + (g.ig_scale - 1) * (fo - io) if use_ig else fo)
        return outs[1] + g.cfg_scale * (outs[0] - outs[1]) if use_cfg else outs[0]

    return f


@pytest.mark.parametrize("method,solver", [("heun2", Solver.HEUN2), ("euler", Solver.EULER)])
@pytest.mark.parametrize("shift,g", [
    (0.3, GuidanceConfig(ig_scale=1.4, cfg_scale=1.45, cfg_interval=(0.19, 1.0))),
    (0.0, GuidanceConfig(ig_scale=1.7)),
])
def test_lightningdit_solvers_match_torchdiffeq(method, solver, shift, g):
    """The official LightningDiT sampler is torchdiffeq's fixed-grid odeint: compare with it directly."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq (test extra) not installed")
    model = tiny_model("lightningdit")
    t = torch.linspace(0, 1, 7)
    if shift > 0:
        t = torch.stack([shift * tn / (1 + (shift - 1) * tn) for tn in t])
    z = gaussian(SEED, IDX, STREAM_INITIAL, model.config.latent_shape)
    ref = torchdiffeq.odeint(lightning_guided(model, g), z, t, method=method)[-1].double()
    got = ours(model, solver, 7, g, shift=shift)
    assert (got - ref).abs().max() <= 1e-6


def test_sde_plan_structure():
    plan = build_plan(Family.SIT, SamplerConfig(solver=Solver.SDE, steps=5))
    assert [s.kind for s in plan.steps] == [StepKind.SDE] * 4 + [StepKind.SDE_LAST]
    assert [s.noise_stream for s in plan.steps] == [1, 2, 3, 4, None]
    assert plan.steps[0].t_cur == 1.0 and abs(plan.steps[-1].t_cur - 0.04) < 1e-15 and plan.steps[-1].t_next == 0.0
    assert plan.nfe == 5


def test_heun_plans():
    g = GuidanceConfig(cfg_scale=2.0, cfg_interval=(0.0, 0.5))
    plan = build_plan(Family.SIT, SamplerConfig(solver=Solver.ODE_HEUN, steps=4, guidance=g))
    assert [len(s.evals) for s in plan.steps] == [2, 2, 2, 1] and plan.nfe == 7
    # Step 1 runs t 0.75 -> 0.5: its corrector at t = 0.5 is inside the interval, but the official
    # code decides with t_cur = 0.75, so no CFG.
    assert plan.steps[1].evals[1].t == 0.5 and not plan.steps[1].evals[1].cfg
    ld = build_plan(Family.LIGHTNINGDIT, SamplerConfig(solver=Solver.HEUN2, steps=5, timestep_shift=0.3))
    assert ld.nfe == 8 and len(ld.steps) == 4
    t1 = np.float32(0.25)
    assert abs(ld.steps[1].t_cur - 0.3 * t1 / (1 - 0.7 * t1)) < 1e-7


def test_lightningdit_evaluation_times_are_torchdiffeqs():
    """Every time the plan feeds the network is a time torchdiffeq's fixed-grid heun2 evaluates f at, in order."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq (test extra) not installed")
    shift = 0.3
    t = torch.linspace(0, 1, 6)
    t = torch.stack([shift * tn / (1 + (shift - 1) * tn) for tn in t])
    seen = []

    def f(tt, x):
        seen.append(float(tt))
        return torch.zeros_like(x)

    torchdiffeq.odeint(f, torch.zeros(1), t, method="heun2")
    ld = build_plan(Family.LIGHTNINGDIT, SamplerConfig(solver=Solver.HEUN2, steps=6, timestep_shift=shift))
    assert [ev.t for s in ld.steps for ev in s.evals] == seen


def test_solver_must_fit_family():
    with pytest.raises(ValueError, match="not a sit solver"):
        build_plan(Family.SIT, SamplerConfig(solver=Solver.HEUN2, steps=5))
    with pytest.raises(ValueError, match="not a lightningdit solver"):
        build_plan(Family.LIGHTNINGDIT, SamplerConfig(solver=Solver.SDE, steps=5))
