"""The CUDA kernels (csrc/igk_cuda.cu) against the reference step on the GPU, and their runtime contract.

Every test is marked ``gpu`` and skips with a reason without a GPU or a buildable CUDA library.
Nothing touches CUDA at import or collection time: the module fixture does, when a test runs.
The library comes from the normal search (igengine/_lib, IGENGINE_KERNELS_DIR) with
IGENGINE_KERNELS_BUILD=cmake (the NVRTC build has its own tests in test_nvrtc.py); if none can run on
this GPU, the fixture builds one for it into build/kernels-test-cuda/.

Tolerance: as for the CPU twin, |fused - reference| <= 1e-6 * max(1, |reference|) elementwise (indexed
against by-value launches: bit-equal, the same device code on the same scalars). The
kernel rounds like the reference's float32 operations (--fmad=false) except that PyTorch's CUDA
division by a scalar multiplies by its reciprocal (one rounding more in the SiT score), which is
far inside the bound.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from igengine.config import Family, Precision, Solver
from igengine.errors import NonFiniteError
from igengine.kernels import library
from igengine.kernels.binding import KernelInputError, fused_step, gaussian, philox_words
from igengine.sampling.launches import step_params
from igengine.noise import gaussian as ref_gaussian
from igengine.noise import philox_words as ref_philox_words
from tests import kernel_parity as P
from tests.conftest import sampler_for as make_sampler

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
TEST_BUILD = ROOT / "build" / "kernels-test-cuda"
CASES = P.step_cases()


def _arch() -> str:
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


@pytest.fixture(scope="module")
def cuda_lib() -> library.KernelLibrary:
    from igengine.kernels.build import BuildError, build

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    library._reset_for_tests()
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore", RuntimeWarning)  # a stale library is rebuilt below
        mp.setenv(library.ENV_BUILD, "cmake")  # this file tests the CMake build (the NVRTC one: test_nvrtc.py)
        lib = library.cuda_library(0)
    library._reset_for_tests()
    if lib is not None:
        return lib
    status = library.library_status("cuda", 0)
    try:
        lib_dir = build(cuda="on", cuda_arch=f"{_arch()}-real", build_dir=TEST_BUILD, lib_dir=TEST_BUILD / "lib",
                        quiet=True)
    except BuildError as exc:
        if "no CUDA compiler" in str(exc) or shutil.which("cmake") is None:
            pytest.skip(f"no usable CUDA kernel library ({status.state}: {status.detail}) and no CUDA compiler")
        pytest.fail(f"building the CUDA library for sm_{_arch()} failed: {exc}")
    lib = library.load_library(lib_dir / library.library_filename(library.CUDA_STEM), "cuda")
    if lib.cdll.igk_cuda_probe(0) != 0:
        pytest.fail(f"freshly built CUDA library cannot run here: {lib.cdll.igk_last_error().decode()}")
    return lib


@pytest.fixture
def cuda_discovered(cuda_lib, monkeypatch):
    monkeypatch.setenv(library.ENV_DIR, str(cuda_lib.path.parent))
    monkeypatch.delenv(library.ENV_SWITCH, raising=False)
    monkeypatch.setenv(library.ENV_BUILD, "cmake")
    library._reset_for_tests()
    yield cuda_lib
    library._reset_for_tests()


def _assert_parity(case, got, ref):
    errs = P.compare(case, got, ref)
    bad = {k: v for k, v in errs.items() if not v <= P.KERNEL_RTOL}
    assert not bad, f"{case.id}: relative errors above {P.KERNEL_RTOL}: {bad}"


# ---- noise contract ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 2**32 + 5, 2**64 - 1])
@pytest.mark.parametrize("stream", [0, 1, 2**32 - 1])
def test_cuda_philox_words_equal_noise_contract(cuda_lib, seed, stream):
    indices = [0, 1, 17, 2**32 - 1, 2**32, 2**40 + 3]
    got = philox_words(seed, indices, stream, 1100, device="cuda", library=cuda_lib)
    np.testing.assert_array_equal(got, ref_philox_words(seed, indices, stream, 1100))


@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (2, 3, 3), (4, 32, 32), (32, 16, 16)])
@pytest.mark.parametrize("stream", [0, 7, 2**32 - 1])
def test_cuda_gaussians_bitwise_equal_noise_contract(cuda_lib, shape, stream):
    indices = list(range(40)) + [2**33 + 1]
    got = gaussian(99, indices, stream, shape, device="cuda", library=cuda_lib).cpu()
    want = ref_gaussian(99, indices, stream, shape)
    diff = got != want
    assert not bool(diff.any()), (
        f"{int(diff.sum())} of {want.numel()} Gaussians differ, max |diff| "
        f"{float((got - want).abs().max()):.3g} (device libm vs host libm?)")


# ---- the fused step ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_fused_step_matches_planrunner_step(cuda_lib, case):
    inp = P.make_inputs(case, device="cuda")
    ref = P.reference(case, inp, device="cuda")
    got = P.fused(case, inp, library=cuda_lib)
    _assert_parity(case, got, ref)
    assert torch.equal(got["first_bad"].cpu(), torch.full((case.n,), -1))


@pytest.mark.parametrize("case", [
    P.Case(Family.SIT, "sde", True, True, True, torch.float32, n=8, shape=(4, 32, 32)),
    P.Case(Family.SIT, "sde", True, True, True, torch.bfloat16, n=3, shape=(4, 32, 32), x_offset=1),
    P.Case(Family.LIGHTNINGDIT, "heun", True, True, True, torch.float16, n=4, shape=(32, 16, 16), cfg2=True),
    P.Case(Family.LIGHTNINGDIT, "heun", True, False, True, torch.float32, n=2, shape=(32, 15, 15), cfg2=True),
    P.Case(Family.RAEV2, "euler", True, True, True, torch.bfloat16, n=2, shape=(1024, 16, 16)),
    P.Case(Family.RAEV2, "euler", True, True, False, torch.float32, n=3, shape=(3, 15, 15), t=0.03),
], ids=lambda c: c.id)
def test_cuda_fused_step_matches_reference_at_latent_sizes(cuda_lib, case):
    inp = P.make_inputs(case, device="cuda")
    _assert_parity(case, P.fused(case, inp, library=cuda_lib), P.reference(case, inp, device="cuda"))


def test_cuda_fused_step_equals_cpu_twin_bitwise(cuda_lib):
    cpu = library.cpu_library()
    if cpu is None:
        pytest.skip("CPU twin not built")
    for case in CASES[::7]:
        inp_c = P.make_inputs(case)
        inp_g = P.make_inputs(case, device="cuda")
        a, b = P.fused(case, inp_c, library=cpu), P.fused(case, inp_g, library=cuda_lib)
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), f"{case.id}: {k} differs between twin and CUDA"


def test_cuda_fused_step_in_place_and_on_a_side_stream(cuda_lib):
    case = P.Case(Family.SIT, "sde", True, True, True, n=3, shape=(4, 8, 8))
    inp = P.make_inputs(case, device="cuda")
    ref = P.reference(case, inp, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = P.fused(case, inp, library=cuda_lib, in_place=True)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_parity(case, got, ref)


def test_cuda_fused_step_flags_non_finite_rows(cuda_lib):
    case = P.Case(Family.SIT, "sde", True, True, False, n=3, shape=(3, 3, 3))
    inp = P.make_inputs(case, device="cuda")
    vf, vi = inp.outputs[0]
    vf = vf.clone()
    vf[4, 0, 0, 0] = float("inf")  # unconditional half of row 1
    inp.outputs[0] = (vf, vi)
    assert P.fused(case, inp, library=cuda_lib)["first_bad"].tolist() == [-1, case.step_index, -1]


def test_cuda_fused_step_can_be_captured_in_a_cuda_graph(cuda_lib):
    P.check_step_capture(cuda_lib)


def test_cuda_binding_rejects_mixed_devices(cuda_lib):
    case = P.Case(Family.SIT, "euler", False, False, False, n=2, shape=(3, 2, 2))
    inp = P.make_inputs(case, device="cuda")
    p = step_params(case.family, P.sampler_config(case).guidance, inp.step)
    x = inp.x.reshape(2, 12)
    vf, vi = inp.outputs[0]
    with pytest.raises(KernelInputError, match="v_final is on cpu"):
        fused_step(p, x, vf.cpu(), None, x_out=torch.empty_like(x), library=cuda_lib)
    with pytest.raises(KernelInputError, match="x_out is on cpu"):
        fused_step(p, x, vf, None, x_out=torch.empty(2, 12), library=cuda_lib)
    cpu = library.cpu_library()
    if cpu is not None:
        with pytest.raises(KernelInputError, match="cannot run on tensors of cuda"):
            fused_step(p, x, vf, None, x_out=torch.empty_like(x), library=cpu)


# ---- the fused loop end to end ------------------------------------------------------------------

@pytest.mark.parametrize("name, solver, cfg_interval, shift", P.E2E_RUNS,
                         ids=[f"{r[0]}-{r[1].value}" for r in P.E2E_RUNS])
def test_cuda_fused_loop_equals_the_reference_loop(cuda_discovered, name, solver, cfg_interval, shift):
    backend = P.tiny_backend(name, device="cuda")
    cfg = P.e2e_sampler(solver, cfg_interval, shift)
    fused = replace(make_sampler(backend, cfg), capture="off")
    assert fused.path == "cuda" and fused.generator == "cuda-kernel"
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    ref = make_sampler(backend, cfg, kernels="off")(5, indices, labels)
    got = fused(5, indices, labels)
    assert got.device.type == "cuda"
    assert P.rel_err(got, ref) <= P.E2E_RTOL, P.rel_err(got, ref)


def test_cuda_fused_loop_bf16_network(cuda_discovered):
    """The fused loop (captured, the CUDA default) through a bf16 network, by the bf16 rule
    (docs/CONTRACTS.md "Tolerances", the parity rule): its error against the same network in fp32
    through the reference loop is at most about twice the error of the plain bf16 loop (kernels off,
    launched one by one). Not within 1e-5 of the plain bf16 loop: a GEMM replayed from a CUDA graph
    may accumulate in another order than the eager one, a bf16 cast of its output then rounds the other
    way (a 2^-8 relative step), and the steps after carry that on (~1e-3): rounding,
    which the rule bounds, not a bug."""
    cfg = P.e2e_sampler(Solver.HEUN2, (0.19, 1.0), 0.3, precision=Precision.BF16)
    indices, labels = torch.tensor([0, 1]), torch.tensor([4, 5])
    bf16 = P.tiny_backend("LightningDiT-B/1", Precision.BF16, device="cuda")
    fp32 = P.tiny_backend("LightningDiT-B/1", Precision.FP32, device="cuda")  # the same (seeded) weights
    truth = make_sampler(fp32, replace(cfg, precision=Precision.FP32), kernels="off")(1, indices, labels)
    plain = make_sampler(bf16, cfg, kernels="off")(1, indices, labels)
    fused = make_sampler(bf16, cfg)
    assert fused.path == "cuda-graph"
    got = fused(1, indices, labels)
    plain_err = P.rel_err(plain, truth)
    assert plain_err > 0, "the bf16 network gave fp32's numbers: it did not run in bf16"
    assert P.rel_err(got, truth) <= 2 * plain_err, (P.rel_err(got, truth), plain_err)


def test_cuda_reference_loop_draws_its_noise_on_the_device(cuda_discovered):
    """The plain loop's SDE noise comes from the CUDA generator (no host NumPy), with the same numbers."""
    from igengine.sampling.randomness import NUMPY

    backend = P.tiny_backend("SiT-S/2", Precision.REFERENCE, device="cuda")
    cfg = P.e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, precision=Precision.REFERENCE, steps=4)
    device_rng = make_sampler(backend, cfg)
    assert device_rng.path == "reference" and device_rng.generator == "cuda-kernel"
    indices, labels = torch.tensor([0, 1]), torch.tensor([4, 5])
    assert torch.equal(device_rng(1, indices, labels), make_sampler(backend, cfg, randomness=NUMPY)(1, indices, labels))


