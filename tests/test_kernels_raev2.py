"""RAEv2's step in the fused kernels (CPU twin): x-prediction guidance and velocity, bit for bit with the reference.

RAEv2 (``igengine.sampling.loop.raev2_velocity``) guides x-predictions, not velocities: IG on each half
with its own scale (the unconditional rows with ``GuidanceConfig.uncond_ig_scale``), CFG on the guided
predictions, and only then ``v = (x - x_hat) / max(t, 0.05)``, a true division, then Euler. One launch
of family ``IGK_FAMILY_RAEV2`` does all of it (csrc/igk_math.h). The case matrix every family shares
(tests/kernel_parity.py ``KINDS``: IG/CFG on and off, next-input duplication, fp32/bf16/fp16 outputs,
odd element counts) runs in tests/test_kernels.py and tests/test_captured.py; here is what is RAEv2's
own, whole RAEv2 plans through the fused and the captured loops, and the ABI version it needed.

The twin is asserted bit-equal (torch.equal): it performs the reference's float32 operations in the
reference's order without contraction.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch

from igengine.config import Family, GuidanceConfig, Precision
from igengine.kernels import abi, library
from igengine.kernels.binding import KernelInputError, fused_step, fused_step_indexed, pack_table
from igengine.sampling import Sampler
from igengine.sampling.captured import run_captured
from igengine.sampling.fused import run_fused
from igengine.sampling.launches import Phase, plan_launches, step_params
from igengine.sampling.loop import reference_step, run_reference
from igengine.sampling.plan import Evaluation, Step, StepKind, build_plan
from igengine.sampling.updates import RAEV2_T_EPS
from igengine.sampling.randomness import NUMPY

from tests import kernel_parity as P
from tests.fake_graphs import FakeGraphs

R = Family.RAEV2


def _assert_parity(case, got, ref):
    differ = {k: P.rel_err(got[k], ref[k]) for k in ref if not torch.equal(got[k].cpu(), ref[k].cpu())}
    assert not differ, f"{case.id}: outputs not bit-equal to the reference (relative errors {differ})"


# ------------------------------------------------------------------------------------------------
# One step against the reference step
# ------------------------------------------------------------------------------------------------

STEP_CASES = [
    P.Case(R, "euler", True, False, False),                                    # IG only
    P.Case(R, "euler", True, True, True),                                      # IG + CFG, unconditional scale 1.9
    P.Case(R, "euler", True, True, False, ig_scale_uncond=None),               # IG + CFG, one scale for both halves
    P.Case(R, "euler", True, True, True, ig_scale_uncond=0.7),                 # an unconditional scale below 1
    P.Case(R, "euler", False, True, True),                                     # CFG without IG
    P.Case(R, "euler", False, False, False),                                   # neither
    P.Case(R, "euler", True, True, True, n=3, shape=(3, 3, 3)),                # 27 elements: a tail of 3
    P.Case(R, "euler", True, True, False, n=2, shape=(1, 1, 1)),               # one partial block
    P.Case(R, "euler", True, False, True, n=2, shape=(5, 7, 7)),               # 245 elements
    P.Case(R, "euler", True, True, True, n=2, shape=(4, 4, 4)),                # whole blocks: vectorised
    P.Case(R, "euler", True, True, True, torch.bfloat16, n=2, shape=(3, 5, 5)),
    P.Case(R, "euler", True, True, False, torch.bfloat16, n=3, shape=(4, 4, 4)),
    P.Case(R, "euler", True, True, True, torch.float16, n=2, shape=(3, 5, 5)),
    P.Case(R, "euler", True, True, True, t=0.03),                              # below t_eps: divides by 0.05
    P.Case(R, "euler", True, True, True, t=RAEV2_T_EPS),
    P.Case(R, "euler", True, True, True, t=1.0),                               # the first step
    P.Case(R, "euler", True, True, True, n=3, shape=(4, 4, 4), x_offset=1),    # misaligned x: scalar path
    P.Case(R, "euler", True, True, True, n=5, shape=(16, 32, 32)),             # n E >= 2^16: threaded launch
]


@pytest.mark.parametrize("case", STEP_CASES, ids=[c.id for c in STEP_CASES])
def test_fused_raev2_step_is_bit_equal_to_the_reference_step(twin, case):
    inp = P.make_inputs(case)
    ref = P.reference(case, inp)
    _assert_parity(case, P.fused(case, inp, library=twin), ref)
    _assert_parity(case, P.fused(case, inp, library=twin, in_place=True), ref)
    got = P.fused_indexed(case, inp, library=twin)
    _assert_parity(case, got, ref)
    assert got["counter"].tolist() == [1] and got["fault"].tolist() == [0, 0]


def test_the_unconditional_rows_use_their_own_scale(twin):
    """Same inputs, two unconditional scales: each launch equals its own reference, and they differ (a
    kernel that used ig_w for both halves would match only one of them)."""
    own = P.Case(R, "euler", True, True, False, n=2, shape=(4, 4, 4))
    shared = replace(own, ig_scale_uncond=None)
    inp = P.make_inputs(own)
    got_own, got_shared = P.fused(own, inp, library=twin), P.fused(shared, inp, library=twin)
    _assert_parity(own, got_own, P.reference(own, inp))
    _assert_parity(shared, got_shared, P.reference(shared, inp))
    assert not torch.equal(got_own["x_next"], got_shared["x_next"])


def test_the_velocity_is_a_true_division_not_a_reciprocal_multiplication(twin):
    """From x = 0 with dt = 1 the step returns v = -x_hat / t_safe itself. The twin matches the
    reference's tensor division bit for bit, where multiplying by 1 / t_safe differs in some elements."""
    t = 0.3  # 1 / 0.3 is inexact in float32
    step = Step(index=0, kind=StepKind.EULER, t_cur=t, t_next=t + 1.0, dt=1.0, evals=(Evaluation(t, False, False),))
    g = GuidanceConfig(ig_scale=1.0)
    facts = P.raev2_facts((4, 8, 8))
    plan = build_plan(R, replace(P.raev2_sampler(), guidance=g))
    x = torch.zeros(4, 4, 8, 8)
    x_hat = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    backend = P.ReplayBackend(None, [(x_hat, x_hat)])
    ref = reference_step(backend, plan, facts, step, x, torch.arange(4), 0, torch.arange(4), NUMPY)
    got = torch.empty(4, 256)
    fused_step(step_params(R, g, step), x.reshape(4, -1), x_hat.reshape(4, -1), None, x_out=got, library=twin)
    assert torch.equal(got.view_as(ref), ref)
    t_safe = torch.tensor(t, dtype=torch.float32)
    reciprocal = (x - x_hat) * (1.0 / t_safe)
    assert not torch.equal(reciprocal, ref), "the case must tell a division from a reciprocal multiplication"


