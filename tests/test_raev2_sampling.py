"""RAEv2's sampler semantics (nanovisionx/RAEv2 src/stage2/transport/sampler.py, src/utils/guidance_utils.py):
the shifted float32 Euler grid, guidance on x-predictions with inclusive float32 intervals, the separate
unconditional IG scale and its IG-on rule, v = (x_t - x_hat) / max(t, 0.05), and the paper preset.

The expected values are written out here from the formulas (float32 numpy), not taken from igengine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from igengine.config import Family, GuidanceConfig, ModelConfig, Precision, SamplerConfig, SamplerSettings, Solver
from igengine.errors import ConfigError
from igengine.models import preset
from igengine.noise import STREAM_INITIAL, gaussian
from igengine.sampling import ModelFacts, build_plan, paper_sampler, resolve_sampler
from igengine.sampling.loop import run_reference
from igengine.sampling.randomness import default_randomness

SHAPE = (8, 4, 4)
FACTS = ModelFacts(Family.RAEV2, SHAPE, 10)


def plan_of(steps=10, shift=8.0, **g):
    return build_plan(Family.RAEV2, SamplerConfig(solver=Solver.EULER, steps=steps, timestep_shift=shift,
                                                  guidance=GuidanceConfig(**g)))


def official_grid(steps: int, shift: float) -> np.ndarray:
    t = torch.linspace(1.0, 0.0, steps + 1).numpy()  # the official grid: torch's float32 linspace
    s = np.float32(shift)
    return (s * t) / (np.float32(1) + (s - np.float32(1)) * t)


def test_paper_preset_is_the_released_config():
    p = paper_sampler(Family.RAEV2)
    assert (p.solver, p.steps, p.timestep_shift) == (Solver.EULER, 100, 8.0)
    assert (p.guidance.ig_scale, p.guidance.ig_interval, p.guidance.cfg_scale) == (1.78, (0.10, 1.0), 1.0)
    # the shift follows the latent: sqrt(C H W / 4096)
    assert paper_sampler(Family.RAEV2, (16, 32, 32)).timestep_shift == pytest.approx(math.sqrt(16 * 32 * 32 / 4096))
    assert resolve_sampler(Family.RAEV2, Precision.REFERENCE, None, SamplerSettings(timestep_shift=3.0),
                           (1024, 16, 16)).timestep_shift == 3.0


def test_grid_is_the_shifted_float32_linspace_with_no_special_last_step():
    plan = plan_of(steps=100, ig_scale=1.78, ig_interval=(0.10, 1.0))
    grid = official_grid(100, 8.0)
    assert [s.t_cur for s in plan.steps] == [float(v) for v in grid[:-1]]
    assert [s.t_next for s in plan.steps] == [float(v) for v in grid[1:]]
    # x - h v with h = t_i - t_{i+1} (float32) equals x + dt v with dt = -h exactly
    assert [s.dt for s in plan.steps] == [-float(np.float32(a - b)) for a, b in zip(grid[:-1], grid[1:])]
    assert all(s.kind.value == "euler" and len(s.evals) == 1 for s in plan.steps)
    assert plan.steps[-1].t_cur == pytest.approx(0.0748, abs=1e-4)  # the smallest time evaluated
    # IG on exactly where 0.10 <= t (float32), i.e. every step but the last at 100 steps
    assert [e.ig for s in plan.steps for e in s.evals] == [bool(t >= np.float32(0.10)) for t in grid[:-1]]
    assert plan.network_rows == 100  # CFG off: unconditional rows are never computed


def test_intervals_are_inclusive_float32_comparisons():
    grid = official_grid(10, 8.0)
    lo, hi = float(grid[6]), float(grid[2])  # bounds equal to grid times: both ends included
    plan = plan_of(ig_scale=1.5, ig_interval=(lo, hi), cfg_scale=2.0, cfg_interval=(lo, hi))
    on = [2 <= i <= 6 for i in range(10)]
    assert [s.evals[0].ig for s in plan.steps] == on
    assert [s.evals[0].cfg for s in plan.steps] == on
    assert plan.network_rows == 10 + sum(on)


@pytest.mark.parametrize("ig, uncond, on", [(1.0, None, False), (1.2, None, True), (1.0, 1.3, True),
                                            (0.8, 1.0, False), (0.8, 0.5, True), (1.0, 1.0, False)])
def test_ig_on_rule_follows_the_official_use_ig(ig, uncond, on):
    plan = plan_of(ig_scale=ig, ig_scale_uncond=uncond)
    assert all(s.evals[0].ig == on for s in plan.steps)


def test_unconditional_scale_is_raev2_only():
    for family, solver in ((Family.SIT, Solver.SDE), (Family.LIGHTNINGDIT, Solver.HEUN2)):
        with pytest.raises(ConfigError, match="RAEv2 models only"):
            build_plan(family, SamplerConfig(solver=solver, steps=4, guidance=GuidanceConfig(ig_scale_uncond=1.2)))


def test_records_of_other_families_do_not_grow():
    """RAEv2's optional fields stay out of the records (and so the run keys) of runs that do not set them."""
    g = GuidanceConfig(ig_scale=1.4).to_dict()
    assert "ig_scale_uncond" not in g and "ig_scale_uncond" not in SamplerConfig(Solver.SDE, 5).to_dict()["guidance"]
    assert not {"head_depth", "time_tokens"} & set(preset("SiT-XL/2").to_dict())
    assert GuidanceConfig(ig_scale_uncond=1.2).to_dict()["ig_scale_uncond"] == 1.2
    assert GuidanceConfig.from_dict(GuidanceConfig(ig_scale_uncond=1.2).to_dict()).ig_scale_uncond == 1.2
    assert ModelConfig.from_dict(preset("RAEv2-XL").to_dict()) == preset("RAEv2-XL")