# ---- indexed launches and the captured loop ------------------------------------------------------

INDEXED_CASES = CASES[::9]


@pytest.mark.parametrize("case", INDEXED_CASES, ids=[c.id for c in INDEXED_CASES])
def test_cuda_indexed_step_equals_the_by_value_step_bitwise(cuda_lib, case):
    P.check_indexed_equals_by_value(case, cuda_lib)


def test_cuda_refused_indexed_launch_records_the_fault_on_the_device(cuda_lib):
    P.check_refused_indexed_launch(cuda_lib)


def test_cuda_captured_loop_reports_a_refused_launch_after_the_run(cuda_discovered):
    from igengine.sampling.captured import CapturedLoop

    backend = P.tiny_backend("SiT-S/2", device="cuda")
    s = make_sampler(backend, P.e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, steps=3))
    loop = CapturedLoop(s.net, s.plan, s.facts, 1, torch.tensor([0, 1]), torch.tensor([2, 3]), device=s.device,
                        library=cuda_discovered)
    loop.table[1].zero_()  # kind SDE without the drift flag: refused where the kernel reads it
    loop.run()
    with pytest.raises(library.KernelError, match="launch 1 of 3 was refused on the device .KIND"):
        loop.finish()


@pytest.mark.parametrize("name, solver, cfg_interval, shift", P.E2E_RUNS,
                         ids=[f"{r[0]}-{r[1].value}" for r in P.E2E_RUNS])