def test_step_params_carry_the_unconditional_scale_and_t_safe():
    g = GuidanceConfig(ig_scale=1.78, cfg_scale=1.5, ig_scale_uncond=1.25)
    for t, t_safe in ((0.7, np.float32(0.7)), (0.02, np.float32(RAEV2_T_EPS)), (RAEV2_T_EPS, np.float32(RAEV2_T_EPS))):
        t32 = float(np.float32(t))
        step = Step(index=2, kind=StepKind.EULER, t_cur=t32, t_next=0.0, dt=-t32, evals=(Evaluation(t32, True, True),))
        p = step_params(R, g, step)
        assert (p.kind, p.family, p.drift) == (abi.Kind.EULER, abi.FamilyCode.RAEV2, 0)
        assert (p.ig_w, p.ig_w_uncond, p.cfg_w) == (np.float32(1.78), np.float32(1.25), np.float32(1.5))
        assert p.t_safe == t_safe and p.dt == np.float32(-t32)
    assert step_params(R, GuidanceConfig(ig_scale=1.78), step).ig_w_uncond == np.float32(1.78)
    # SiT and LightningDiT weigh the unconditional rows like the conditional ones, in their own form.
    sit = P.make_inputs(P.Case(Family.SIT, "sde", True, True, False)).step
    ldit = P.make_inputs(P.Case(Family.LIGHTNINGDIT, "euler", True, True, False)).step
    assert step_params(Family.SIT, GuidanceConfig(ig_scale=1.4), sit).ig_w_uncond == np.float32(1.4)
    assert step_params(Family.LIGHTNINGDIT, GuidanceConfig(ig_scale=1.4), ldit).ig_w_uncond == np.float32(0.4)
    assert step_params(Family.SIT, GuidanceConfig(), sit).t_safe == 0.0
    heun = Step(index=0, kind=StepKind.HEUN, t_cur=0.5, t_next=0.4, dt=-0.1,
                evals=(Evaluation(0.5, False, False), Evaluation(0.4, False, False)))
    with pytest.raises(ValueError, match="RAEv2 steps are Euler steps"):
        step_params(R, g, heun, phase=Phase.PREDICT)


# ------------------------------------------------------------------------------------------------
# Launches RAEv2 cannot make: refused on the host, by the C side and where an indexed launch reads them
# ------------------------------------------------------------------------------------------------

