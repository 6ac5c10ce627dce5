"""Indexed launches, the captured loop and the custom ops, on the CPU twin (the CUDA side: tests/test_kernels_gpu.py).

The indexed step runs the same per-element code (csrc/igk_math.h) as the by-value step, only with
its scalars read from a table at a counter, so the twin is asserted bit-equal (torch.equal) to the
by-value step, and the captured loop (run eagerly on the CPU, the structure CUDA replays from graphs)
bit-equal to the fused loop and to the reference loop.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from igengine.config import Family, GuidanceConfig, Solver
from igengine.errors import NonFiniteError
from igengine.kernels import abi, library
from igengine.kernels.binding import KernelInputError, fused_step, fused_step_indexed, pack_table
from igengine.sampling.captured import CapturedLoop, run_captured
from igengine.sampling.fused import run_fused
from igengine.sampling.launches import Phase, plan_launches, step_params
from igengine.sampling.plan import Evaluation, Step, StepKind

from tests import kernel_parity as P
from tests.conftest import sampler_for as make_sampler

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# The indexed step against the by-value step
# ------------------------------------------------------------------------------------------------

CASES = P.step_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_indexed_step_is_bit_equal_to_the_by_value_step(twin, case):
    inp = P.make_inputs(case)
    want = P.fused(case, inp, library=twin)
    got = P.fused_indexed(case, inp, library=twin)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{case.id}: {differ} differ from the by-value step"
    assert got["counter"].tolist() == [len(inp.outputs)], "one advance per launch"
    assert got["fault"].tolist() == [0, 0]
    if case.kind == "heun":
        assert torch.equal(got["x_after_predict"], inp.x), "the predictor must leave x (= x_out) alone"


def _euler_launches(dts, n=2, e=12, cfg=False):
    """A table of Euler launches with distinct dt, their by-value params, and matching buffers."""
    params = []
    for k, dt in enumerate(dts):
        step = Step(index=k, kind=StepKind.EULER, t_cur=0.5, t_next=0.5 + dt, dt=dt,
                    evals=(Evaluation(0.5, False, cfg),))
        params.append(step_params(Family.LIGHTNINGDIT, GuidanceConfig(cfg_scale=1.5), step))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, e, generator=gen)
    v = torch.randn((2 if cfg else 1) * n, e, generator=gen)
    return params, x, v


def test_each_launch_reads_its_own_row_and_advances_the_counter_once(twin):
    params, x, v = _euler_launches([0.125, -0.25, 0.0625])
    table = pack_table(params)
    counter = torch.zeros(1, dtype=torch.int64)
    for k, p in enumerate(params):
        got = torch.empty_like(x)
        fused_step_indexed(table, counter, x, v, x_out=got, library=twin)
        want = torch.empty_like(x)
        fused_step(p, x, v, x_out=want, library=twin)
        assert torch.equal(got, want), f"launch {k} did not use row {k} of the table"
        assert counter.tolist() == [k + 1]


def test_indexed_predictor_writes_k1_and_the_next_input_but_not_x_out(twin):
    case = P.Case(Family.LIGHTNINGDIT, "heun", True, True, True, n=2, shape=(3, 2, 2), cfg2=True)
    inp = P.make_inputs(case)
    g = P.sampler_config(case).guidance
    pred = step_params(case.family, g, inp.step, phase=Phase.PREDICT, dup_next=True)
    x = inp.x.reshape(2, 12).clone()
    x_out = torch.full_like(x, 7.0)
    k1, net, fb = torch.full_like(x, 7.0), torch.full((4, 12), 7.0), torch.full((2,), -1)
    vf, vi = inp.outputs[0]
    fused_step_indexed(pack_table([pred]), torch.zeros(1, dtype=torch.int64), x, vf, vi, None, k1, x_out, net, fb,
                       library=twin)
    want_k1, want_net = torch.empty_like(x), torch.empty(4, 12)
    fused_step(pred, x, vf, vi, k1_out=want_k1, net_out=want_net, library=twin)
    assert torch.equal(k1, want_k1) and torch.equal(net, want_net)
    assert torch.equal(x_out, torch.full_like(x, 7.0)) and torch.equal(x, inp.x.reshape(2, 12))
    assert fb.tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------------
# Launches whose scalars do not fit the buffers: refused where the scalars are read
# ------------------------------------------------------------------------------------------------

def _raw_table(params) -> torch.Tensor:
    """A table without pack_table's host checks (what a corrupted device table would hold)."""
    raw = bytearray(b"".join(bytes(p) for p in params))
    return torch.frombuffer(raw, dtype=torch.uint8).reshape(len(params), -1).clone()