def test_cuda_captured_loop_equals_the_reference_loop(cuda_discovered, name, solver, cfg_interval, shift):
    backend = P.tiny_backend(name, device="cuda")
    cfg = P.e2e_sampler(solver, cfg_interval, shift)
    captured = make_sampler(backend, cfg)
    assert captured.path == "cuda-graph" and captured.generator == "cuda-kernel"
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    ref = make_sampler(backend, cfg, kernels="off")(5, indices, labels)
    fused = replace(captured, capture="off")(5, indices, labels)
    got = captured(5, indices, labels)
    assert captured.path == "cuda-graph" and captured.fallbacks == (), "the captured loop fell back: " + "; ".join(
        f.message for f in captured.fallbacks)
    assert got.device.type == "cuda"
    assert P.rel_err(got, ref) <= P.E2E_RTOL, P.rel_err(got, ref)
    assert P.rel_err(got, fused) <= P.E2E_RTOL, P.rel_err(got, fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_raev2_fused_and_captured_loops_equal_the_reference_loop(cuda_discovered, dtype):
    """A short RAEv2 plan (IG and CFG switching, an unconditional IG scale of its own, times below
    t_eps) through a deterministic x-prediction network: fused and captured loops on CUDA against the
    reference loop on CUDA. The velocity divides by a float32 tensor on both sides (no reciprocal)."""
    from igengine.sampling import Sampler
    from igengine.sampling.plan import build_plan

    plan = build_plan(Family.RAEV2, P.raev2_sampler())
    facts = P.raev2_facts((4, 16, 16))
    captured = Sampler(P.XPredictionNet(dtype), plan, facts, Precision.FP32, "cuda")
    assert captured.path == "cuda-graph"
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    ref = replace(captured, kernels="off")(5, indices, labels)
    fused = replace(captured, capture="off")
    assert fused.path == "cuda"
    got_fused = fused(5, indices, labels)
    got = captured(5, indices, labels)
    assert captured.fallbacks == (), "; ".join(f.message for f in captured.fallbacks)
    assert P.rel_err(got_fused, ref) <= P.E2E_RTOL, P.rel_err(got_fused, ref)
    assert P.rel_err(got, ref) <= P.E2E_RTOL, P.rel_err(got, ref)
    assert P.rel_err(got, got_fused) <= P.E2E_RTOL, P.rel_err(got, got_fused)


def test_cuda_sampler_captures_once_per_batch_size_and_resets_in_place(cuda_discovered, monkeypatch):
    """Batches of 2 (new seeds, indices, labels), one of 1, then 2 again: two graphs per batch size,
    each batch within the tolerance of the reference loop, no fallback."""
    made = []
    real_graph = torch.cuda.CUDAGraph

    def counted(*args, **kwargs):
        made.append(real_graph(*args, **kwargs))
        return made[-1]

    backend = P.tiny_backend("LightningDiT-B/1", device="cuda")
    cfg = P.e2e_sampler(Solver.HEUN2, (0.19, 1.0), 0.3)
    captured = make_sampler(backend, cfg)
    reference = make_sampler(backend, cfg, kernels="off")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", counted)
    batches = [(5, [0, 1], [4, 5]), (2**40 + 1, [2**33, 7], [9, 0]), (5, [3], [3]), (6, [0, 1], [4, 5])]
    for seed, idx, lab in batches:
        got = captured(seed, torch.tensor(idx), torch.tensor(lab))
        ref = reference(seed, torch.tensor(idx), torch.tensor(lab))
        assert P.rel_err(got, ref) <= P.E2E_RTOL, (seed, idx, P.rel_err(got, ref))
    assert captured.path == "cuda-graph" and captured.fallbacks == ()
    assert len(made) == 4 and sorted(captured._ladder.loops) == [1, 2], "one graph per row count and batch size"


def test_cuda_a_fault_on_the_device_falls_back_to_the_fused_loop(cuda_discovered):
    backend = P.tiny_backend("SiT-S/2", device="cuda")
    cfg = P.e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, steps=3)
    seen = []
    captured = replace(make_sampler(backend, cfg), on_fallback=seen.append)
    indices, labels = torch.tensor([0, 1]), torch.tensor([2, 3])
    captured(1, indices, labels)
    captured._ladder.loops[2].table[1].zero_()  # kind SDE without the drift flag: refused on the device
    got = captured(1, indices, labels)  # the seed is unchanged: the reset keeps the corrupted table
    assert captured.path == "cuda" and len(seen) == 1 and "refused on the device (KIND" in seen[0].message
    ref = make_sampler(backend, cfg, kernels="off")(1, indices, labels)
    assert P.rel_err(got, ref) <= P.E2E_RTOL