def _raev2_params(**fields) -> abi.StepParams:
    case = P.Case(R, "euler", True, True, False, n=2, shape=(3, 2, 2))
    p = step_params(R, P.sampler_config(case).guidance, P.make_inputs(case).step)
    for k, v in fields.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize("fields, message", [
    (dict(kind=int(abi.Kind.HEUN_CORRECT)), "a RAEv2 launch is an Euler step"),
    (dict(kind=int(abi.Kind.SDE_LAST), drift=1), "the SDE drift is a SiT-family field"),
    (dict(family=3), "unknown family 3"),
], ids=["heun", "sde", "family-3"])
def test_the_c_side_refuses_what_raev2_cannot_run(twin, fields, message):
    p = _raev2_params(**fields)
    x = torch.zeros(2, 12)
    v = torch.zeros(4, 12)
    b = abi.StepBuffers(x=x.data_ptr(), v_final=v.data_ptr(), v_inter=v.data_ptr(), k1_in=x.data_ptr(),
                        x_out=x.data_ptr(), n=2, e=12, v_dtype=0)
    with pytest.raises(library.KernelError, match=f"ERR_KIND.*{message}"):
        twin.step(p, b)


def test_an_indexed_raev2_heun_launch_is_refused_where_it_is_read(twin):
    p = _raev2_params(kind=int(abi.Kind.HEUN_PREDICT))
    raw = bytearray(bytes(p))
    table = torch.frombuffer(raw, dtype=torch.uint8).reshape(1, -1).clone()  # pack_table would refuse it
    x = torch.randn(2, 12)
    x_out, k1 = torch.full_like(x, 7.0), torch.full_like(x, 7.0)
    counter, fault = torch.zeros(1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    v = torch.randn(4, 12)
    with pytest.raises(library.KernelError, match="unknown kind or family, or flags that contradict the kind"):
        fused_step_indexed(table, counter, x, v, v, None, k1, x_out, None, None, fault=fault, library=twin)
    assert fault.tolist() == [int(abi.Fault.KIND), 0] and counter.tolist() == [1]
    assert torch.equal(x_out, torch.full_like(x, 7.0)) and torch.equal(k1, torch.full_like(x, 7.0))


@pytest.mark.parametrize("fields, message", [
    (dict(kind=int(abi.Kind.HEUN_PREDICT)), r"params\[0\]: a RAEv2 launch is an Euler step, got kind HEUN_PREDICT"),
    (dict(t_safe=0.0), r"params\[0\].t_safe = 0.0: RAEv2 divides by max\(t, 0.05\)"),
    (dict(family=4), r"params\[0\].family = 4 is not a family code \(0 SiT, 1 LightningDiT, 2 RAEv2\)"),
], ids=["heun", "t-safe-0", "family-4"])
def test_pack_table_refuses_what_raev2_cannot_run(fields, message):
    with pytest.raises(KernelInputError, match=message):
        pack_table([_raev2_params(**fields)])


# ------------------------------------------------------------------------------------------------
# Whole RAEv2 plans: fused and captured loops against the reference loop
# ------------------------------------------------------------------------------------------------

def _plan_and_flags(cfg):
    plan = build_plan(R, cfg)
    flags = [(ev.ig, ev.cfg) for s in plan.steps for ev in s.evals]
    assert {f[0] for f in flags} == {True, False}, "IG must switch inside the run"
    assert {f[1] for f in flags} == {True, False}, "CFG must switch inside the run"
    assert min(s.t_cur for s in plan.steps) < RAEV2_T_EPS, "the run must reach the clamped times"
    assert plan.guidance.uncond_ig_scale != plan.guidance.ig_scale
    return plan


@pytest.mark.parametrize("shape, dtype", [((3, 5, 5), torch.float32), ((4, 4, 4), torch.float32),
                                          ((3, 5, 5), torch.bfloat16)], ids=["e75-fp32", "e64-fp32", "e75-bf16"])
def test_fused_and_captured_loops_over_a_raev2_plan_are_bit_equal_to_the_reference_loop(twin, shape, dtype):
    plan = _plan_and_flags(P.raev2_sampler())
    facts = P.raev2_facts(shape)
    net = P.XPredictionNet(dtype)
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    ref = run_reference(net, plan, facts, 5, indices, labels, state_dtype=torch.float32, device=torch.device("cpu"),
                        randn=NUMPY)
    steps = []
    fused = run_fused(net, plan, facts, 5, indices, labels, device=torch.device("cpu"), library=twin,
                      on_step=lambda k, total: steps.append(k))
    captured = run_captured(net, plan, facts, 5, indices, labels, device=torch.device("cpu"), library=twin)
    assert bool(torch.isfinite(ref).all()) and ref.abs().max() > 0
    assert torch.equal(fused, ref), P.rel_err(fused, ref)
    assert torch.equal(captured, ref), P.rel_err(captured, ref)
    assert steps == list(range(1, len(plan.steps) + 1))
    # The launches: all Euler, RAEv2, each with the time's t_safe and both IG weights.
    for sl in plan_launches(plan, 5):
        (p,) = sl.launches
        assert (p.kind, p.family) == (abi.Kind.EULER, abi.FamilyCode.RAEV2)
        assert p.t_safe == max(np.float32(sl.step.t_cur), np.float32(RAEV2_T_EPS))
        assert (p.ig_w, p.ig_w_uncond) == (np.float32(1.6), np.float32(1.2))


def test_the_sampler_runs_raev2_on_the_twin_and_on_captured_graphs(twin_discovered, monkeypatch):
    """A Sampler takes the fused loop for RAEv2 (path cpu-twin) and, with graphs (tests.fake_graphs), the
    captured loop: one capture per row count, every batch equal to the fused and the reference loop."""
    plan = _plan_and_flags(P.raev2_sampler(steps=12))
    facts = P.raev2_facts((3, 5, 5))
    fused = Sampler(P.XPredictionNet(), plan, facts, Precision.FP32, "cpu", capture="off")
    reference = replace(fused, kernels="off")
    assert fused.path == "cpu-twin" and reference.path == "reference"
    fake = FakeGraphs(monkeypatch)
    captured = Sampler(P.XPredictionNet(), plan, facts, Precision.FP32, "cpu")
    assert captured.path == "cuda-graph"
    for seed, idx, lab in ((5, [0, 1, 2], [1, 2, 3]), (2**40 + 3, [7, 8, 9], [9, 0, 4])):
        idx, lab = torch.tensor(idx), torch.tensor(lab)
        want = reference(seed, idx, lab)
        assert torch.equal(fused(seed, idx, lab), want)
        assert torch.equal(captured(seed, idx, lab), want)
    assert fake.captures == 2, "one graph per network row count (N and 2N)"
    assert fake.replays == 2 * len(plan.steps)
    assert captured.fallbacks == () and captured.path == "cuda-graph"


# ------------------------------------------------------------------------------------------------
# ABI version 3: a library built before RAEv2's fields is refused on load
# ------------------------------------------------------------------------------------------------

_STUB = """
#define X __attribute__((visibility("default")))
X int igk_abi_version(void) { return VERSION; }
X int igk_params_size(void) { return PARAMS; }
X int igk_buffers_size(void) { return BUFFERS; }
X int igk_table_size(void) { return TABLE; }
X const char* igk_build_info(void) { return "stub"; }
X const char* igk_last_error(void) { return ""; }
X int igk_cpu_step(void) { return 0; }
X int igk_cpu_step_indexed(void) { return 0; }
X int igk_cpu_philox(void) { return 0; }
X int igk_cpu_philox_raw(void) { return 0; }
X int igk_cpu_gaussian(void) { return 0; }
"""


def _stub_library(tmp_path, version: int, params_size: int):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build a stub library")
    src = tmp_path / "stub.c"
    src.write_text(_STUB)
    out = tmp_path / f"v{version}-p{params_size}" / library.library_filename(library.CPU_STEM)
    out.parent.mkdir()
    import ctypes

    sizes = [f"-DVERSION={version}", f"-DPARAMS={params_size}", f"-DBUFFERS={ctypes.sizeof(abi.StepBuffers)}",
             f"-DTABLE={ctypes.sizeof(abi.StepTable)}"]
    subprocess.run([cc, "-shared", "-fPIC", *sizes, "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("version, params_size, message", [
    (2, 72, r"ABI version 2, expected 3 \(stale build: rebuild with python -m igengine.kernels.build\)"),
    (3, 72, r"struct sizes differ from igengine/kernels/abi.py \(stale build: rebuild\)"),
], ids=["version-2", "version-3-with-the-old-struct"])
def test_a_library_without_the_raev2_fields_is_refused(twin, tmp_path, monkeypatch, version, params_size, message):
    import ctypes

    assert abi.ABI_VERSION == 3 and ctypes.sizeof(abi.StepParams) == 80 == twin.cdll.igk_params_size()
    path = _stub_library(tmp_path, version, params_size)
    with pytest.raises(library.KernelError, match=message):
        library.load_library(path, "cpu")
    monkeypatch.setenv(library.ENV_DIR, str(path.parent))
    monkeypatch.delenv(library.ENV_SWITCH, raising=False)
    library._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="stale build"):
            assert library.cpu_library() is None
        assert library.kernel_path("cpu") == "reference"
    finally:
        library._reset_for_tests()
