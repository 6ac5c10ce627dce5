"""The sampling loop: guidance order and intervals, CFG rows, batch invariance, NaN reports."""

import pytest
import torch

from igengine.backends import TorchBackend
from igengine.config import GuidanceConfig, Precision, SamplerConfig, Solver
from igengine.sampler import NonFiniteError, PlanRunner
from igengine.solvers import Evaluation
from tests.conftest import TINY, tiny_model


class ScriptedBackend:
    """v_final = 2x + y/10, v_inter = x - 1 (per element), and a log of every call."""

    name = "scripted"

    def __init__(self, config, max_batch=None, nan_at=None):
        self.config = config
        self.device = torch.device("cpu")
        self.max_batch = max_batch
        self.calls = []
        self.nan_at = nan_at  # (call number, row)

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        yv = (y.float() / 10).view(-1, 1, 1, 1)
        vf, vi = 2 * x + yv, x - 1
        if self.nan_at and len(self.calls) - 1 == self.nan_at[0]:
            vf = vf.clone()
            vf[self.nan_at[1]] = float("nan")
        return vf, vi

    def describe(self):
        return {"backend": self.name}


def runner(family, g, solver=None, steps=4, **kw):
    cfg = TINY[family]
    solver = solver or (Solver.SDE if family == "sit" else Solver.HEUN2)
    backend = ScriptedBackend(cfg, **kw)
    return PlanRunner(backend, SamplerConfig(solver=solver, steps=steps, guidance=g)), backend


@pytest.mark.parametrize("family", ["sit", "lightningdit"])
def test_ig_then_cfg_on_both_halves(family):
    g = GuidanceConfig(ig_scale=1.5, cfg_scale=3.0)
    r, backend = runner(family, g, solver=Solver.ODE_EULER if family == "sit" else Solver.EULER)
    x = torch.randn(2, *TINY[family].latent_shape, generator=torch.Generator().manual_seed(1)).to(r.dtype)
    y = torch.tensor([4, 8])
    f = r.field(x, y, Evaluation(t=0.5, ig=True, cfg=True), drift=False)
    n_rows, _, labels = backend.calls[-1]
    assert n_rows == 4 and labels.tolist() == [4, 8, 10, 10]  # null class = num_classes
    xd = x.double()

    def ig(yval):  # v_inter + w (v_final - v_inter) on each half
        vf, vi = 2 * xd + yval, xd - 1
        return vi + 1.5 * (vf - vi)

    cond = ig(torch.tensor([0.4, 0.8], dtype=torch.float64).view(-1, 1, 1, 1))
    uncond = ig(torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(f.double(), uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_sit_sde_cfg_acts_on_the_drift():
    g = GuidanceConfig(cfg_scale=2.0)
    r, _ = runner("sit", g)
    x = torch.randn(1, *TINY["sit"].latent_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = 0.3
    d = r.field(x, torch.tensor([5]), Evaluation(t=t, ig=False, cfg=True), drift=True)
    drift = lambda v: (2 - t) * v + x  # noqa: E731  (v - t score, simplified)
    # The network sees x in float32 and answers in float32 (the backend contract); the drift uses x itself.
    x32 = x.float()
    vc, vu = (2 * x32 + 0.5).double(), (2 * x32 + 1.0).double()
    # Two float64 evaluations of the same formula (score route vs closed form): relative rounding only.
    assert torch.allclose(d, drift(vu) + 2.0 * (drift(vc) - drift(vu)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["sit", "lightningdit"])
def test_unconditional_rows_only_inside_the_cfg_interval(family):
    lo, hi = (0.0, 0.5)
    r, backend = runner(family, GuidanceConfig(cfg_scale=2.0, cfg_interval=(lo, hi)), steps=6)
    r.run(0, torch.arange(3), torch.tensor([0, 1, 2]))
    assert backend.calls
    for rows, t, labels in backend.calls:
        ev_t = float(t[0])
        evals = [e for s in r.plan.steps for e in s.evals if abs(e.t - ev_t) < 1e-7]
        expect_cfg = evals[0].cfg
        assert rows == (6 if expect_cfg else 3)
        assert (labels[3:] == 10).all() if expect_cfg else True
    assert {c[0] for c in backend.calls} == {3, 6}  # both regimes occurred


def test_ig_interval_is_respected():
    r, backend = runner("sit", GuidanceConfig(ig_scale=2.0, ig_interval=(0.6, 1.0)), solver=Solver.ODE_EULER, steps=4)
    actives = [s.evals[0].ig for s in r.plan.steps]
    assert actives == [True, True, False, False]  # t = 1, 0.75 inside; 0.5, 0.25 outside


@pytest.mark.parametrize("family,solver,precision", [
    ("sit", Solver.SDE, Precision.REFERENCE),
    ("sit", Solver.ODE_HEUN, Precision.FP32),
    ("lightningdit", Solver.HEUN2, Precision.REFERENCE),
])
def test_final_latents_do_not_depend_on_batch_size(family, solver, precision):
    """Noise is bitwise batch-independent; only reassociation inside the network differs (<= 1e-5)."""
    model = tiny_model(family)
    g = GuidanceConfig(ig_scale=1.4, cfg_scale=1.5, cfg_interval=(0.2, 0.8))
    r = PlanRunner(TorchBackend(model, precision=precision), SamplerConfig(solver=solver, steps=6, guidance=g))
    n = 8
    labels = torch.arange(n) % 10
    outs = {}
    for bs in (1, 3, 8):
        parts = [r.run(11, torch.arange(s, min(n, s + bs)), labels[s:s + bs]) for s in range(0, n, bs)]
        outs[bs] = torch.cat(parts)
    assert (outs[1] - outs[8]).abs().max() <= 1e-5
    assert (outs[3] - outs[8]).abs().max() <= 1e-5


def test_backend_max_batch_is_split_transparently():
    model = tiny_model("sit")
    g = GuidanceConfig(cfg_scale=1.5)
    cfg = SamplerConfig(solver=Solver.SDE, steps=4, guidance=g)
    whole = PlanRunner(TorchBackend(model), cfg).run(0, torch.arange(5), torch.arange(5))
    split = PlanRunner(TorchBackend(model, max_batch=3), cfg).run(0, torch.arange(5), torch.arange(5))
    assert (whole - split).abs().max() <= 1e-5


def test_nan_stops_with_step_and_indices():
    # Call 2 is step 2 of a CFG-free SDE run; row 1 of that batch is sample index 41.
    r, _ = runner("sit", GuidanceConfig(), steps=20, nan_at=(2, 1))
    with pytest.raises(NonFiniteError) as e:
        r.run(0, torch.tensor([40, 41, 42]), torch.tensor([0, 1, 2]))
    assert e.value.step == 2 and e.value.indices == [41]
    assert "step 2" in str(e.value) and "41" in str(e.value)


def test_cfg_without_null_row_is_refused():
    cfg = TINY["sit"].replace(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null-class"):
        PlanRunner(ScriptedBackend(cfg), SamplerConfig(solver=Solver.SDE, steps=4, guidance=GuidanceConfig(cfg_scale=2)))
