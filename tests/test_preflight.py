"""Checked before trusted (issue 18, item 2): the preflight compares each fast rung with the reference.

On the CPU the fast rungs are the CPU twin's fused loop and the compiled backend; the captured loop
exists on CUDA only (the GPU part skips with a reason). The embedded digits model is the run's own
model here, as ``igengine sample`` and ``igengine.load`` use it. A rung made wrong on purpose (its
fused step perturbed by a finite amount after the kernel ran) is demoted with one warning and a
manifest entry; rounding-level differences are not.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import igengine
from igengine.backends import TorchBackend, network
from igengine.config import Family, GuidanceConfig, Precision, SamplerConfig, Solver
from igengine.errors import JobError
from igengine.jobs.preflight import PREFLIGHT_CHOICES, EagerNetwork, fp32_network, preflight_sampler
from igengine.jobs.sample import DEFAULT_CHECKPOINT, SampleJob, run_sample
from igengine.sampling import ModelFacts, Sampler, build_plan, paper_sampler
from igengine.sampling import fused as fused_module
from igengine.sampling.preflight import (KERNEL_RTOL, SAMPLES, launches, preflight_plan, run_preflight,
                                         step_signature)
from tests.conftest import tiny_model

needs_digits = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")
STEPS = 12  # short digits runs: 12 SDE steps still hold CFG off, CFG on and the deterministic last step


# ------------------------------------------------------------------------------------------------
# The short plan
# ------------------------------------------------------------------------------------------------

PLANS = {
    "sit-sde-paper": (Family.SIT, paper_sampler(Family.SIT)),
    "sit-heun-ig-interval": (Family.SIT, SamplerConfig(solver=Solver.ODE_HEUN, steps=30, guidance=GuidanceConfig(
        cfg_scale=1.5, cfg_interval=(0.0, 0.7), ig_scale=1.4, ig_interval=(0.3, 0.8)))),
    "lightningdit-heun2-paper": (Family.LIGHTNINGDIT, paper_sampler(Family.LIGHTNINGDIT)),
    "lightningdit-euler-no-cfg": (Family.LIGHTNINGDIT, SamplerConfig(solver=Solver.EULER, steps=20, guidance=GuidanceConfig(
        cfg_scale=1.0, ig_scale=1.7))),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_the_short_plan_holds_every_kind_of_step_of_the_plan(name):
    family, cfg = PLANS[name]
    plan = build_plan(family, cfg)
    short = preflight_plan(plan)
    kinds = {step_signature(s) for s in plan.steps}
    assert {step_signature(s) for s in short.steps} == kinds
    index = [s.index for s in short.steps]
    assert index == sorted(set(index)) and index[:2] == [0, 1] and index[-1] == plan.steps[-1].index
    assert all(s is plan.steps[s.index] for s in short.steps), "the steps themselves: times, dt, noise streams"
    assert len(short.steps) <= 2 + len(kinds) + 1


def test_the_short_plans_cover_cfg_and_ig_on_and_off_sde_last_and_heun_correctors():
    sit = preflight_plan(build_plan(*PLANS["sit-heun-ig-interval"]))
    evals = {(ev.ig, ev.cfg) for s in sit.steps for ev in s.evals}
    assert evals == {(False, False), (False, True), (True, True), (True, False)}, "IG and CFG, each on and off"
    assert {s.kind.value for s in sit.steps} == {"heun", "euler"}, "Heun with its corrector, and the last Euler step"
    sde = preflight_plan(build_plan(*PLANS["sit-sde-paper"]))
    assert [s.kind.value for s in sde.steps][-1] == "sde-last" and "sde" in {s.kind.value for s in sde.steps}
    ldit = preflight_plan(build_plan(*PLANS["lightningdit-heun2-paper"]))
    assert any(s.evals[0].cfg != s.evals[1].cfg for s in ldit.steps), "a corrector that turns CFG on"


def test_the_cost_stated_in_the_docstring():
    """igengine/sampling/preflight.py states the check's FLOP share from these counts."""
    sit, ldit = (build_plan(f, paper_sampler(f)) for f in (Family.SIT, Family.LIGHTNINGDIT))
    assert [s.index for s in preflight_plan(sit).steps] == [0, 1, 78, 249]
    assert (preflight_plan(sit).network_rows, sit.network_rows) == (6, 422)
    assert [s.index for s in preflight_plan(ldit).steps] == [0, 1, 54, 55, 123]
    assert (preflight_plan(ldit).network_rows, ldit.network_rows) == (15, 387)
    share = 4 * SAMPLES * preflight_plan(sit).network_rows / (50_000 * sit.network_rows)
    assert share < 3e-6
    assert 4 * SAMPLES * preflight_plan(ldit).network_rows / (50_000 * ldit.network_rows) < 7e-6


