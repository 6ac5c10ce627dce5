"""The sampling loop: guidance order and intervals, CFG rows, batch invariance, NaN reports, precision."""

import pytest
import torch

from igengine.backends import TorchBackend
from igengine.config import GuidanceConfig, Precision, SamplerConfig, Solver
from igengine.errors import ConfigError, NonFiniteError, PrecisionMismatchError
from igengine.sampling import ModelFacts, Sampler, build_plan
from igengine.sampling.loop import guided_field
from igengine.sampling.plan import Evaluation
from tests.conftest import TINY, sampler_for, tiny_model


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


def runner(family, g, solver=None, steps=4, kernels="off", **kw):
    cfg = TINY[family]
    solver = solver or (Solver.SDE if family == "sit" else Solver.HEUN2)
    backend = ScriptedBackend(cfg, **kw)
    return sampler_for(backend, SamplerConfig(solver=solver, steps=steps, guidance=g), kernels=kernels), backend


def field(r, x, y, ev, drift):
    return guided_field(r.net, r.plan, r.facts, x, y, ev, drift)


@pytest.mark.parametrize("family", ["sit", "lightningdit"])
def test_ig_then_cfg_on_both_halves(family):
    g = GuidanceConfig(ig_scale=1.5, cfg_scale=3.0)
    r, backend = runner(family, g, solver=Solver.ODE_EULER if family == "sit" else Solver.EULER)
    x = torch.randn(2, *TINY[family].latent_shape, generator=torch.Generator().manual_seed(1)).to(r.numerics.state_dtype)
    y = torch.tensor([4, 8])
    f = field(r, x, y, Evaluation(t=0.5, ig=True, cfg=True), drift=False)
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
    d = field(r, x, torch.tensor([5]), Evaluation(t=t, ig=False, cfg=True), drift=True)
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
    r(0, torch.arange(3), torch.tensor([0, 1, 2]))
    evals = [e for s in r.plan.steps for e in s.evals]
    assert len(backend.calls) == len(evals)  # one network call per evaluation, in order
    for (rows, t, labels), ev in zip(backend.calls, evals):
        assert float(t[0]) == pytest.approx(ev.t, abs=1e-7)
        assert ev.cfg == (lo <= float(t[0]) <= hi)  # each call decides with its own time (no Heun corrector here)
        if ev.cfg:
            assert rows == 6 and labels[:3].tolist() == [0, 1, 2] and (labels[3:] == 10).all()
        else:
            assert rows == 3 and labels.tolist() == [0, 1, 2]
    assert {c[0] for c in backend.calls} == {3, 6}  # both regimes occurred


def test_ig_applies_only_inside_its_interval():
    """Run the scripted network (v_final = 2x + y/10, v_inter = x - 1) and check each Euler step's update."""
    g = GuidanceConfig(ig_scale=2.0, ig_interval=(0.6, 1.0))
    r, backend = runner("sit", g, solver=Solver.ODE_EULER, steps=4)
    got = r(0, torch.arange(2), torch.tensor([3, 7]))
    assert [float(t[0]) for _, t, _ in backend.calls] == [1.0, 0.75, 0.5, 0.25]
    # Recompute the run by hand: IG (w = 2) at t = 1 and 0.75, plain v_final at 0.5 and 0.25.
    from igengine.noise import gaussian
    x = gaussian(0, [0, 1], 0, TINY["sit"].latent_shape).double()
    yv = torch.tensor([0.3, 0.7], dtype=torch.float64).view(-1, 1, 1, 1)
    for t, use_ig in [(1.0, True), (0.75, True), (0.5, False), (0.25, False)]:
        x32 = x.float().double()
        vf, vi = 2 * x32 + yv, x32 - 1
        v = vi + 2.0 * (vf - vi) if use_ig else vf
        x = x + (-0.25) * v
    assert torch.allclose(got.double(), x, rtol=0, atol=1e-6)
    # And the opposite assignment gives a visibly different answer (the check can fail).
    x_wrong = gaussian(0, [0, 1], 0, TINY["sit"].latent_shape).double()
    for t in (1.0, 0.75, 0.5, 0.25):
        x32 = x_wrong.float().double()
        x_wrong = x_wrong + (-0.25) * (2 * x32 + yv)
    assert (got.double() - x_wrong).abs().max() > 1e-2