def _sde_params(cfg: bool):
    case = P.Case(Family.SIT, "sde", True, cfg, False, n=2, shape=(3, 2, 2))
    inp = P.make_inputs(case)
    return step_params(Family.SIT, P.sampler_config(case).guidance, inp.step, seed=1), inp


@pytest.mark.parametrize("what, code, message", [
    ("counter-past-the-end", abi.Fault.COUNTER, "outside the table"),
    ("cfg-on-n-rows", abi.Fault.ROWS, "row counts"),
    ("sde-without-indices", abi.Fault.NULL, "is NULL"),
    ("unknown-kind", abi.Fault.KIND, "unknown kind"),
])
def test_refused_launch_writes_nothing_records_the_fault_and_still_advances(twin, what, code, message):
    p, inp = _sde_params(cfg=what != "cfg-on-n-rows")
    vf, vi = inp.outputs[0]
    indices = inp.indices
    start = 0
    if what == "cfg-on-n-rows":
        p.cfg = 1  # the table says CFG, the buffers are the N-row graph's
    elif what == "sde-without-indices":
        indices = None
    elif what == "unknown-kind":
        p.kind = 9
    elif what == "counter-past-the-end":
        start = 1
    x = inp.x.reshape(2, 12).clone()
    x_out = torch.full_like(x, 7.0)
    counter = torch.tensor([start])
    fault = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(library.KernelError, match=message):
        fused_step_indexed(_raw_table([p]), counter, x, vf, vi, indices, None, x_out, None, None, fault=fault,
                           library=twin)
    assert fault.tolist() == [int(code), start]
    assert counter.tolist() == [start + 1]
    assert torch.equal(x_out, torch.full_like(x, 7.0)), "a refused launch must not write"
    # The first fault is kept.
    with pytest.raises(library.KernelError):
        fused_step_indexed(_raw_table([p]), torch.tensor([5]), x, vf, vi, indices, None, x_out, None, None,
                           fault=fault, library=twin)
    assert fault.tolist() == [int(code), start]


def test_pack_table_holds_the_params_bytes_and_checks_them():
    p, _ = _sde_params(cfg=True)
    q, _ = _sde_params(cfg=False)
    table = pack_table([p, q])
    assert table.dtype == torch.uint8 and table.shape == (2, ctypes.sizeof(abi.StepParams))
    assert table[1].numpy().tobytes() == bytes(q) and table[0].numpy().tobytes() == bytes(p)
    with pytest.raises(KernelInputError, match="at least one"):
        pack_table([])
    p.drift = 0
    with pytest.raises(KernelInputError, match=r"params\[1\].drift must be set exactly for the SDE kinds"):
        pack_table([q, p])
    p.kind = 7
    with pytest.raises(KernelInputError, match=r"params\[0\].kind = 7 is not a kind"):
        pack_table([p])
    with pytest.raises(KernelInputError, match="must be an igengine.kernels.abi.StepParams"):
        pack_table([{"kind": 0}])


# ------------------------------------------------------------------------------------------------
# Bad inputs to fused_step_indexed: one clear KernelInputError naming the argument
# ------------------------------------------------------------------------------------------------

