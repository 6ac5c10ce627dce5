"""The compiled backend: parity with eager, padding of partial batches, the recompile guard, the cache.

Compiling even a tiny model takes tens of seconds on 2 CPU cores, so compiled backends are built
once per module (fixtures below) and every test that needs one is marked ``slow``. All tiny models
have every parameter random (``tests.conftest.randomize_``): the official initialisation zeroes the
adaLN and output layers, which would make both outputs identically zero.

Tolerances (the parity rule: an optimised result may have at most about twice the error of the same
maths done plainly in its dtype):
  fp32: compiled vs eager fp32, max abs <= FP32_REL * max|eager| with FP32_REL = 3e-6. Both compute
        the same fp32 maths with different summation orders and fused elementwise code (unit
        roundoff 6e-8; a dot product over these K <= 256 terms moves by ~sqrt(K) u ~ 1e-6 at worst).
        Measured on CPU: 2.3e-7 .. 3.1e-7 relative with Inductor's own linears, 4.6e-7 .. 6.6e-7 with
        the default oneDNN linears, so the bound has a 4.5x margin.
  bf16: both the compiled and the eager bf16 run are compared with a float64 run of the same weights
        (``fp64_reference``); compiled error <= 2 * eager error + BF16_SLACK * max|ref|, with the
        slack (1e-5) far below the bf16 errors themselves (measured eager bf16: 1.0e-4 .. 2.0e-3
        relative; compiled: 0.93x .. 1.0x of eager) and far above fp32 noise (3e-7).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igengine.backends import BackendError, TorchBackend
from igengine.backends.compiled import CompiledBackend, call_plan, inductor_cache_env, tf32_flags
from igengine.backends.cpu_linear import linear_route, routed
from igengine.config import Precision
from igengine.models import IGDiT, preset
from igengine.models.layers import regions_available
from tests.conftest import randomize_

ROOT = Path(__file__).resolve().parents[1]
FP32_REL = 3e-6
BF16_SLACK = 1e-5

CONFIGS = {
    "sit": preset("SiT-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8, encoder_depth=1, num_classes=10,
                  qk_norm=True),
    # LightningDiT preset options: SwiGLU, RoPE, RMSNorm; plus qk-norm (RMSNorm) here.
    "lightningdit": preset("LightningDiT-B/1", depth=2, hidden_size=64, num_heads=2, input_size=4, encoder_depth=1,
                           num_classes=10, qk_norm=True),
}


def random_model(family: str, seed: int = 0) -> IGDiT:
    return randomize_(IGDiT(CONFIGS[family]), seed=seed, scale=0.1)


def inputs(family: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = CONFIGS[family]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *c.latent_shape, generator=g), torch.rand(n, generator=g),
            torch.randint(0, c.num_classes + 1, (n,), generator=g))


def fp64_reference(model: IGDiT, x, t, y) -> tuple[torch.Tensor, torch.Tensor]:
    """The model in float64 (its norms, RoPE and time features still round through fp32 by design:
    an error ~1e-7, four orders of magnitude below bf16's)."""
    ref = copy.deepcopy(model).double()
    sinusoidal, mlp = ref.t_embedder.sinusoidal, ref.t_embedder.mlp
    ref.t_embedder.forward = lambda tt: mlp(sinusoidal(tt, 256).double())
    with torch.no_grad():
        return ref(x.double(), t.double(), y)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------------ no compiling


@pytest.mark.parametrize("rows,sizes,plan", [
    (2, (2, 4), [(0, 2, 2)]),
    (4, (2, 4), [(0, 4, 4)]),
    (1, (2, 4), [(0, 1, 2)]),
    (3, (2, 4), [(0, 3, 4)]),
    (9, (2, 4), [(0, 4, 4), (4, 4, 4), (8, 1, 2)]),
    (11, (8, 4), [(0, 8, 8), (8, 3, 4)]),
    (7, (3,), [(0, 3, 3), (3, 3, 3), (6, 1, 3)]),
])
def test_call_plan_pads_up_to_the_next_compiled_count_and_splits_above_the_largest(rows, sizes, plan):
    assert call_plan(rows, sizes) == plan


@pytest.mark.parametrize("kwargs,match", [
    (dict(row_counts=()), "row_counts"),
    (dict(row_counts=(0, 2)), "row_counts"),
    (dict(row_counts=(2.0,)), "row_counts"),
    (dict(mode="fastest"), "compile mode"),
    (dict(mode="reduce-overhead"), "needs a CUDA device"),
    (dict(allow_tf32=True, precision="reference"), "allow_tf32"),
    (dict(max_batch=0), "max_batch"),
    (dict(cpu_linear="blas"), "cpu_linear"),
    (dict(cpu_linear="routed", freezing=True), "freezing"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    args = dict(row_counts=(2,), precision="fp32") | kwargs
    with pytest.raises(BackendError, match=match):
        CompiledBackend(random_model("sit"), **args)


def test_factory_builds_the_compiled_backend_lazily_and_needs_row_counts(tmp_path):
    from igengine.backends import BACKENDS, create_backend
    from igengine.models.checkpoint import LoadedCheckpoint

    model = random_model("sit")
    loaded = LoadedCheckpoint(model=model, config=model.config, path=tmp_path / "none.pt", weights="test")
    assert "compiled" in BACKENDS
    backend = create_backend("compiled", loaded, "fp32", "cpu", row_counts=(4, 2), cache_root=tmp_path)
    assert isinstance(backend, CompiledBackend) and backend.row_counts == (2, 4)
    assert backend.compiles == 0 and not backend.warm  # nothing is compiled before the first call
    assert backend.cache_dir.parent == tmp_path / "inductor"
    with pytest.raises(BackendError, match="row_counts"):
        create_backend("compiled", loaded, "fp32", "cpu")


def test_inductor_cache_env_sets_and_restores_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    with inductor_cache_env(tmp_path / "a"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "a")
        assert (tmp_path / "a").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with inductor_cache_env(tmp_path / "b"):
        pass
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_importing_igengine_and_the_new_modules_loads_neither_dynamo_nor_cuda():
    code = ("import sys, torch, igengine, igengine.backends, igengine.backends.compiled, igengine.bench, "
            "igengine.bench.flops, igengine.bench.peak\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules), "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"


# ------------------------------------------------------------------------------- compiled fixtures


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """$IGENGINE_CACHE for every backend of this module (one cold cache per test session)."""
    root = tmp_path_factory.mktemp("igengine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGENGINE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def sit_fp32(cache_root):
    """SiT fp32 compiled for 2 and 4 rows (a batch N = 2 and its CFG step), warmed up; eager twin."""
    model = random_model("sit")
    eager = TorchBackend(copy.deepcopy(model), precision=Precision.FP32)
    compiled = CompiledBackend(copy.deepcopy(model), row_counts=(2, 4), precision=Precision.FP32)
    compiled.warmup()
    return compiled, eager, model


@pytest.fixture(scope="module")
def one_count(cache_root):
    """Backends compiled for 3 rows only, built on first use: {(family, precision): (compiled, eager, model)}.

    bf16 takes the CPU default (every linear on its route, the fc1 -> GELU fused: the production
    path); fp32 the plain Inductor path (cpu_linear="aten"), whose routed default ``sit_fp32`` covers:
    both paths are covered without more compiles."""
    built = {}

    def get(family: str, precision: Precision):
        if (family, precision) not in built:
            model = random_model(family)
            eager = TorchBackend(copy.deepcopy(model), precision=precision)
            linear = "aten" if precision == Precision.FP32 else None
            compiled = CompiledBackend(copy.deepcopy(model), row_counts=(3,), precision=precision, cpu_linear=linear)
            compiled.warmup()
            built[family, precision] = compiled, eager, model
        return built[family, precision]

    return get


# ---------------------------------------------------------------------------------- compiled tests


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sit", "lightningdit"])
def test_fp32_compiled_matches_eager_fp32(family, request):
    # SiT reuses the (2, 4) backend: 3 rows run padded through the 4-row graph.
    compiled, eager, _ = request.getfixturevalue("sit_fp32") if family == "sit" else \
        request.getfixturevalue("one_count")(family, Precision.FP32)
    x, t, y = inputs(family, 3)
    (cf, ci), (ef, ei) = compiled(x, t, y), eager(x, t, y)
    assert cf.dtype == ci.dtype == torch.float32 and cf.shape == ci.shape == x.shape
    scale = max(ef.abs().max().item(), ei.abs().max().item())
    assert scale > 0.1  # random weights: the outputs are far from zero
    assert max_err(cf, ef) <= FP32_REL * scale and max_err(ci, ei) <= FP32_REL * scale
    assert compiled.recompiles == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sit", "lightningdit"])
def test_bf16_compiled_error_is_at_most_twice_the_eager_bf16_error(family, one_count):
    compiled, eager, model = one_count(family, Precision.BF16)
    assert compiled.describe()["network_dtype"] == "bfloat16"
    assert compiled.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert compiled.model.final_layer.linear.weight.dtype == torch.float32  # heads stay fp32
    x, t, y = inputs(family, 3)
    ref = fp64_reference(model, x, t, y)
    for got_c, got_e, want in zip(compiled(x, t, y), eager(x, t, y), ref):
        scale = want.abs().max().item()
        err_c, err_e = max_err(got_c, want), max_err(got_e, want)
        assert err_e > 2e-5 * scale  # bf16 really ran (fp32 is ~3e-7)
        assert err_c <= 2 * err_e + BF16_SLACK * scale, (err_c, err_e, scale)


@pytest.mark.slow
def test_partial_and_oversized_batches_are_padded_or_split_and_match_unpadded_eager(sit_fp32):
    compiled, eager, _ = sit_fp32
    x, t, y = inputs("sit", 9)
    full = compiled(x[:4], t[:4], y[:4])  # exactly the 4-row graph, no padding
    for n in (1, 3, 5, 9):  # pads to 2, pads to 4, 4 + 1 padded to 2, 4 + 4 + 1 padded to 2
        got = compiled(x[:n], t[:n], y[:n])
        want = eager(x[:n], t[:n], y[:n])
        for g, w in zip(got, want):
            assert g.shape == w.shape == (n, *CONFIGS["sit"].latent_shape)
            assert max_err(g, w) <= FP32_REL * w.abs().max().item()
        if n == 3:
            # Padding rows are copies of row 0; rows never interact, so the three real rows of the
            # padded 4-row call are bit-identical to the same rows of an unpadded 4-row call.
            assert torch.equal(got[0], full[0][:3]) and torch.equal(got[1], full[1][:3])
    assert compiled.compiles == 2 and compiled.recompiles == 0
    compiled.check_no_recompiles()


@pytest.mark.slow
def test_no_recompile_across_n_2n_and_partial_batches_after_warmup(sit_fp32):
    from igengine.backends.cpu_linear import PACKS

    compiled, _, _ = sit_fp32
    first = dict(compiled.first_call_seconds)
    assert sorted(first) == [2, 4] and all(s > 0 for s in first.values())
    packs = PACKS["made"]
    for n in (2, 4, 2, 1, 3, 4, 6, 2):
        compiled(*inputs("sit", n, seed=n))
    assert compiled.recompiles == 0 and compiled.compiles == 2
    assert PACKS["made"] == packs  # the graphs get the same weight tensors: packed at warm-up, never again
    compiled.check_no_recompiles()
    # Inference and normal input tensors, non-contiguous ones and float64 ones take the same graphs.
    x, t, y = inputs("sit", 4)
    with torch.inference_mode():
        xi, ti, yi = x.clone(), t.clone(), y.clone()
    compiled(xi, ti, yi)
    compiled(x.double().transpose(2, 3).contiguous().transpose(2, 3), t.double(), y)
    assert compiled.recompiles == 0


@pytest.mark.slow
def test_a_forced_recompile_is_counted_and_check_no_recompiles_raises(sit_fp32):
    """Dynamo guards global state such as torch's thread count or cuBLAS's reduced-precision flag:
    changing it between calls forces a recompile that no padding can prevent; the guard must see it.
    (The flag is used here: its recompile hits the FX graph cache, a thread-count change compiles
    new C++ code, a minute on 2 cores.)"""
    _, _, model = sit_fp32
    compiled = CompiledBackend(copy.deepcopy(model), row_counts=(2,), precision=Precision.FP32)
    compiled.warmup()  # the 2-row graph is in the FX graph cache already: a cache hit
    x, t, y = inputs("sit", 2)
    compiled(x, t, y)
    compiled.check_no_recompiles()
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = not before
    try:
        compiled(x, t, y)
    finally:
        matmul.allow_fp16_reduced_precision_reduction = before
    assert compiled.recompiles >= 1
    with pytest.raises(BackendError, match=r"recompiled \d+ time\(s\) after warm-up \(graphs for rows \[\[2\]"):
        compiled.check_no_recompiles()


@pytest.mark.slow
def test_cache_lives_under_igengine_cache_and_a_hit_serves_other_weights_correctly(sit_fp32, cache_root):
    compiled, _, _ = sit_fp32
    folder = Path(compiled.describe()["cache_dir"])
    # torch-<version, '+' made '-'>-<device kind>, e.g. torch-2.13.0-cpu-cpu
    assert folder.parent == cache_root / "inductor"
    assert folder.name == f"torch-{torch.__version__.replace('+', '-')}-cpu"
    assert any(folder.rglob("*")), "Inductor wrote nothing into the igengine cache folder"
    from torch._dynamo.utils import counters

    hits = counters["inductor"]["fxgraph_cache_hit"]
    other = random_model("sit", seed=7)  # same architecture, different weights
    fresh = CompiledBackend(copy.deepcopy(other), row_counts=(2,), precision=Precision.FP32)
    fresh.warmup()
    assert counters["inductor"]["fxgraph_cache_hit"] > hits  # the graph came from the cache...
    x, t, y = inputs("sit", 2)
    want = TorchBackend(copy.deepcopy(other), precision=Precision.FP32)(x, t, y)
    for g, w in zip(fresh(x, t, y), want):  # ...and runs the new weights, not the cached model's
        assert max_err(g, w) <= FP32_REL * w.abs().max().item()


@pytest.mark.slow
def test_describe_is_json_and_records_the_compile(sit_fp32, cache_root):
    compiled, _, _ = sit_fp32
    d = json.loads(json.dumps(compiled.describe()))
    assert d["backend"] == "compiled" and d["device"] == "cpu" and d["network_dtype"] == "float32"
    assert d["row_counts"] == [2, 4] and d["compiles"] == 2 and d["recompiles"] == 0
    assert d["torch"] == torch.__version__ and d["compile_mode"] == "default"
    assert set(d["first_call_seconds"]) == {"2", "4"} and len(d["compile_seconds"]) == 2
    assert d["cache_dir"].startswith(str(cache_root))
    # CPU default: every fp32 linear of the graph takes fp32's route on this CPU (oneDNN on AVX-512,
    # Inductor's own elsewhere), and the blocks are inlined (no regions): per block qkv, proj, fc1, fc2 and
    # the adaLN linear; two time-MLP linears; per head its adaLN and output linear.
    assert d["block_regions"] is False
    on = routed(torch.float32)
    assert d["cpu_linear"] == {"float32": linear_route(torch.float32)}
    assert d["routed_linears_per_graph"] == [(5 * 2 + 2 + 2 * 2) * on] * 2
    # and each block's fc1 -> GELU(tanh) is one routed call (cpu_linear: GELU fused)
    assert d["gelus_fused_per_graph"] == [2 * on] * 2


@pytest.mark.slow
@pytest.mark.skipif(not regions_available(), reason="this torch has no torch.compiler.nested_compile_region")
def test_block_regions_trace_the_block_once_with_the_same_result(sit_fp32):
    inline, _, _ = sit_fp32
    model = random_model("sit")
    regional = CompiledBackend(copy.deepcopy(model), row_counts=(2,), precision=Precision.FP32, regions=True)
    regional.warmup()
    x, t, y = inputs("sit", 2)
    got = regional(x, t, y)
    # The block is a nested compile region (igengine.models.layers.compile_region): traced once into
    # one subgraph that both blocks call, so its 5 linear nodes are routed once, plus the 2 + 2 * 2.
    on = routed(torch.float32)
    assert regional.describe()["block_regions"] is True and regional.describe()["routed_linears_per_graph"] == [11 * on]
    assert regional.describe()["gelus_fused_per_graph"] == [1 * on]
    want = TorchBackend(copy.deepcopy(model), precision=Precision.FP32)(x, t, y)
    for g, r, w in zip(got, inline(x, t, y), want):
        assert max_err(g, w) <= FP32_REL * w.abs().max().item()
        assert max_err(r, w) <= FP32_REL * w.abs().max().item()
    # Calls alternating between the two settings: neither backend recompiles (each traced its own graph).
    regional(x, t, y)
    inline(x, t, y)
    assert inline.recompiles == 0 and regional.recompiles == 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_cuda_compiled_matches_eager_and_does_not_recompile(precision, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path))
    model = random_model("lightningdit")
    eager = TorchBackend(copy.deepcopy(model), precision=precision, device="cuda")
    compiled = CompiledBackend(copy.deepcopy(model), row_counts=(2, 4), precision=precision, device="cuda")
    compiled.warmup()
    x, t, y = (a.cuda() for a in inputs("lightningdit", 3))
    got = compiled(x, t, y)
    with tf32_flags(False):  # the compiled backend pins TF32 off; eager follows the globals (cuDNN: on)
        want = eager(x, t, y)
    if precision == Precision.FP32:
        for g, w in zip(got, want):
            assert g.device.type == "cuda" and max_err(g, w) <= FP32_REL * w.abs().max().item()
    else:
        ref = fp64_reference(model, *(a.cpu() for a in (x, t, y)))
        for g, w, r in zip(got, want, ref):
            scale = r.abs().max().item()
            assert max_err(g.cpu(), r) <= 2 * max_err(w.cpu(), r) + BF16_SLACK * scale
    compiled(x[:1], t[:1], y[:1])
    assert compiled.recompiles == 0
    assert "cuda" in Path(compiled.describe()["cache_dir"]).name