@pytest.mark.parametrize("family,solver,precision", [
    ("sit", Solver.SDE, Precision.REFERENCE),
    ("sit", Solver.ODE_HEUN, Precision.FP32),
    ("lightningdit", Solver.HEUN2, Precision.REFERENCE),
])
def test_final_latents_do_not_depend_on_batch_size(family, solver, precision):
    """Noise is bitwise batch-independent; only reassociation inside the network differs (<= 1e-5)."""
    model = tiny_model(family)
    g = GuidanceConfig(ig_scale=1.4, cfg_scale=1.5, cfg_interval=(0.2, 0.8))
    r = sampler_for(TorchBackend(model, precision=precision), SamplerConfig(solver=solver, steps=6, guidance=g,
                                                                           precision=precision))
    n = 8
    labels = torch.arange(n) % 10
    outs = {}
    for bs in (1, 3, 8):
        parts = [r(11, torch.arange(s, min(n, s + bs)), labels[s:s + bs]) for s in range(0, n, bs)]
        outs[bs] = torch.cat(parts)
    assert (outs[1] - outs[8]).abs().max() <= 1e-5
    assert (outs[3] - outs[8]).abs().max() <= 1e-5


def test_backend_max_batch_is_split_transparently():
    model = tiny_model("sit")
    g = GuidanceConfig(cfg_scale=1.5)
    cfg = SamplerConfig(solver=Solver.SDE, steps=4, guidance=g)
    whole = sampler_for(TorchBackend(model), cfg)(0, torch.arange(5), torch.arange(5))
    calls = []

    class Counting(TorchBackend):
        def __call__(self, x, t, y):
            calls.append(x.shape[0])
            return super().__call__(x, t, y)

    split = sampler_for(Counting(model, max_batch=3), cfg)(0, torch.arange(5), torch.arange(5))
    assert max(calls) == 3 and 1 in calls  # 10-row CFG calls arrive as 3 + 3 + 3 + 1
    assert (whole - split).abs().max() <= 1e-5


def test_nan_stops_with_step_and_indices():
    # Call 2 is step 2 of a CFG-free SDE run; row 1 of that batch is sample index 41.
    r, _ = runner("sit", GuidanceConfig(), steps=20, nan_at=(2, 1))
    with pytest.raises(NonFiniteError) as e:
        r(0, torch.tensor([40, 41, 42]), torch.tensor([0, 1, 2]))
    assert e.value.step == 2 and e.value.indices == [41]
    assert "step 2" in str(e.value) and "41" in str(e.value)


def test_cfg_without_null_row_is_refused():
    cfg = TINY["sit"].replace(class_dropout_prob=0.0)
    with pytest.raises(ConfigError, match="null-class"):
        sampler_for(ScriptedBackend(cfg), SamplerConfig(solver=Solver.SDE, steps=4, guidance=GuidanceConfig(cfg_scale=2)))


def test_a_network_of_another_precision_is_refused():
    """One precision per run: a bf16 network under a reference sampler is an error, not a mislabelled run."""
    backend = TorchBackend(tiny_model("sit"), precision=Precision.BF16)
    with pytest.raises(PrecisionMismatchError, match="bf16"):
        sampler_for(backend, SamplerConfig(solver=Solver.SDE, steps=4, precision=Precision.REFERENCE))
    assert sampler_for(backend, SamplerConfig(solver=Solver.SDE, steps=4, precision=Precision.BF16)).precision == "bf16"


def test_the_sampler_takes_its_randomness_as_an_argument():
    """A custom generator replaces the contract's (EDM2's randn_like pattern); the default is the contract."""
    from igengine.sampling.randomness import NUMPY, Randomness

    backend = ScriptedBackend(TINY["sit"])
    cfg = SamplerConfig(solver=Solver.SDE, steps=4)
    streams = []

    def doubled(seed, idx, stream, shape, device, dtype):
        streams.append(stream)
        return 2 * NUMPY(seed, idx, stream, shape, device, dtype)

    custom = sampler_for(backend, cfg, randomness=Randomness("doubled", doubled))
    assert custom.generator == "doubled" and custom.path == "reference"
    got = custom(0, torch.arange(2), torch.arange(2))
    assert streams == [0, 1, 2, 3]  # x_T, then the noise of SDE steps 0..2 (the last step is deterministic)
    ref = sampler_for(backend, cfg, randomness=NUMPY)(0, torch.arange(2), torch.arange(2))
    default = sampler_for(backend, cfg)(0, torch.arange(2), torch.arange(2))
    assert torch.equal(ref, default)  # the default (device) generator draws the contract's numbers
    assert (got - ref).abs().max() > 0.1  # and the custom one was really used


def test_tf32_flags_are_restored_after_a_call():
    backend = TorchBackend(tiny_model("sit"), precision=Precision.REFERENCE)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        x = torch.zeros(1, *TINY["sit"].latent_shape)
        backend(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        assert torch.backends.cudnn.allow_tf32 is True  # set only inside the call
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