def _indexed_args():
    p, inp = _sde_params(cfg=True)
    vf, vi = inp.outputs[0]
    x = inp.x.reshape(2, 12).clone()
    return dict(table=pack_table([p]), counter=torch.zeros(1, dtype=torch.int64), x=x, v_final=vf, v_inter=vi,
                indices=inp.indices, k1=torch.empty_like(x), x_out=x, net_out=torch.empty(4, 12),
                first_bad=torch.full((2,), -1), fault=torch.zeros(2, dtype=torch.int64))


_W = ctypes.sizeof(abi.StepParams)  # bytes of one launch-table row


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(table=a["table"].float()), rf"table must be uint8 \(L, {_W}\)"),
    (lambda a: a.update(table=a["table"][:, :36]), rf"table must be uint8 \(L, {_W}\).*\(1, 36\)"),
    (lambda a: a.update(table=a["table"].to("meta")), "table is on meta"),
    (lambda a: a.update(table=torch.cat([torch.zeros(1, dtype=torch.uint8), a["table"].flatten()])[1:].view(1, _W)),
     "table is not 4-byte aligned"),
    (lambda a: a.update(counter=a["counter"].int()), "counter has dtype int32"),
    (lambda a: a.update(counter=torch.zeros(2, dtype=torch.int64)), r"counter has shape \(2,\)"),
    (lambda a: a.update(x=a["x"].double(), x_out=None), "x has dtype float64"),
    (lambda a: a.update(v_final=torch.cat([a["v_final"], a["v_final"][:2]])), "expected N = 2 rows .* or 2N = 4"),
    (lambda a: a.update(v_inter=a["v_inter"].half()), "v_inter has dtype float16"),
    (lambda a: a.update(v_inter=a["v_inter"][:2]), "v_inter has shape"),
    (lambda a: a.update(indices=a["indices"].int()), "indices has dtype int32"),
    (lambda a: a.update(indices=-a["indices"] - 1), "`indices` must be >= 0"),
    (lambda a: a.update(k1=torch.empty(2, 13)), "k1 has shape"),
    (lambda a: a.update(net_out=torch.empty(6, 12)), "net_out has shape"),
    (lambda a: a.update(first_bad=torch.full((3,), -1)), "first_bad has shape"),
    (lambda a: a.update(fault=torch.zeros(1, dtype=torch.int64)), "fault has shape"),
    (lambda a: a.update(x_out=a["net_out"][:2]), "net_out overlaps x_out|x_out overlaps net_out"),
    (lambda a: a.update(fault=a["first_bad"]), "overlaps"),
    (lambda a: a.update(v_final=a["v_final"].transpose(2, 3)), "v_final is not contiguous"),
    (lambda a: a.update(x_out=torch.empty(2, 12)), None),  # a separate x_out is fine
], ids=["table-dtype", "table-width", "table-device", "table-misaligned", "counter-dtype", "counter-shape", "x-dtype", "v-rows",
        "v-inter-dtype", "v-inter-rows", "indices-dtype", "indices-negative", "k1-shape", "net-rows",
        "first-bad-shape", "fault-shape", "x-out-overlaps-net", "fault-is-first-bad", "v-non-contiguous",
        "separate-x-out"])
def test_indexed_binding_rejects_bad_inputs_with_clear_errors(twin, mutate, message):
    args = _indexed_args()
    mutate(args)
    if message is None:
        fused_step_indexed(library=twin, **args)
        assert args["counter"].tolist() == [1]
        return
    with pytest.raises(KernelInputError, match=message):
        fused_step_indexed(library=twin, **args)
    assert not args["counter"].any(), "a refused call must not advance the counter"


# ------------------------------------------------------------------------------------------------
# The captured loop (eager on the CPU) against the fused loop and the reference loop
# ------------------------------------------------------------------------------------------------

RUNS = P.E2E_RUNS