class XPredNet:
    """A deterministic stand-in network: distinct full and base x-predictions, dependent on x, t and y."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(SHAPE[0], SHAPE[0], generator=g) * 0.3
        self.b = torch.randn(SHAPE[0], SHAPE[0], generator=g) * 0.3
        self.emb = torch.randn(11, SHAPE[0], generator=g)
        self.rows = []

    def __call__(self, x, t, y):
        self.rows.append(x.shape[0])
        c = self.emb[y][:, :, None, None] * t.view(-1, 1, 1, 1)
        full = torch.einsum("nchw,cd->ndhw", x, self.a) + c
        base = torch.einsum("nchw,cd->ndhw", x, self.b) - 0.5 * c
        return full, base


def official_euler(net, z, y, steps, shift, ig, ig_iv, cfg, cfg_iv, uncond):
    """The official loop, written from its formulas: float32 state, guidance on x-predictions, then
    d = (x - x_hat) / clamp_min(t, 0.05) and x <- x - (t_i - t_{i+1}) d."""
    grid = torch.from_numpy(official_grid(steps, shift))
    use_ig = ig > 1 or (uncond is not None and uncond != 1)
    uncond = ig if uncond is None else uncond
    x = z.clone()
    n = len(y)
    for i in range(steps):
        t = torch.full((n,), grid[i].item())
        full, base = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))
        in_ig = bool((t[0] >= ig_iv[0]) & (t[0] <= ig_iv[1])) and use_ig
        c = base[:n] + ig * (full[:n] - base[:n]) if in_ig else full[:n]
        u = base[n:] + uncond * (full[n:] - base[n:]) if in_ig else full[n:]
        in_cfg = cfg > 1 and bool((t[0] >= cfg_iv[0]) & (t[0] <= cfg_iv[1]))
        x_hat = u + cfg * (c - u) if in_cfg else c
        d = (x - x_hat) / t.view(-1, 1, 1, 1).clamp_min(0.05)
        x = x - (grid[i] - grid[i + 1]) * d
    return x


@pytest.mark.parametrize("g", [
    dict(ig_scale=1.78, ig_interval=(0.10, 1.0)),
    dict(ig_scale=1.5, ig_interval=(0.5, 0.95), ig_scale_uncond=1.2, cfg_scale=1.6, cfg_interval=(0.6, 0.98)),
    dict(ig_scale=1.0, ig_scale_uncond=1.3, cfg_scale=1.4),
    dict(cfg_scale=1.5, cfg_interval=(0.0, 0.9)),
])
def test_reference_loop_reproduces_the_official_loop(g):
    net = XPredNet()
    seed, idx, y = 3, torch.arange(3), torch.tensor([1, 4, 9])
    z = gaussian(seed, idx, STREAM_INITIAL, SHAPE)
    plan = plan_of(steps=12, **g)
    guidance = GuidanceConfig(**g)
    ours = run_reference(net, plan, FACTS, seed, idx, y, state_dtype=torch.float32, device=torch.device("cpu"),
                         randn=default_randomness("cpu").randn)
    ref = official_euler(XPredNet(), z, y, 12, 8.0, guidance.ig_scale, guidance.ig_interval, guidance.cfg_scale,
                         guidance.cfg_interval, guidance.ig_scale_uncond)
    # The official loop always computes both halves; igengine skips the unconditional one outside CFG, which
    # changes no number: the comparison is exact.
    assert torch.equal(ours, ref)
    assert sum(net.rows) == 3 * plan.network_rows


def test_unconditional_scale_changes_only_what_it_should():
    net = XPredNet()
    seed, idx, y = 3, torch.arange(2), torch.tensor([1, 4])
    run = lambda **g: run_reference(net, plan_of(steps=6, **g), FACTS, seed, idx, y, state_dtype=torch.float32,
                                    device=torch.device("cpu"), randn=default_randomness("cpu").randn)
    same = run(ig_scale=1.5, cfg_scale=2.0)
    assert torch.equal(same, run(ig_scale=1.5, cfg_scale=2.0, ig_scale_uncond=1.5))
    assert not torch.equal(same, run(ig_scale=1.5, cfg_scale=2.0, ig_scale_uncond=1.1))
    # without CFG the unconditional rows are never computed, so their scale cannot matter
    assert torch.equal(run(ig_scale=1.5), run(ig_scale=1.5, ig_scale_uncond=1.1))
