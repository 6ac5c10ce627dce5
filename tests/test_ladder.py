"""The fallback ladder (issue 18): captured -> fused -> reference, never a traceback.

A fast loop that fails while it runs (a capture, a replay, a kernel launch, the fault word, the launch
counter) has its batch computed again on the next rung with the same noise, warns once, and the
sampler stays there; the manifest says which loop computed each range of samples and why. The
request's errors, NaN in the result and running out of memory are not the ladder's business; when
the last rung fails, the CLI says so in one line. The captured loop runs on the CPU twin through
``tests.fake_graphs`` (where it is bit-equal to the fused and the reference loops), so every result
after a fallback is compared bit for bit with the loop it fell back to.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from igengine.backends import network
from igengine.config import Precision, Solver
from igengine.errors import JobError, NetworkReplaced, NonFiniteError, SamplingError
from igengine.kernels.abi import Fault
from igengine.kernels.library import KernelError
from igengine.sampling import FallbackWarning, ModelFacts, Sampler, build_plan
from igengine.sampling import captured as captured_module
from igengine.sampling import sampler as sampler_module
from igengine.sampling.captured import CapturedLoop

from tests import kernel_parity as P
from tests.fake_graphs import CAPTURE_ERROR, REPLAY_ERROR, FakeGraphs

SEED, IDX, LAB = 3, torch.tensor([0, 5, 2**33 + 1]), torch.tensor([1, 2, 9])
IDX2, LAB2 = torch.tensor([7, 8, 9]), torch.tensor([4, 4, 0])


def _sampler(net=None, name="SiT-S/2", solver=Solver.SDE, steps=6, **kw) -> Sampler:
    backend = P.tiny_backend(name)
    cfg = P.e2e_sampler(solver, (0.0, 0.7) if name.startswith("SiT") else (0.19, 1.0), 0.0, steps=steps)
    return Sampler(net if net is not None else network(backend), build_plan(backend.config.family, cfg),
                   ModelFacts.of(backend.config), Precision.FP32, "cpu", **kw)


def _reference(s: Sampler, idx=IDX, lab=LAB) -> torch.Tensor:
    return replace(s, kernels="off", on_fallback=None)(SEED, idx, lab)


def _events(s: Sampler):
    return [(f.kind, f.source, f.target) for f in s.fallbacks]


# ------------------------------------------------------------------------------------------------
# The captured rung fails: the batch is computed again on the fused loop, later batches stay there
# ------------------------------------------------------------------------------------------------

def _fault_word(monkeypatch):
    finish = CapturedLoop.finish

    def corrupted(self):  # what the device records for a launch whose scalars do not fit the buffers
        self.fault.copy_(torch.tensor([int(Fault.ROWS), 3]))
        return finish(self)

    monkeypatch.setattr(CapturedLoop, "finish", corrupted)


def _counter(monkeypatch):
    finish = CapturedLoop.finish

    def short(self):  # a launch that never ran
        self.counter.sub_(1)
        return finish(self)

    monkeypatch.setattr(CapturedLoop, "finish", short)


def _launch(monkeypatch):
    def refused(*args, **kwargs):
        raise KernelError("libigengine_kernels_cuda.so: indexed fused step failed (ERR_LAUNCH): "
                          "too many resources requested for launch")

    monkeypatch.setattr(captured_module, "fused_step_indexed", refused)


FAILURES = {  # how the captured rung fails -> (FakeGraphs arguments, extra patch, text of the cause)
    "capture": (dict(fail_capture=True), None, CAPTURE_ERROR),
    "replay": (dict(fail_replay=True), None, REPLAY_ERROR),
    "kernel-launch": ({}, _launch, "too many resources requested"),
    "fault-word": ({}, _fault_word, "was refused on the device (ROWS"),
    "launch-counter": ({}, _counter, "the launch counter reads"),
}


@pytest.mark.parametrize("how", list(FAILURES))
def test_a_failing_captured_loop_is_computed_again_on_the_fused_loop(twin_discovered, monkeypatch, how):
    fake_args, patch, cause = FAILURES[how]
    fake = FakeGraphs(monkeypatch, **fake_args)
    if patch is not None:
        patch(monkeypatch)
    seen = []
    s = _sampler(on_fallback=seen.append)
    fused = replace(s, capture="off", on_fallback=None)
    assert s.ladder == ("cuda-graph", "cpu-twin", "reference") and s.path == "cuda-graph"
    got = s(SEED, IDX, LAB)
    assert s.path == "cpu-twin" and s.generator == "cpu-twin"
    assert torch.equal(got, fused(SEED, IDX, LAB)) and torch.equal(got, _reference(s))
    captures = fake.captures
    got2 = s(SEED, IDX2, LAB2)  # later batches stay on the fused loop: no capture is tried again
    assert torch.equal(got2, fused(SEED, IDX2, LAB2)) and fake.captures == captures
    assert len(seen) == 1 and seen[0] is s.fallbacks[0] and _events(s) == [("loop", "cuda-graph", "cpu-twin")]
    msg = seen[0].message
    assert cause in msg and "3 samples from index 0" in msg and "`capture` off" in msg and "\n" not in msg, msg


def test_without_a_callback_the_fallback_is_one_warning(twin_discovered, monkeypatch):
    FakeGraphs(monkeypatch, fail_replay=True)
    s = _sampler()
    with pytest.warns(FallbackWarning) as record:
        s(SEED, IDX, LAB)
        s(SEED, IDX2, LAB2)
    assert len(record) == 1 and "`capture` off starts a run there" in str(record[0].message)


# ------------------------------------------------------------------------------------------------
# The fused rung fails: the reference loop, drawing with NumPy (the same numbers), not the kernels
# ------------------------------------------------------------------------------------------------

def _failing_fused(monkeypatch, after: int = 0):
    """The fused loop fails from its (after + 1)-th call on; returns the real one."""
    run_fused = sampler_module.run_fused
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KernelError("libigengine_kernels_cuda.so: fused step failed (ERR_CUDA): an illegal instruction "
                              "was encountered")
        return run_fused(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "run_fused", failing)
    return run_fused


def test_a_failing_fused_loop_is_computed_again_on_the_reference_loop(twin_discovered, monkeypatch):
    _failing_fused(monkeypatch)
    seen = []
    s = _sampler(on_fallback=seen.append)
    assert s.ladder == ("cpu-twin", "reference")
    got = s(SEED, IDX, LAB)
    assert s.path == "reference" and s.generator == "numpy" and s.kernel_build is None
    assert torch.equal(got, _reference(s))
    assert _events(s) == [("loop", "cpu-twin", "reference")]
    assert "IGENGINE_KERNELS=off" in seen[0].message and "illegal instruction" in seen[0].message


def test_captured_then_fused_fail_and_the_reference_loop_computes_the_batch(twin_discovered, monkeypatch):
    FakeGraphs(monkeypatch, fail_capture=True)
    _failing_fused(monkeypatch)
    seen = []
    s = _sampler(on_fallback=seen.append, name="LightningDiT-B/1", solver=Solver.HEUN2)
    assert torch.equal(s(SEED, IDX, LAB), _reference(s))
    assert _events(s) == [("loop", "cuda-graph", "cpu-twin"), ("loop", "cpu-twin", "reference")]
    assert len(seen) == 2


def test_when_the_last_loop_fails_too_the_error_is_one_line_naming_every_loop(twin_discovered, monkeypatch):
    FakeGraphs(monkeypatch, fail_replay=True)
    _failing_fused(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported")

    monkeypatch.setattr(sampler_module, "run_reference", broken)
    s = _sampler(on_fallback=lambda e: None)
    with pytest.raises(SamplingError) as info:
        s(SEED, IDX, LAB)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("3 samples from index 0 could not be computed on any loop")
    for rung, cause in (("cuda-graph", REPLAY_ERROR), ("cpu-twin", "illegal instruction"),
                        ("reference", "illegal memory access")):
        assert f"({rung}): " in msg and cause in msg
    assert "asynchronously" not in msg, "only the first line of each error"


# ------------------------------------------------------------------------------------------------
# What the ladder leaves alone
# ------------------------------------------------------------------------------------------------

def test_nan_in_the_result_is_reported_not_recomputed(twin_discovered, monkeypatch):
    FakeGraphs(monkeypatch)
    s = _sampler()
    net = P.TimeNaNInjector(s.net, s.plan.steps[2].t_cur, row=1)
    s = replace(s, net=net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        with pytest.raises(NonFiniteError) as info:
            s(SEED, IDX, LAB)
    assert info.value.indices == [5] and s.path == "cuda-graph" and s.fallbacks == ()


class _Raising:
    """A capturable network that raises ``error`` at its first call."""

    capturable = True
    precision = Precision.FP32

    def __init__(self, error):
        self.error = error

    def __call__(self, x, t, y):
        raise self.error


@pytest.mark.parametrize("error", [
    JobError("`labels` class 12 is outside [0, 10) for this model"),
    ValueError("sample `indices` must be >= 0"),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
], ids=["input-error", "value-error", "out-of-memory"])
def test_errors_of_the_request_and_out_of_memory_are_raised_as_they_are(twin_discovered, monkeypatch, error):
    FakeGraphs(monkeypatch)
    s = _sampler(net=_Raising(error))
    with pytest.raises(type(error)) as info:
        s(SEED, IDX, LAB)
    assert info.value is error and s.path == "cuda-graph" and s.fallbacks == ()


# ------------------------------------------------------------------------------------------------
# From outside: the starting rung, one rung alone, a network that replaces itself
# ------------------------------------------------------------------------------------------------

def test_the_starting_rung_is_set_by_the_arguments_or_by_demote(twin_discovered, monkeypatch):
    FakeGraphs(monkeypatch)
    s = _sampler()
    assert replace(s, capture="off").ladder == ("cpu-twin", "reference")
    assert replace(s, kernels="off").ladder == ("reference",)
    seen = []
    s = replace(s, on_fallback=seen.append)
    event = s.demote("cpu-twin", "the captured loop differs from the reference loop by 3e-2 at 2 samples")
    assert s.path == "cpu-twin" and event.samples is None and seen == [event]
    assert event.message == ("the captured loop differs from the reference loop by 3e-2 at 2 samples: the run uses "
                             "the fused loop (cpu-twin) from here on instead of the captured loop (cuda-graph); "
                             "`capture` off starts a run there")
    assert s.demote("cpu-twin", "again") is None and len(seen) == 1
    with pytest.raises(ValueError, match="only moves down"):
        s.demote("cuda-graph", "up")
    with pytest.raises(ValueError, match="not a rung"):
        s.demote("cuda", "no such rung on the CPU")
    assert torch.equal(s(SEED, IDX, LAB), replace(s, capture="off")(SEED, IDX, LAB))


def test_run_on_runs_one_rung_without_falling_back(twin_discovered, monkeypatch):
    fake = FakeGraphs(monkeypatch)
    s = _sampler()
    ref = s.run_on("reference", SEED, IDX, LAB)
    assert torch.equal(ref, _reference(s)) and s.path == "cuda-graph"
    assert torch.equal(s.run_on("cuda-graph", SEED, IDX, LAB), ref) and fake.captures == 2
    fake.fail_replay = True
    with pytest.raises(RuntimeError, match="illegal memory access"):
        s.run_on("cuda-graph", SEED, IDX, LAB)
    assert s.path == "cuda-graph" and s.fallbacks == ()


class _ReplacedOnce:
    """A network that, at its ``at``-th call, replaces itself (raises NetworkReplaced) once."""

    precision = Precision.FP32

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, x, t, y):
        self.calls += 1
        if self.calls == self.at:
            raise NetworkReplaced("compiled", "torch", "InductorError: C++ compile error", "`backend` torch")
        return self.inner(x, t, y)


def test_a_network_that_replaces_itself_gets_its_batch_computed_again(twin_discovered):
    plain = _sampler()
    net = _ReplacedOnce(plain.net, at=4)
    seen = []
    s = replace(plain, net=net, on_fallback=seen.append)
    assert torch.equal(s(SEED, IDX, LAB), plain(SEED, IDX, LAB))
    assert net.calls == 3 + 1 + sum(len(st.evals) for st in s.plan.steps)  # 3 good, 1 replaced, the batch again
    assert s.path == "cpu-twin" and _events(s) == [("network", "compiled", "torch")]
    assert seen[0].message.startswith("the compiled network failed on 3 samples from index 0 (InductorError")
    assert "`backend` torch starts a run there" in seen[0].message


def test_the_compiled_backend_falls_back_to_the_eager_backend_of_its_precision(twin_discovered, monkeypatch):
    from igengine.backends.compiled import CompiledBackend
    from igengine.backends.torch_backend import TorchBackend
    from igengine.jobs.backend import with_eager_fallback

    def no_compiler(self):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n\nCommand: g++ ...")

    monkeypatch.setattr(CompiledBackend, "warmup", no_compiler)
    eager = P.tiny_backend("SiT-S/2")
    compiled = with_eager_fallback(CompiledBackend(P.tiny_backend("SiT-S/2").model, row_counts=(3, 6),
                                                   precision=Precision.FP32))
    assert compiled.name == "compiled" and isinstance(compiled.compiled, CompiledBackend)
    seen = []
    s = replace(_sampler(), net=network(compiled), on_fallback=seen.append)
    assert torch.equal(s(SEED, IDX, LAB), replace(s, net=network(eager))(SEED, IDX, LAB))
    assert isinstance(compiled.eager, TorchBackend) and compiled.name == "torch" and s.net.name == "torch"
    assert _events(s) == [("network", "compiled", "torch")] and "CppCompileError" in seen[0].message
    facts = compiled.describe()
    assert facts["backend"] == "torch" and facts["replaced"]["backend"] == "compiled"
    assert facts["replaced"]["cause"] == "RuntimeError: InductorError: CppCompileError: C++ compile error"


# ------------------------------------------------------------------------------------------------
# Jobs: the manifest says which loop computed each range and why; the CLI and the API
# ------------------------------------------------------------------------------------------------

def _run(tmp_path, name, **kw):
    from igengine.jobs.bulk import Progress
    from igengine.jobs.sample import SampleJob, run_sample

    lines = []
    # The preflight's own launches (tests/test_preflight.py) would shift the fakes' counted failures.
    kw.setdefault("preflight", "off")
    job = SampleJob(out=tmp_path / name, n=10, batch_size=4, chunk_size=4, steps=6, precision=Precision.FP32,
                    labels="balanced", device="cpu", threads=1, **kw)
    result = run_sample(job, Progress(log=lines.append))
    return result.manifest, np.load(tmp_path / name / "samples.npz")["arr_0"], lines


def test_a_run_records_which_loop_computed_each_chunk_and_why(twin_discovered, monkeypatch, tmp_path):
    plain, want, _ = _run(tmp_path, "plain", capture="off")
    assert plain["computed_by"] == [{"indices": [0, 10], "step": "cpu-twin", "noise_generator": "cpu-twin",
                                     "network": "torch"}]
    fake = FakeGraphs(monkeypatch, fail_replay=6)  # the second batch's first replay fails (6 steps per batch)
    manifest, got, lines = _run(tmp_path, "fell")
    assert fake.replays == 6 and manifest["backend"]["step"] == "cuda-graph"
    np.testing.assert_array_equal(got, want)
    warned = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warned) == 1 and REPLAY_ERROR in warned[0] and "samples 4..7" in warned[0], lines
    why = warned[0].removeprefix("warning: ")
    assert manifest["computed_by"] == [
        {"indices": [0, 4], "step": "cuda-graph", "noise_generator": "cpu-twin", "network": "torch"},
        {"indices": [4, 10], "step": "cpu-twin", "noise_generator": "cpu-twin", "network": "torch", "why": [why]},
    ]
    assert manifest["fallbacks"] == [{"kind": "loop", "from": "cuda-graph", "to": "cpu-twin",
                                      "cause": f"RuntimeError: {REPLAY_ERROR}", "samples": "samples 4..7",
                                      "starts_there": "`capture` off"}]
    chunks = sorted((tmp_path / "fell" / "chunks").glob("*/*.how.json"))
    assert [p.name for p in chunks] == ["00000000-00000003.how.json", "00000004-00000007.how.json",
                                        "00000008-00000009.how.json"]
    assert json.loads((tmp_path / "fell" / "manifest.json").read_text())["computed_by"] == manifest["computed_by"]


def test_a_run_whose_compiled_backend_cannot_compile_runs_eager_and_says_so(twin_discovered, monkeypatch, tmp_path):
    from igengine.backends.compiled import CompiledBackend
    from igengine.config import BackendName

    def no_compiler(self):
        raise RuntimeError("InductorError: InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(CompiledBackend, "warmup", no_compiler)
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "cache"))
    _, want, _ = _run(tmp_path, "torch", backend=BackendName.TORCH)
    manifest, got, lines = _run(tmp_path, "compiled", backend=BackendName.COMPILED)
    np.testing.assert_array_equal(got, want)
    warned = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warned) == 1 and "the compiled network failed on samples 0..3" in warned[0], lines
    assert "InvalidCxxCompiler" in warned[0] and "`backend` torch starts a run there" in warned[0]
    assert [(r["indices"], r["network"]) for r in manifest["computed_by"]] == [([0, 10], "torch")]
    assert manifest["backend"]["backend"] == "torch" and manifest["backend"]["replaced"]["backend"] == "compiled"
    assert manifest["run_key"]["backend"] == "compiled"


def test_a_resumed_run_keeps_the_record_of_chunks_computed_before(twin_discovered, monkeypatch, tmp_path):
    run_fused = _failing_fused(monkeypatch, after=1)  # the second batch falls back to the reference loop
    first, want, _ = _run(tmp_path, "r")
    assert [(r["indices"], r["step"], r["noise_generator"]) for r in first["computed_by"]] == [
        ([0, 4], "cpu-twin", "cpu-twin"), ([4, 10], "reference", "numpy")]
    monkeypatch.setattr(sampler_module, "run_fused", run_fused)
    # Chunk 4..7 is lost; the rerun computes it again on the fused loop, and keeps the others' records.
    next((tmp_path / "r" / "chunks").glob("*/00000004-00000007.npz")).unlink()
    again, got, lines = _run(tmp_path, "r")
    assert not [ln for ln in lines if ln.startswith("warning:")]
    assert [(r["indices"], r["step"]) for r in again["computed_by"]] == [([0, 8], "cpu-twin"), ([8, 10], "reference")]
    assert "samples 4..7" in again["computed_by"][1]["why"][0], "the record of the chunk computed before"
    np.testing.assert_array_equal(got, want)


def test_the_cli_gives_one_line_when_every_loop_fails(twin_discovered, monkeypatch, tmp_path, capsys):
    from igengine.cli import main

    _failing_fused(monkeypatch)

    def broken(*args, **kwargs):
        raise KernelError("libigengine_kernels_cuda.so: gaussian failed (ERR_CUDA): unspecified launch failure")

    monkeypatch.setattr(sampler_module, "run_reference", broken)
    # --preflight off: the preflight runs the reference loop too, and would be the one to fail (in one line)
    code = main(["sample", "--n", "4", "--steps", "4", "--precision", "fp32", "--device", "cpu", "--threads", "1",
                 "--preflight", "off", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err, err
    assert lines[-1].startswith("igengine: error: samples 0..3 could not be computed on any loop:"), err
    assert "unspecified launch failure" in lines[-1]
    assert lines[:-1] == [ln for ln in lines if ln.startswith("igengine: warning: ")] and len(lines) == 2, err
    assert "IGENGINE_KERNELS=off" in lines[0]


def test_the_cli_warning_names_the_flag(twin_discovered, monkeypatch, tmp_path, capsys):
    from igengine.cli import main

    FakeGraphs(monkeypatch, fail_capture=True)
    code = main(["sample", "--n", "4", "--steps", "4", "--precision", "fp32", "--device", "cpu", "--threads", "1",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert code == 0 and len(warned) == 1 and "--capture off starts a run there" in warned[0], err


def test_load_takes_capture_like_the_cli(twin_discovered, monkeypatch):
    import igengine

    FakeGraphs(monkeypatch, fail_replay=True)
    pipe = igengine.load(precision="fp32", device="cpu", steps=4)
    assert pipe.sampler.path == "cuda-graph" and pipe.sampler.capture == "auto"
    off = igengine.load(precision="fp32", device="cpu", steps=4, capture="off")
    assert off.sampler.path == "cpu-twin"
    with pytest.warns(FallbackWarning, match="`capture` off"):
        images = pipe.images([0, 1, 2], seed=1)
    np.testing.assert_array_equal(images, off.images([0, 1, 2], seed=1))
    with pytest.raises(JobError, match="unknown `capture` 'sometimes'; choose auto or off"):
        igengine.load(capture="sometimes")