@pytest.mark.parametrize("name, solver, cfg_interval, shift", RUNS, ids=[f"{r[0]}-{r[1].value}" for r in RUNS])
def test_captured_loop_is_bit_equal_to_the_fused_and_reference_loops(twin_discovered, name, solver, cfg_interval,
                                                                      shift):
    backend = P.tiny_backend(name)
    cfg = P.e2e_sampler(solver, cfg_interval, shift)
    s = make_sampler(backend, cfg)
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    calls = {"captured": [], "fused": []}
    got = run_captured(s.net, s.plan, s.facts, 5, indices, labels, device=s.device, library=twin_discovered,
                       on_step=lambda k, total: calls["captured"].append((k, total)))
    fused = run_fused(s.net, s.plan, s.facts, 5, indices, labels, device=s.device, library=twin_discovered,
                      on_step=lambda k, total: calls["fused"].append((k, total)))
    ref = make_sampler(backend, cfg, kernels="off")(5, indices, labels)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(got, fused), P.rel_err(got, fused)
    assert torch.equal(got, ref), P.rel_err(got, ref)
    assert calls["captured"] == calls["fused"] == [(k + 1, len(s.plan.steps)) for k in range(len(s.plan.steps))]


def test_captured_loop_launches_once_per_network_evaluation(twin_discovered):
    backend = P.tiny_backend("LightningDiT-B/1")
    cfg = P.e2e_sampler(Solver.HEUN2, (0.19, 1.0), 0.3, steps=4)
    s = make_sampler(backend, cfg)
    seen = []

    def net(x, t, y):
        seen.append((x.shape[0], float(t[0])))
        return s.net(x, t, y)

    loop = CapturedLoop(net, s.plan, s.facts, 0, torch.tensor([0, 1]), torch.tensor([2, 3]), device=s.device,
                        library=twin_discovered)
    loop.run()
    evals = [ev for st in s.plan.steps for ev in st.evals]
    assert loop.num_launches == len(evals) == len(plan_launches(s.plan, 0)) * 2
    assert seen == [((4 if ev.cfg else 2), float(np.float32(ev.t))) for ev in evals]
    assert loop.counter.tolist() == [len(evals)]
    loop.finish()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        loop.capture()


@pytest.mark.parametrize("solver, t_index", [(Solver.SDE, 5), (Solver.ODE_HEUN, 3), (Solver.ODE_EULER, 0)])
def test_captured_loop_reports_non_finite_like_the_reference_loop(twin_discovered, solver, t_index):
    cfg = P.e2e_sampler(solver, (0.0, 0.7), 0.0)
    indices, labels = torch.tensor([7, 8, 9]), torch.tensor([1, 2, 3])
    errors = []
    for kernels in ("off", "captured"):
        backend = P.tiny_backend("SiT-S/2")
        s = make_sampler(backend, cfg)
        t_bad = s.plan.steps[t_index].t_cur
        net = P.TimeNaNInjector(s.net, t_bad, row=1)
        with pytest.raises(NonFiniteError) as info:
            if kernels == "off":
                replace(make_sampler(backend, cfg, kernels="off"), net=net)(2, indices, labels)
            else:
                run_captured(net, s.plan, s.facts, 2, indices, labels, device=s.device, library=twin_discovered)
        errors.append((info.value.step, info.value.indices))
    assert errors[0] == errors[1] and errors[0][1] == [8]


def test_sampler_capture_argument(twin_discovered):
    backend = P.tiny_backend("SiT-S/2")
    cfg = P.e2e_sampler(Solver.ODE_EULER, (0.0, 0.55), 0.0, steps=2)
    s = make_sampler(backend, cfg)
    assert s.net.capturable is True, "the torch backend declares its calls capturable"
    assert s.capture == "auto" and s.path == "cpu-twin", "CUDA graphs only on CUDA: the CPU keeps the fused loop"
    assert replace(s, capture="off").path == "cpu-twin"
    with pytest.raises(ValueError, match="`capture` must be one of auto, off"):
        replace(s, capture="on")


# ------------------------------------------------------------------------------------------------
# The custom ops: opaque to torch.compile, so a compiled launch stays one graph
# ------------------------------------------------------------------------------------------------