def test_cuda_captured_loop_replays_one_graph_per_launch_without_host_sync(cuda_discovered, monkeypatch):
    from igengine.sampling.captured import CapturedLoop

    backend = P.tiny_backend("LightningDiT-B/1", device="cuda")
    cfg = P.e2e_sampler(Solver.HEUN2, (0.19, 1.0), 0.3)
    s = make_sampler(backend, cfg)
    indices, labels = torch.tensor([0, 5]), torch.tensor([4, 1])
    loop = CapturedLoop(s.net, s.plan, s.facts, 3, indices, labels, device=s.device, library=cuda_discovered)
    loop.capture()
    assert sorted(loop.graphs) == sorted(set(loop.rows)) == [1, 2], "one graph per network row count"
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays.append(graph)
        return real_replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the loop raises
    try:
        loop.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(replays) == loop.num_launches == s.plan.nfe
    assert all(g is loop.graphs[m] for g, m in zip(replays, loop.rows))
    got = loop.finish()
    ref = make_sampler(backend, cfg, kernels="off")(3, indices, labels)
    assert P.rel_err(got, ref) <= P.E2E_RTOL


@pytest.mark.parametrize("solver, t_index", [(Solver.SDE, 5), (Solver.ODE_HEUN, 3)])
def test_cuda_captured_loop_reports_non_finite_like_the_reference_loop(cuda_discovered, solver, t_index):
    backend = P.tiny_backend("SiT-S/2", device="cuda")
    cfg = P.e2e_sampler(solver, (0.0, 0.7), 0.0)
    captured = make_sampler(backend, cfg)
    net = P.TimeNaNInjector(captured.net, captured.plan.steps[t_index].t_cur, row=1)
    indices, labels = torch.tensor([7, 8, 9]), torch.tensor([1, 2, 3])
    errors = []
    for sampler in (replace(make_sampler(backend, cfg, kernels="off"), net=net), replace(captured, net=net)):
        with pytest.raises(NonFiniteError) as info:
            sampler(2, indices, labels)
        errors.append((sampler.path, info.value.step, info.value.indices))
    assert [e[0] for e in errors] == ["reference", "cuda-graph"]
    assert errors[0][1:] == errors[1][1:] and errors[0][2] == [8]