# ------------------------------------------------------------------------------------------------
# The check on the CPU twin, with the digits model
# ------------------------------------------------------------------------------------------------

def _skew_fused_step(monkeypatch, delta):
    """The fused loop's step, made wrong: its output moved after the kernel ran (``delta``: a number,
    or 'ulp' for one float32 ulp away from zero)."""
    real = fused_module.fused_step

    def skewed(params, x, v_final, v_inter=None, *, x_out=None, **kwargs):
        real(params, x, v_final, v_inter, x_out=x_out, **kwargs)
        if x_out is not None:
            if delta == "ulp":
                x_out.copy_(torch.nextafter(x_out, x_out.sign() * float("inf")))
            else:
                x_out.add_(delta)

    monkeypatch.setattr(fused_module, "fused_step", skewed)


@needs_digits
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cpu_twin_passes_on_the_digits_model(twin_discovered, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = igengine.load(steps=STEPS, precision=precision)
    record = pipe.preflight
    assert pipe.sampler.path == "cpu-twin" and record["mode"] == "auto"
    (check,) = record["compared"]
    assert check["rung"] == "cpu-twin" and check["verdict"] == "pass"
    assert check["max_abs"] == 0.0, "the twin is bit-equal to the reference step (docs/CONTRACTS.md)"
    terms = check["bound_terms"]
    assert terms["launches"] == launches(preflight_plan(pipe.sampler.plan))
    assert check["bound"] == pytest.approx(KERNEL_RTOL * terms["launches"] * terms["scale"] + terms["e_lp"])
    if precision == "bf16":  # the bf16 rule: the network's own low-precision error, measured against fp32
        assert 1e-5 < record["low_precision_error"] == terms["e_lp"] < 0.1
    else:
        assert record["low_precision_error"] is None and terms["e_lp"] == 0.0
    kinds = {(s["kind"], s["cfg"][0]) for s in record["plan_steps"]}
    assert kinds == {("sde", False), ("sde", True), ("sde-last", True)}
    assert record["chosen"] == {"step": "cpu-twin", "kernels": "auto", "capture": "auto", "network": "as built"}
    assert record["flop_share"] is None, "igengine.load does not know how many samples will be drawn"
    assert record["seconds"] > 0 and record["network_rows"] == (3 if precision == "bf16" else 2) * SAMPLES * 6


@needs_digits
@pytest.mark.parametrize("precision, delta", [("fp32", 1e-3), ("bf16", 3e-2), ("fp16", 3e-2)])
def test_a_wrong_fused_step_is_demoted_to_the_reference_loop_with_one_warning(twin_discovered, monkeypatch,
                                                                             precision, delta):
    _skew_fused_step(monkeypatch, delta)
    with pytest.warns(RuntimeWarning) as rec:
        pipe = igengine.load(steps=STEPS, precision=precision)
    ours = [w for w in rec if "igengine preflight" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in rec]
    message = str(ours[0].message)
    assert "\n" not in message and "the cpu-twin step differs from the reference loop (same network) by" in message
    assert "the run uses the reference step instead" in message
    (check,) = pipe.preflight["compared"]
    assert check["verdict"] == "fail" and check["max_abs"] > check["bound"]
    assert pipe.preflight["chosen"]["step"] == "reference" and pipe.sampler.path == "reference"
    # What the run then draws is the reference loop's, untouched by the skewed kernel.
    want = Sampler(pipe.sampler.net, pipe.sampler.plan, pipe.sampler.facts, pipe.precision, "cpu", kernels="off")
    assert torch.equal(pipe.sample([1, 2], seed=4), want(4, [0, 1], [1, 2]))


@needs_digits
def test_rounding_level_differences_are_not_demoted(twin_discovered, monkeypatch):
    """One float32 ulp after every launch (what a GPU's step maths may differ by) stays within the bound."""
    _skew_fused_step(monkeypatch, "ulp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = igengine.load(steps=STEPS, precision="fp32")
    (check,) = pipe.preflight["compared"]
    assert check["verdict"] == "pass" and 0 < check["max_abs"] < check["bound"]


@needs_digits
def test_nothing_is_compared_or_drawn_where_the_run_has_no_fast_rung(monkeypatch):
    """The default CPU run (reference precision, torch backend) has no fast rung: the check costs nothing."""
    def no_sampling(*args, **kwargs):
        raise AssertionError("the preflight drew samples for a run without a fast rung")

    monkeypatch.setattr("igengine.sampling.preflight.Sampler.__call__", no_sampling)
    pipe = igengine.load(steps=STEPS)
    assert pipe.preflight["compared"] == [] and "nothing to compare" in pipe.preflight["note"]


@needs_digits
def test_preflight_off_trusts_the_fast_rung_unchecked(twin_discovered, monkeypatch):
    _skew_fused_step(monkeypatch, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = igengine.load(steps=STEPS, precision="fp32", preflight="off")
    assert pipe.preflight["mode"] == "off" and pipe.sampler.path == "cpu-twin"
    with pytest.raises(JobError, match="unknown `preflight` 'sometimes'; choose auto or off"):
        igengine.load(steps=STEPS, preflight="sometimes")


# ------------------------------------------------------------------------------------------------
# A run: the manifest entry, the setup time, the CLI flag
# ------------------------------------------------------------------------------------------------

@needs_digits
def test_a_run_records_the_preflight_and_its_seconds(twin_discovered, tmp_path):
    result = run_sample(SampleJob(out=tmp_path / "ok", n=4, steps=STEPS, precision=Precision.FP32, seed=5,
                                  labels="3"))
    m = result.manifest
    assert m["preflight"]["compared"][0]["verdict"] == "pass" and m["backend"]["step"] == "cpu-twin"
    assert m["timing"]["preflight_s"] == pytest.approx(m["preflight"]["seconds"], abs=2e-3)
    assert m["timing"]["preflight_s"] <= m["timing"]["setup_s"]
    assert m["preflight"]["flop_share"] == pytest.approx(
        m["preflight"]["network_rows"] / (4 * build_plan(Family.SIT, _digits_sampler(Precision.FP32)).network_rows),
        rel=1e-2)


def _digits_sampler(precision):
    from igengine.models.checkpoint import load_checkpoint
    from igengine.sampling import resolve_sampler

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    return replace(resolve_sampler(Family.SIT, precision, loaded.sampler_settings, None), steps=STEPS)


@needs_digits
def test_a_run_with_a_wrong_rung_samples_on_the_reference_loop_and_says_so(twin_discovered, tmp_path, monkeypatch):
    reference = run_sample(SampleJob(out=tmp_path / "ref", n=4, steps=STEPS, precision=Precision.FP32,
                                     preflight="off"))
    _skew_fused_step(monkeypatch, 1e-3)
    with pytest.warns(RuntimeWarning, match="igengine preflight: the cpu-twin step differs"):
        result = run_sample(SampleJob(out=tmp_path / "demoted", n=4, steps=STEPS, precision=Precision.FP32))
    m = result.manifest
    assert m["preflight"]["compared"][0]["verdict"] == "fail" and m["preflight"]["chosen"]["step"] == "reference"
    assert m["backend"]["step"] == "reference"
    assert json.loads((tmp_path / "demoted" / "manifest.json").read_text())["preflight"] == m["preflight"]
    # The fp32 reference loop and the (correct) twin agree bit for bit on this model: so do the samples.
    got = np.load(tmp_path / "demoted" / "samples.npz")["arr_0"]
    assert np.array_equal(got, np.load(tmp_path / "ref" / "samples.npz")["arr_0"])
    skipped = run_sample(SampleJob(out=tmp_path / "skipped", n=4, steps=STEPS, precision=Precision.FP32,
                                   preflight="off"))
    assert skipped.manifest["preflight"]["mode"] == "off" and skipped.manifest["backend"]["step"] == "cpu-twin"


def test_the_cli_choices_are_the_jobs_and_an_unknown_one_is_refused(tmp_path):
    from igengine import cli

    assert tuple(c.value for c in cli.PreflightChoice) == PREFLIGHT_CHOICES
    SampleJob(out=tmp_path, preflight="off").validate()
    with pytest.raises(JobError, match="unknown `preflight` 'never'; choose auto or off"):
        SampleJob(out=tmp_path, preflight="never").validate()


@needs_digits
def test_igengine_sample_preflight_off_in_the_manifest(tmp_path, capsys):
    from igengine.cli import main

    out = tmp_path / "run"
    assert main(["sample", "--n", "2", "--steps", "3", "--precision", "fp32", "--preflight", "off",
                 "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["preflight"]["mode"] == "off"


# ------------------------------------------------------------------------------------------------
# Both families, Heun, and the network rung (a tiny random model; no torch.compile)
# ------------------------------------------------------------------------------------------------

def _tiny_run(family_name, precision, solver, cfg_interval):
    model = tiny_model(family_name)
    backend = TorchBackend(model, precision=precision)
    family = model.config.family
    cfg = SamplerConfig(solver=solver, steps=10, precision=precision,
                        guidance=GuidanceConfig(cfg_scale=1.5, cfg_interval=cfg_interval, ig_scale=1.4))
    return backend, cfg, ModelFacts.of(model.config), build_plan(family, cfg)


CASES = [("sit", Solver.ODE_HEUN, (0.0, 0.7)), ("sit", Solver.SDE, (0.0, 0.7)),
         ("lightningdit", Solver.HEUN2, (0.3, 1.0)), ("lightningdit", Solver.EULER, (0.3, 1.0))]


@pytest.mark.parametrize("family_name, solver, interval", CASES)
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_every_kind_of_step_passes_and_a_wrong_one_fails(twin_discovered, monkeypatch, family_name, solver, interval,
                                                         precision):
    backend, cfg, facts, plan = _tiny_run(family_name, precision, solver, interval)
    fp32 = fp32_network(backend.model, precision, torch.device("cpu"))
    assert (fp32 is None) == (precision == Precision.FP32)
    ok = run_preflight(network(backend), plan, facts, precision, "cpu", fp32_net=fp32, run_samples=8)
    assert [c.rung for c in ok.checks] == ["cpu-twin"] and ok.checks[0].passed, ok.checks
    assert ok.checks[0].max_abs == 0.0 and ok.step_rung == "cpu-twin" and ok.warning is None
    _skew_fused_step(monkeypatch, 3e-2)
    bad = run_preflight(network(backend), plan, facts, precision, "cpu", fp32_net=fp32, run_samples=8)
    assert not bad.checks[0].passed and (bad.step_rung, bad.kernels) == ("reference", "off")
    assert bad.checks[0].max_abs > 3e-2 * 0.5, "the perturbation reaches the final state"


class _Wrong:
    """A network that returns the right outputs plus a finite error, as a miscompiled graph might."""

    def __init__(self, net, delta):
        self.net, self.delta, self.precision = net, delta, net.precision

    def __call__(self, x, t, y):
        v_final, v_inter = self.net(x, t, y)
        return v_final + self.delta, v_inter


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_the_network_rung_keeps_a_faithful_network_and_drops_a_wrong_one(twin_discovered, precision):
    backend, cfg, facts, plan = _tiny_run("sit", precision, Solver.SDE, (0.0, 0.7))
    eager = EagerNetwork(backend.model, precision)
    fp32 = fp32_network(backend.model, precision, torch.device("cpu"))
    same = run_preflight(network(backend), plan, facts, precision, "cpu", plain_net=eager, fp32_net=fp32,
                         network_rung=True)
    net_check = same.checks[0]
    assert net_check.rung == "compiled" and net_check.passed and same.network_ok, same.checks
    wrong = run_preflight(_Wrong(network(backend), 0.05), plan, facts, precision, "cpu", plain_net=eager,
                          fp32_net=fp32, network_rung=True)
    assert not wrong.checks[0].passed and not wrong.network_ok
    assert "the compiled network differs from the" in wrong.warning and "the eager network instead" in wrong.warning
    assert wrong.checks[1].passed, "the step rungs are then checked with the eager network the run will use"
    assert wrong.capture == "off" and "capture off" in wrong.notes[0], "an unchecked captured rung is not taken"


@needs_digits
def test_a_wrong_compiled_backend_is_replaced_by_the_eager_one(twin_discovered, monkeypatch):
    """The job's side of the network rung, without a compile: the compiled backend's calls replaced by
    the eager module's plus an error (its warm-up does nothing)."""
    from igengine.backends import compiled

    def call(self, x, t, y):
        v_final, v_inter = EagerNetwork(self.model, self.precision)(x, t, y)
        return v_final + 0.05, v_inter

    monkeypatch.setattr(compiled.CompiledBackend, "__call__", call)
    monkeypatch.setattr(compiled.CompiledBackend, "warmup", lambda self: setattr(self, "_compiles_at_warmup", 0))
    with pytest.warns(RuntimeWarning, match="the compiled network differs from the fp32 network") as rec:
        pipe = igengine.load(steps=STEPS, precision="bf16", backend="compiled")
    assert len([w for w in rec if "igengine preflight" in str(w.message)]) == 1
    assert pipe.preflight["chosen"]["network"].startswith("eager")
    assert pipe.sampler.net.backend.name == "torch" and pipe.sampler.path == "cpu-twin"


@pytest.mark.slow
@needs_digits
def test_the_compiled_backend_passes_on_the_digits_model(twin_discovered):
    """The real thing: torch.compile of the digits model at bf16 against its eager network and fp32."""
    pipe = igengine.load(steps=STEPS, precision="bf16", backend="compiled")
    checks = {c["rung"]: c for c in pipe.preflight["compared"]}
    assert checks["compiled"]["verdict"] == "pass" and checks["cpu-twin"]["verdict"] == "pass"
    assert pipe.sampler.net.backend.name == "compiled"
    assert pipe.sampler.net.backend.recompiles == 0, "the check's 2 and 4 rows are padded into the run's graphs"


# ------------------------------------------------------------------------------------------------
# CUDA: the captured rung
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the captured rung exists on CUDA only")
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_gpu_the_captured_and_fused_rungs_pass_and_a_wrong_one_is_demoted(monkeypatch, precision):
    backend, cfg, facts, plan = _tiny_run("lightningdit", precision, Solver.HEUN2, (0.3, 1.0))
    backend = TorchBackend(backend.model, precision=precision, device="cuda")
    fp32 = fp32_network(backend.model, precision, torch.device("cuda"))
    ok = run_preflight(network(backend), plan, facts, precision, "cuda", fp32_net=fp32)
    if not ok.checks:
        pytest.skip("no CUDA kernel library passed its self-test here (see igengine info)")
    assert [c.rung for c in ok.checks] == ["cuda-graph", "cuda"] and all(c.passed for c in ok.checks), ok.checks
    from igengine.sampling import captured

    real = captured.fused_step_indexed

    def skewed(table, counter, x, *args, **kwargs):
        real(table, counter, x, *args, **kwargs)
        x.add_(1e-2)

    monkeypatch.setattr(captured, "fused_step_indexed", skewed)
    bad = run_preflight(network(backend), plan, facts, precision, "cuda", fp32_net=fp32)
    assert [c.passed for c in bad.checks] == [False, True] and (bad.step_rung, bad.capture) == ("cuda", "off")
