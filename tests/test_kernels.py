"""The CPU twin of the fused kernels (csrc/) against the reference step, the noise contract and the reference loop.

The session fixture builds the twin with CMake (CUDA off) into build/kernels-test-cpu/, so CI really
compiles and exercises csrc/; without cmake or a C++ compiler the tests skip and say why.

Tolerance: the twin performs the reference's float32 operations in the reference's order with no
contraction (csrc/README.md), so it is asserted bit-equal (torch.equal) to the reference step and the
reference loop. The CUDA kernels (tests/test_kernels_gpu.py) are held to the contract of
docs/CONTRACTS.md instead: |fused - reference| <= 1e-6 * max(1, |reference|) per element.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from igengine.config import Family, GuidanceConfig, Precision, Solver
from igengine.kernels import abi, library
from igengine.kernels.binding import KernelInputError, fused_step, gaussian, philox_words
from igengine.sampling.launches import Phase, plan_launches, step_params
from igengine.noise import gaussian as ref_gaussian
from igengine.noise import philox4x32
from igengine.noise import philox_words as ref_philox_words

from tests import kernel_parity as P
from tests.conftest import sampler_for as make_sampler

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# The noise contract
# ------------------------------------------------------------------------------------------------

# Random123 known-answer vectors (kat_vectors, philox4x32 10 rounds): counter, key, result.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_twin_philox_matches_random123_known_answers(twin):
    ctr = np.array([c for c, _, _ in PHILOX_KAT], dtype=np.uint32)
    key = np.array([k for _, k, _ in PHILOX_KAT], dtype=np.uint32)
    want = np.array([r for _, _, r in PHILOX_KAT], dtype=np.uint32)
    np.testing.assert_array_equal(twin.philox_raw(ctr, key), want)


def test_twin_philox_matches_reference_on_random_counters(twin):
    rng = np.random.default_rng(7)
    ctr = rng.integers(0, 2**32, size=(4096, 4), dtype=np.uint64)
    key = rng.integers(0, 2**32, size=(4096, 2), dtype=np.uint64)
    np.testing.assert_array_equal(twin.philox_raw(ctr, key), philox4x32(ctr, key))


@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 5, 2**64 - 1])
@pytest.mark.parametrize("stream", [0, 1, 250, 2**32 - 1])
def test_twin_philox_words_equal_noise_contract(twin, seed, stream):
    indices = [0, 1, 17, 2**32 - 1, 2**32, 2**40 + 3]
    got = philox_words(seed, indices, stream, 9, library=twin)
    np.testing.assert_array_equal(got, ref_philox_words(seed, indices, stream, 9))


@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (2, 3, 3), (4, 8, 8), (4, 32, 32), (32, 16, 16)])
@pytest.mark.parametrize("stream", [0, 7, 2**32 - 1])
def test_twin_gaussians_bitwise_equal_noise_contract(twin, shape, stream):
    indices = [5, 0, 2**33 + 1]
    got = gaussian(99, indices, stream, shape, library=twin)
    want = ref_gaussian(99, indices, stream, shape)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} Gaussians differ"


def test_twin_gaussians_do_not_depend_on_the_batch(twin):
    together = gaussian(3, [10, 11, 12], 4, (3, 5, 5), library=twin)
    alone = gaussian(3, [11], 4, (3, 5, 5), library=twin)
    assert torch.equal(together[1], alone[0])


# ------------------------------------------------------------------------------------------------
# The fused step against the reference loop's step
# ------------------------------------------------------------------------------------------------

CASES = P.step_cases()


def _assert_parity(case, got, ref):
    """The twin is bit-faithful: every output the reference has is equal to the bit."""
    differ = {k: P.rel_err(got[k], ref[k]) for k in ref if not torch.equal(got[k].cpu(), ref[k].cpu())}
    assert not differ, f"{case.id}: outputs not bit-equal to the reference (relative errors {differ})"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fused_step_is_bit_equal_to_the_reference_step(twin, case):
    inp = P.make_inputs(case)
    ref = P.reference(case, inp)
    got = P.fused(case, inp, library=twin)
    _assert_parity(case, got, ref)
    assert torch.equal(got["first_bad"], torch.full((case.n,), -1)), "finite rows were flagged"


@pytest.mark.parametrize("case", [
    P.Case(Family.SIT, "sde", True, True, True, n=2, shape=(4, 4, 4)),
    P.Case(Family.SIT, "heun", True, True, False, n=1, shape=(3, 5, 5), cfg2=True),
    P.Case(Family.LIGHTNINGDIT, "heun", True, False, True, torch.bfloat16, n=3, shape=(4, 4, 4), cfg2=True),
], ids=lambda c: c.id)
def test_fused_step_in_place_update_matches_reference(twin, case):
    inp = P.make_inputs(case)
    _assert_parity(case, P.fused(case, inp, library=twin, in_place=True), P.reference(case, inp))


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_fused_step_on_misaligned_rows_takes_the_scalar_path_and_matches(twin, offset):
    case = P.Case(Family.SIT, "sde", True, True, True, torch.float32, n=3, shape=(4, 4, 4), x_offset=offset)
    inp = P.make_inputs(case)
    _assert_parity(case, P.fused(case, inp, library=twin), P.reference(case, inp))


@pytest.mark.parametrize("case", [
    P.Case(Family.SIT, "sde", True, True, True, torch.float32, n=5, shape=(4, 64, 64)),
    P.Case(Family.LIGHTNINGDIT, "heun", True, True, True, torch.float16, n=3, shape=(32, 29, 29), cfg2=True),
], ids=lambda c: c.id)
def test_fused_step_multithreaded_launch_matches_reference(twin, case):
    # n * E >= 2^16 elements: the twin splits the launch over threads.
    inp = P.make_inputs(case)
    _assert_parity(case, P.fused(case, inp, library=twin), P.reference(case, inp))


@pytest.mark.parametrize("kind", ["sde", "euler", "heun"])
def test_fused_step_flags_the_first_non_finite_step_per_row(twin, kind):
    case = P.Case(Family.SIT, kind, True, True, False, n=3, shape=(3, 3, 3), cfg2=True)
    inp = P.make_inputs(case)
    vf, vi = inp.outputs[-1]
    vf = vf.clone()
    vf[1, 2, 1, 0] = float("nan")  # row 1 (conditional half)
    inp.outputs[-1] = (vf, vi)
    got = P.fused(case, inp, library=twin)
    assert got["first_bad"].tolist() == [-1, case.step_index, -1]
    # An earlier flag is kept.
    n, e = case.n, 27
    x = inp.x.reshape(n, e).clone()
    flags = torch.tensor([-1, 1, -1])
    p = step_params(case.family, P.sampler_config(case).guidance, inp.step,
                    phase=Phase.CORRECT if kind == "heun" else Phase.SINGLE, seed=1)
    k1 = torch.zeros_like(x)
    fused_step(p, x, vf, vi, indices=inp.indices, k1=k1 if kind == "heun" else None, x_out=torch.empty_like(x),
               first_bad=flags, library=twin)
    assert flags.tolist() == [-1, 1, -1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_upcasts_every_16_bit_pattern_exactly(twin, dtype):
    # Euler from x = -0.0 with dt = 1 returns v itself (-0 + v == v, signed zeros included):
    # all 65536 patterns (subnormals, Inf, NaN, -0).
    from igengine.sampling.plan import Evaluation, Step, StepKind

    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(4, -1).contiguous()
    step = Step(index=0, kind=StepKind.EULER, t_cur=0.0, t_next=1.0, dt=1.0, evals=(Evaluation(0.0, False, False),))
    p = step_params(Family.LIGHTNINGDIT, GuidanceConfig(), step)
    x = torch.full((4, v.shape[1]), -0.0)
    out = torch.empty_like(x)
    fused_step(p, x, v, None, x_out=out, library=twin)
    want = v.float()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.equal(out[fin].view(torch.int32), want[fin].view(torch.int32)), "upcast differs (sign of zero included)"


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, never a crash or a silent wrong result
# ------------------------------------------------------------------------------------------------

def _sde_args(n=2, e=12, cfg=True):
    case = P.Case(Family.SIT, "sde", True, cfg, False, n=n, shape=(3, 2, 2))
    inp = P.make_inputs(case)
    p = step_params(Family.SIT, P.sampler_config(case).guidance, inp.step, seed=0)
    vf, vi = inp.outputs[0]
    x = inp.x.reshape(n, e).contiguous()
    return p, x, vf, vi, inp.indices


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(x=a["x"].double()), "x has dtype float64"),
    (lambda a: a.update(v_final=a["v_final"][: a["x"].shape[0]]), "v_final has shape"),
    (lambda a: a.update(v_final=a["v_final"].double(), v_inter=a["v_inter"].double()), "v_final has dtype float64"),
    (lambda a: a.update(v_inter=a["v_inter"].half()), "v_inter has dtype float16"),
    (lambda a: a.update(v_inter=None), "v_inter is None"),
    (lambda a: a.update(indices=None), "pass the sample indices"),
    (lambda a: a.update(indices=a["indices"].int()), "indices has dtype int32"),
    (lambda a: a.update(indices=-a["indices"] - 1), "`indices` must be >= 0"),
    (lambda a: a.update(x_out=None), "writes x_out"),
    (lambda a: a.update(x_out=torch.empty(3, 12)), "x_out has shape"),
    (lambda a: a.update(v_final=a["v_final"].transpose(2, 3)), "v_final is not contiguous"),
    (lambda a: a.update(x=a["x"].t().contiguous().t()), "x is not contiguous"),
    (lambda a: a.update(v_final=a["v_final"].to("meta")), "v_final is on meta"),
    (lambda a: a.update(net_out=a["v_final"].reshape(4, 12)[2:]), "net_out overlaps v_final"),
    (lambda a: a.update(x_out=a["x"][:, :].view(2, 12), net_out=torch.empty(2, 12)), None),  # x_out is x: allowed
], ids=["x-float64", "v-rows", "v-float64", "v-inter-dtype", "v-inter-missing", "indices-missing", "indices-int32",
        "indices-negative", "x-out-missing", "x-out-shape", "v-non-contiguous", "x-non-contiguous", "v-device",
        "net-out-overlaps-v", "x-out-is-x-allowed"])
def test_binding_rejects_bad_inputs_with_clear_errors(twin, mutate, message):
    p, x, vf, vi, idx = _sde_args()
    args = dict(x=x, v_final=vf, v_inter=vi, indices=idx, x_out=torch.empty_like(x), net_out=None)
    mutate(args)
    if message is None:
        fused_step(p, library=twin, **args)
        return
    with pytest.raises(KernelInputError, match=message):
        fused_step(p, library=twin, **args)


def test_binding_rejects_overlapping_outputs(twin):
    p, x, vf, vi, idx = _sde_args()
    buf = torch.empty(3, 12)
    with pytest.raises(KernelInputError, match="overlaps"):
        fused_step(p, x, vf, vi, indices=idx, x_out=buf[:2], net_out=buf[1:], library=twin)


def test_binding_requires_heun_buffers(twin):
    case = P.Case(Family.LIGHTNINGDIT, "heun", False, False, False, n=2, shape=(3, 2, 2))
    inp = P.make_inputs(case)
    g = P.sampler_config(case).guidance
    x = inp.x.reshape(2, 12)
    vf, vi = inp.outputs[0]
    with pytest.raises(KernelInputError, match="k1_out"):
        fused_step(step_params(case.family, g, inp.step, phase=Phase.PREDICT), x, vf, vi, library=twin)
    with pytest.raises(KernelInputError, match="needs k1"):
        fused_step(step_params(case.family, g, inp.step, phase=Phase.CORRECT), x, vf, vi, x_out=x, library=twin)
    with pytest.raises(ValueError, match="Heun step"):
        step_params(case.family, g, inp.step)


def test_c_side_validation_reports_instead_of_crashing(twin):
    p, x, vf, vi, idx = _sde_args()
    buffers = abi.StepBuffers(x=x.data_ptr(), v_final=vf.data_ptr(), v_inter=vi.data_ptr(), indices=None,
                              x_out=x.data_ptr(), n=2, e=12, v_dtype=0)
    with pytest.raises(library.KernelError, match="ERR_NULL.*indices"):
        twin.step(p, buffers)
    buffers.indices = idx.data_ptr()
    buffers.v_dtype = 7
    with pytest.raises(library.KernelError, match="ERR_DTYPE"):
        twin.step(p, buffers)
    buffers.v_dtype = 0
    buffers.n = 0
    with pytest.raises(library.KernelError, match="ERR_SIZE"):
        twin.step(p, buffers)


def test_step_params_round_the_reference_scalars_like_torch(twin):
    # torch multiplies a float32 tensor by a Python float rounded to float32; the params hold those.
    case = P.Case(Family.SIT, "sde", True, True, False)
    step = P.make_inputs(case).step
    p = step_params(Family.SIT, GuidanceConfig(ig_scale=1.4, cfg_scale=1.35), step, seed=2**40 + 9)
    t = step.t_cur
    assert p.ig_w == np.float32(1.4) and p.cfg_w == np.float32(1.35)
    assert p.score_var == np.float32(t * t - ((1.0 - t) / -1.0) * t) and p.dt == np.float32(step.dt)
    assert p.sqrt_diffusion == np.float32(np.sqrt(2.0 * t)) and p.sqrt_abs_dt == np.float32(np.sqrt(abs(step.dt)))
    assert (p.seed_lo, p.seed_hi, p.noise_stream) == (9, 2**8, step.noise_stream)
    pl = step_params(Family.LIGHTNINGDIT, GuidanceConfig(ig_scale=1.4), P.make_inputs(
        P.Case(Family.LIGHTNINGDIT, "euler", True, False, False)).step)
    assert pl.ig_w == np.float32(1.4 - 1.0)
    with pytest.raises(ValueError, match="seed"):
        step_params(Family.SIT, GuidanceConfig(), step, seed=2**64)


# ------------------------------------------------------------------------------------------------
# Loading: lazy, never failing, falling back to the reference path
# ------------------------------------------------------------------------------------------------

def test_import_loads_no_library_and_never_touches_cuda():
    code = ("import sys, igengine, igengine.kernels as K; "
            "assert 'igengine.kernels.library' not in sys.modules; "
            "assert not any('igengine_kernels' in str(m) for m in sys.modules.values() if m); "
            "import torch; assert not torch.cuda.is_initialized(); "
            "print(K.kernel_path())")
    env = dict(os.environ, IGENGINE_KERNELS_DIR="/nonexistent", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("cpu-twin", "cuda", "reference")


def test_missing_library_reports_the_reference_path(tmp_path, monkeypatch):
    monkeypatch.setattr(library, "DEFAULT_DIR", tmp_path / "none")
    monkeypatch.setenv(library.ENV_DIR, str(tmp_path))
    library._reset_for_tests()
    try:
        assert library.kernel_path("cpu") == "reference"
        status = library.describe()["cpu"]
        assert status["state"] == "missing" and "python -m igengine.kernels.build" in status["detail"]
    finally:
        library._reset_for_tests()


def test_disabled_kernels_report_the_reference_path(twin_discovered, monkeypatch):
    assert library.kernel_path("cpu") == "cpu-twin"
    monkeypatch.setenv(library.ENV_SWITCH, "off")
    library._reset_for_tests()
    assert library.kernel_path("cpu") == "reference"
    assert library.describe()["cpu"]["state"] == "disabled"


def test_foreign_library_file_falls_back_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / library.library_filename(library.CPU_STEM)).write_bytes(b"not a shared library")
    monkeypatch.setenv(library.ENV_DIR, str(tmp_path))
    library._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="using the reference PyTorch path"):
            assert library.cpu_library() is None
        assert library.describe()["cpu"]["state"] == "unusable"
    finally:
        library._reset_for_tests()


# ------------------------------------------------------------------------------------------------
# The fused loop end to end on a tiny random IG DiT
# ------------------------------------------------------------------------------------------------

RUNS = P.E2E_RUNS
tiny_backend = P.tiny_backend
e2e_sampler = P.e2e_sampler


@pytest.mark.parametrize("name, solver, cfg_interval, shift", RUNS, ids=[f"{r[0]}-{r[1].value}" for r in RUNS])
def test_fused_loop_is_bit_equal_to_the_reference_loop(twin_discovered, name, solver, cfg_interval, shift):
    from igengine.sampling.fused import fused_step_once
    from igengine.sampling.loop import reference_step
    from igengine.sampling.randomness import NUMPY

    backend = tiny_backend(name)
    cfg = e2e_sampler(solver, cfg_interval, shift)
    fused = make_sampler(backend, cfg)
    reference = make_sampler(backend, cfg, kernels="off")
    assert fused.path == "cpu-twin" and reference.path == "reference"
    flags = [(ev.cfg, ev.ig) for s in fused.plan.steps for ev in s.evals]
    assert {f[0] for f in flags} == {True, False}, "the CFG interval must switch inside the run"
    assert {f[1] for f in flags} == {True, False}, "the IG interval must switch inside the run"
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    ref = reference(5, indices, labels)
    got = fused(5, indices, labels)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(got, ref), P.rel_err(got, ref)
    # One step from the same state through the fused code and the reference code.
    step = fused.plan.steps[2]
    a = fused_step_once(fused.net, fused.plan, fused.facts, step, ref, labels, 5, indices, twin_discovered)
    b = reference_step(reference.net, reference.plan, reference.facts, step, ref, labels, 5, indices, NUMPY)
    assert torch.equal(a, b)


def test_fused_loop_with_a_bf16_network_is_bit_equal_to_the_reference_loop(twin_discovered):
    backend = tiny_backend("SiT-S/2", Precision.BF16)
    cfg = e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, precision=Precision.BF16)
    indices, labels = torch.tensor([0, 1]), torch.tensor([4, 5])
    ref = make_sampler(backend, cfg, kernels="off")(1, indices, labels)
    assert torch.equal(make_sampler(backend, cfg)(1, indices, labels), ref)


def test_reference_precision_takes_the_plain_loop_with_float64_state(twin_discovered):
    """`reference` keeps SiT's float64 state: the fused kernels (float32 state) must not run it.

    Checked by its numbers: the reference run differs from the fp32 fused run of the same network by
    more than float32 rounding can explain away as identical, and equals an explicit float64 run.
    """
    backend = tiny_backend("SiT-S/2", Precision.REFERENCE)
    cfg = e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, precision=Precision.REFERENCE, steps=4)
    sampler = make_sampler(backend, cfg)
    assert sampler.path == "reference" and sampler.numerics.state_dtype == torch.float64
    indices, labels = torch.tensor([0, 1]), torch.tensor([4, 5])
    got = sampler(1, indices, labels)
    fp32_backend = tiny_backend("SiT-S/2", Precision.FP32)
    fp32 = make_sampler(fp32_backend, e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, precision=Precision.FP32, steps=4))
    assert fp32.path == "cpu-twin"
    other = fp32(1, indices, labels)
    assert not torch.equal(got, other) and (got - other).abs().max() < 1e-4  # float64 vs float32 state
    assert make_sampler(tiny_backend("SiT-S/2"), e2e_sampler(Solver.SDE, (0, 1), 0), kernels="off").path == "reference"


class _NaNInjector:
    """Wraps a backend and poisons one row of v_final at one network call."""

    def __init__(self, inner, call: int, row: int):
        self.inner, self.call, self.row, self.calls = inner, call, row, 0
        self.name, self.config, self.device, self.max_batch = "nan", inner.config, inner.device, None
        self.precision = inner.precision

    def __call__(self, x, t, y):
        vf, vi = self.inner(x, t, y)
        if self.calls == self.call:
            vf = vf.clone()
            vf[self.row] = float("nan")
        self.calls += 1
        return vf, vi

    def describe(self):
        return {}


@pytest.mark.parametrize("solver", [Solver.SDE, Solver.ODE_HEUN])
def test_fused_loop_reports_non_finite_like_the_reference_loop(twin_discovered, solver):
    from igengine.errors import NonFiniteError

    cfg = e2e_sampler(solver, (0.0, 0.7), 0.0)
    indices, labels = torch.tensor([7, 8, 9]), torch.tensor([1, 2, 3])
    errors = []
    for kernels, path in (("off", "reference"), ("auto", "cpu-twin")):
        backend = _NaNInjector(tiny_backend("SiT-S/2"), call=5, row=1)
        sampler = make_sampler(backend, cfg, kernels=kernels)
        assert sampler.path == path
        with pytest.raises(NonFiniteError) as info:
            sampler(2, indices, labels)
        errors.append((info.value.step, info.value.indices))
    assert errors[0] == errors[1] and errors[0][1] == [8]


def test_plan_launches_duplicate_exactly_when_the_next_evaluation_uses_cfg():
    from igengine.sampling.plan import build_plan

    sampler = e2e_sampler(Solver.HEUN2, (0.19, 1.0), 0.3, steps=12)
    plan = build_plan(Family.LIGHTNINGDIT, sampler)
    launches = plan_launches(plan, seed=0)
    evals = [ev for s in plan.steps for ev in s.evals]
    dups = [p.dup_next for sl in launches for p in sl.launches]
    assert dups == [int(ev.cfg) for ev in evals[1:]] + [0]
    assert launches[-1].rows_next == 0