# ---- a library built for another GPU falls back -------------------------------------------------

def test_library_for_another_gpu_falls_back_with_one_warning(cuda_lib, tmp_path, monkeypatch):
    from igengine.kernels.build import BuildError, build

    other = "80-real" if int(_arch()) >= 90 else "90-real"
    try:
        lib_dir = build(cuda="on", cuda_arch=other, build_dir=tmp_path / "b", lib_dir=tmp_path / "lib", quiet=True)
    except BuildError as exc:
        pytest.skip(f"cannot build a library for sm_{other}: {exc}")
    monkeypatch.setenv(library.ENV_DIR, str(lib_dir))
    monkeypatch.setenv(library.ENV_BUILD, "cmake")  # auto would go on to the NVRTC build (test_nvrtc.py)
    library._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="cannot run on cuda:0") as record:
            assert library.cuda_library(0) is None
            assert library.cuda_library(0) is None  # cached: no second warning
        assert len([w for w in record if "igengine kernels" in str(w.message)]) == 1
        assert library.kernel_path("cuda:0") == "reference"
        assert library.describe()["cuda"]["state"] == "unusable"
    finally:
        library._reset_for_tests()


def test_gpu_the_cmake_library_passes_its_self_test_with_every_check(cuda_lib, twin):
    """The self-test the loader's caller runs (igengine.kernels.trusted) on the CMake build: noise,
    by-value steps with every output dtype and the scalar tail, indexed launches, CUDA-graph replays."""
    from igengine.kernels import selftest

    notes = selftest.check_against_reference(cuda_lib, 0, twin)
    assert [n.split(" ")[0] for n in notes] == ["noise:", "by-value", "indexed", "captured"], notes


def test_gpu_a_sampler_gets_the_cmake_library_after_its_self_test(cuda_discovered):
    from igengine.kernels import trusted

    lib = trusted.library_for("cuda:0")
    assert lib is not None and lib.build == "cmake"
    assert trusted.self_test_notes(0, "cmake")[-1].startswith("captured launches")