def _ops():
    if not hasattr(torch.library, "custom_op"):
        pytest.skip(f"torch.library.custom_op needs torch >= 2.4, this is {torch.__version__}")
    import igengine.kernels.ops as ops

    return ops


def _launch_args():
    p, inp = _sde_params(cfg=False)
    q = step_params(Family.SIT, GuidanceConfig(ig_scale=1.4), replace(inp.step, index=4, dt=-0.0625,
                    noise_stream=6), seed=1)
    gen = torch.Generator().manual_seed(11)
    return [pack_table([p, q]), torch.zeros(1, dtype=torch.int64), torch.tensor([0.875, 0.75]),
            torch.randn(2, 12, generator=gen), torch.randn(2, 12, generator=gen), torch.zeros(2, 12),
            torch.full((2,), -1), torch.zeros(2, dtype=torch.int64), inp.indices]


def _one_launch(fused, gaussian):
    """One launch of the captured loop's structure with a toy network, written against given ops."""

    def launch(table, counter, t_table, x, net, k1, first_bad, fault, idx):
        t = torch.index_select(t_table, 0, counter)
        eps = gaussian(idx).reshape(net.shape)
        v_final = net * (1.0 + t) + 0.5 * eps
        v_inter = net * 0.5
        fused(table, counter, x, v_final, v_inter, idx, k1, net, first_bad, fault)
        return x * 2.0

    return launch


def test_custom_ops_compile_into_one_graph_and_match_eager(twin_discovered):
    ops = _ops()
    launch = _one_launch(torch.ops.igengine.fused_step_indexed, lambda idx: ops.gaussian(2**64 - 1, idx, 9, (3, 2, 2)))
    eager = _launch_args()
    for _ in range(2):
        want = launch(*eager)
    explained = torch._dynamo.explain(launch)(*_launch_args())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled_fn = torch.compile(launch, fullgraph=True, backend="aot_eager")
    compiled = _launch_args()
    for _ in range(2):
        got = compiled_fn(*compiled)
    assert torch.equal(got, want)
    for k, (a, b) in enumerate(zip(compiled, eager)):
        assert torch.equal(a, b), f"argument {k} differs after two compiled launches"
    assert compiled[1].tolist() == [2]


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_the_ctypes_binding_breaks_the_graph_where_the_op_does_not(twin_discovered):
    from igengine.kernels import binding

    def direct(table, counter, x, v_final, v_inter, idx, k1, net, first_bad, fault):
        binding.fused_step_indexed(table, counter, x, v_final, v_inter, idx, k1, x, net, first_bad, fault=fault)

    launch = _one_launch(direct, lambda idx: binding.gaussian(3, idx, 9, (3, 2, 2)))
    assert torch._dynamo.explain(launch)(*_launch_args()).graph_break_count > 0


def test_custom_ops_pass_opcheck_and_the_gaussian_op_is_the_noise_contract(twin_discovered):
    ops = _ops()
    from igengine.noise import gaussian as ref_gaussian

    table, counter, _, x, net, k1, first_bad, fault, idx = _launch_args()
    v = torch.randn(2, 12)
    torch.library.opcheck(torch.ops.igengine.fused_step_indexed.default,
                          (table, counter, x, v, v * 0.5, idx, k1, net, first_bad, fault))
    torch.library.opcheck(torch.ops.igengine.gaussian.default, (idx, 5, 2**31, 3, [2, 3]))
    for seed in (0, 2**63 + 5, 2**64 - 1):
        assert torch.equal(ops.gaussian(seed, idx, 4, (3, 5)), ref_gaussian(seed, idx, 4, (3, 5)))


def test_import_igengine_loads_neither_the_ops_nor_dynamo():
    code = ("import sys, igengine, igengine.sampling, igengine.kernels; "
            "import igengine.sampling.sampler, igengine.sampling.captured; "
            "bad = [m for m in ('igengine.kernels.ops', 'torch._dynamo') if m in sys.modules]; "
            "assert not bad, bad; import torch; assert not torch.cuda.is_initialized()")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
