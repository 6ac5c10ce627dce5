"""CPU linears (igengine.backends.cpu_linear): each dtype's route chosen by what the CPU has, GELU fused,
packed or widened weights kept, reference keeps nn.Linear.

Routes depend on the CPU, so the route decisions are tested with ``cpu_features`` replaced (an AVX-512 BF16
CPU, an AVX-512 CPU whose oneDNN has bf16 through AVX512-BW, an AVX2-only CPU), and the AVX2-only case runs
for real in a subprocess with oneDNN and ATen held to AVX2 (``AVX2_ONLY``): on an AVX-512 CPU that is what an
AVX2-only CPU gives (oneDNN refuses bf16 with the same message), on an AVX2-only CPU it changes nothing.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from igengine.backends import TorchBackend
from igengine.backends import cpu_linear as cl
from igengine.backends.cpu_linear import (PACKS, UPCASTS, CpuFeatures, CpuLinear, CpuMlp, cpu_features, cpu_linear,
                                         fp32_gemm_linear, linear_route, onednn_available, onednn_linear, packed_weight,
                                         route_linears, routed_count)
from igengine.config import Precision
from igengine.models import IGDiT
from igengine.models.layers import Mlp
from igengine.models.registry import preset

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear kernel")
needs_onednn_bf16 = pytest.mark.skipif(not cpu_features().onednn_bf16,
                                       reason="oneDNN has no bf16 on this CPU (needs AVX512 BW/VL/DQ or AVX-NE-CONVERT)")

AVX512_BF16 = CpuFeatures("AVX512", onednn=True, onednn_bf16=True)
AVX2_ONLY = CpuFeatures("AVX2", onednn=True, onednn_bf16=False)
# What an AVX2-only CPU gives, on any x86 CPU: ATen's kernels, oneDNN and MKL held to AVX2.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture
def cpu(monkeypatch):
    """Set the CpuFeatures the routes are decided from (``cpu(AVX2_ONLY)``)."""
    def set_(features: CpuFeatures) -> None:
        monkeypatch.setattr(cl, "cpu_features", lambda: features)
    return set_


def _model() -> IGDiT:
    torch.manual_seed(0)
    model = IGDiT(preset("SiT-S/8", input_size=16, num_classes=10))
    for p in model.parameters():  # every parameter random: the official init zeroes the heads
        nn.init.normal_(p, std=0.05)
    return model


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 16, 16, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def _gemm_operands(dtype, m=256, k=384, n=1536, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


# ------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize("features,fp32,bf16", [
    (AVX512_BF16, "onednn", "onednn"),
    (CpuFeatures("AVX512", onednn=True, onednn_bf16=False), "onednn", "fp32-gemm"),
    (AVX2_ONLY, "aten", "fp32-gemm"),  # oneDNN's fp32 ran slower than MKL there; oneDNN refuses bf16
    (CpuFeatures("AVX2", onednn=True, onednn_bf16=True), "aten", "onednn"),  # AVX-NE-CONVERT CPUs
    (CpuFeatures("AVX512", onednn=False, onednn_bf16=False), "aten", "fp32-gemm"),  # a torch without oneDNN
])
def test_each_dtype_route_follows_the_cpu_features(cpu, features, fp32, bf16):
    cpu(features)
    assert linear_route(torch.float32) == fp32 and linear_route(torch.bfloat16) == bf16
    assert linear_route(torch.float16) == "aten"
    assert cl.routes() == {"float32": fp32, "bfloat16": bf16, "cpu_capability": features.capability,
                           "onednn_bf16": features.onednn_bf16}


def test_this_cpu_features_are_what_torch_reports():
    f = cpu_features()
    assert f.capability == torch.backends.cpu.get_cpu_capability()
    assert f.onednn == onednn_available() and f.onednn_bf16 == cl.cpu_native_low_precision(torch.bfloat16)


def test_an_avx2_only_cpu_never_sends_bf16_to_onednn(cpu, monkeypatch):
    """What crashed on AVX2-only CPUs: bf16 linears routed to oneDNN without asking whether it has bf16."""
    cpu(AVX2_ONLY)

    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")

    monkeypatch.setattr(cl, "onednn_linear", refuse)
    x, w, b = _gemm_operands(torch.bfloat16, m=8, k=32, n=16)
    assert torch.equal(cpu_linear(x, w, b), fp32_gemm_linear(x, w, b))
    model = _model()
    backend = TorchBackend(model, precision=Precision.BF16)
    assert backend.describe()["cpu_linear"] == {"bfloat16": "fp32-gemm", "float32": "aten"}
    out = backend(*_inputs())
    assert all(torch.isfinite(o).all() and o.abs().max() > 0 for o in out)


# ----------------------------------------------------------------------------------- the fp32-gemm route


@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_fp32_gemm_route_is_a_bf16_gemm_rounded_once(activation):
    """The bf16 values, an fp32 product, one rounding: against float64 maths within half a bf16 ulp of the output
    plus the fp32 accumulation error, and the same as rounding the float64 result where that is not a tie."""
    x, w, b = _gemm_operands(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    if activation == "gelu_tanh":
        exact = torch.nn.functional.gelu(exact, approximate="tanh")
    got = fp32_gemm_linear(x, w, b, activation)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    half_ulp = exact.abs() * 2.0 ** -8  # bf16 has 8 significant bits: rounding is within 2^-8 relative
    accumulation = 384 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().t()).max()
    assert ((got.double() - exact).abs() <= half_ulp + accumulation + 1e-30).all()
    # and it is nearly always the correctly rounded float64 result (differences only near ties)
    assert (got == exact.to(torch.bfloat16)).double().mean() > 0.99
    with pytest.raises(ValueError, match="activation"):
        fp32_gemm_linear(x, w, b, "relu")


@needs_onednn_bf16
def test_fp32_gemm_route_agrees_with_onednn_bf16_within_one_rounding():
    """Where both run: the same maths in another summation order, so at most one bf16 ulp apart."""
    x, w, b = _gemm_operands(torch.bfloat16)
    for activation in ("none", "gelu_tanh"):
        a = fp32_gemm_linear(x, w, b, activation).double()
        o = onednn_linear(x, w, b, activation).double()
        assert ((a - o).abs() <= a.abs().clamp_min(o.abs()) * 2.0 ** -7 + 1e-6).all(), activation


def test_a_widened_weight_is_made_once_and_again_after_an_in_place_change(cpu):
    cpu(AVX2_ONLY)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    route_linears(lin)
    assert type(lin) is CpuLinear
    x = torch.randn(5, 64).to(torch.bfloat16)
    before = UPCASTS["made"]
    first = lin(x)
    assert UPCASTS["made"] == before + 1 and torch.equal(lin(x), first) and UPCASTS["made"] == before + 1
    with torch.no_grad():
        lin.weight.mul_(-2.0)
    got = lin(x)
    assert UPCASTS["made"] == before + 2 and torch.equal(got, fp32_gemm_linear(x, lin.weight.detach().clone(), lin.bias))
    assert not torch.equal(got, first)


# --------------------------------------------------------------------------------------- the backends


def test_fp32_backend_routes_linears_as_the_cpu_says_and_reference_does_not():
    model = _model()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    fast = TorchBackend(copy.deepcopy(model), precision=Precision.FP32)
    ref = TorchBackend(copy.deepcopy(model), precision=Precision.REFERENCE)
    route = linear_route(torch.float32)
    assert fast.describe()["cpu_linear"] == {"float32": route}
    assert fast.routed_linears == (n_linear if route != "aten" else 0)
    assert ref.routed_linears == 0 and ref.describe()["cpu_linear"] == {"float32": "aten"}
    assert not any(isinstance(m, CpuLinear) for m in ref.model.modules())
    x, t, y = _inputs()
    (f_fast, i_fast), (f_ref, i_ref) = fast(x, t, y), ref(x, t, y)
    # fp32 tolerance of the fp32 precision against the reference network (docs/CONTRACTS.md, tolerances)
    for a, b in ((f_fast, f_ref), (i_fast, i_ref)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        assert a.abs().max() > 0


@needs_onednn
def test_on_an_avx512_cpu_fp32_backend_routes_every_linear_through_onednn(cpu):
    cpu(AVX512_BF16)
    model = _model()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    fast = TorchBackend(model, precision=Precision.FP32)
    assert fast.routed_linears == n_linear > 0 and fast.describe()["cpu_linear"] == {"float32": "onednn"}
    assert all(type(b.mlp) is CpuMlp for b in fast.model.blocks)


def test_on_an_avx2_cpu_fp32_runs_plain_nn_linear_bit_for_bit_like_reference(cpu):
    """No CPU runs a slower path than plain MKL: where oneDNN's fp32 is not chosen, fp32 runs nn.Linear."""
    cpu(AVX2_ONLY)
    model = _model()
    fast = TorchBackend(copy.deepcopy(model), precision=Precision.FP32)
    assert fast.routed_linears == 0 and fast.describe()["cpu_linear"] == {"float32": "aten"}
    assert not any(isinstance(m, (CpuLinear, CpuMlp)) for m in fast.model.modules())
    ref = TorchBackend(copy.deepcopy(model), precision=Precision.REFERENCE)
    x, t, y = _inputs()
    assert all(torch.equal(a, b) for a, b in zip(fast.model(x, t, y), ref.model(x, t, y)))


def test_reference_backend_undoes_routing_on_a_shared_model():
    """A model first used by an fp32 backend and then by a reference one runs nn.Linear again (bit for bit)."""
    model = _model()
    x, t, y = _inputs()
    want = TorchBackend(copy.deepcopy(model), precision=Precision.REFERENCE)(x, t, y)
    TorchBackend(model, precision=Precision.FP32)
    got = TorchBackend(model, precision=Precision.REFERENCE)(x, t, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("features", [AVX512_BF16, AVX2_ONLY], ids=["avx512-bf16", "avx2"])
def test_bf16_backend_routes_every_linear_and_fuses_the_gelu(cpu, features):
    cpu(features)
    model = _model()
    backend = TorchBackend(model, precision=Precision.BF16)
    routed = [m for m in backend.model.modules() if isinstance(m, CpuLinear)]
    dtypes = {m.weight.dtype for m in routed}
    # the bf16 block matmuls always; the fp32 ones (embeddings, adaLN, heads) where fp32 has a route
    assert torch.bfloat16 in dtypes and (torch.float32 in dtypes) == (features is AVX512_BF16)
    assert len(routed) == backend.routed_linears == routed_count(backend.model)
    assert backend.describe()["cpu_linear"] == {"bfloat16": linear_route(torch.bfloat16),
                                                 "float32": linear_route(torch.float32)}
    assert all(type(b.mlp) is CpuMlp for b in backend.model.blocks)


def test_bf16_backend_on_an_avx2_cpu_is_within_the_bf16_rule_of_the_avx512_route(cpu):
    """The two bf16 routes compute the same maths: each within the bf16 rule of an fp32 reference network."""
    x, t, y = _inputs()
    ref = TorchBackend(_model(), precision=Precision.REFERENCE)(x, t, y)
    outs = {}
    for name, features in (("avx512", AVX512_BF16), ("avx2", AVX2_ONLY)):
        if name == "avx512" and not cpu_features().onednn_bf16:
            continue
        cpu(features)
        outs[name] = TorchBackend(_model(), precision=Precision.BF16)(x, t, y)
    for name, out in outs.items():
        for got, want in zip(out, ref):
            # bf16 networks: a few bf16 ulps (2^-8 relative) of the output's scale, through 4 blocks
            assert (got - want).abs().max() <= 0.05 * want.abs().max(), name


def test_reference_undoes_the_fused_mlp(cpu):
    cpu(AVX512_BF16)
    model = _model()
    TorchBackend(model, precision=Precision.FP32)
    assert all(type(b.mlp) is CpuMlp for b in model.blocks)
    TorchBackend(model, precision=Precision.REFERENCE)
    assert all(type(b.mlp) is Mlp for b in model.blocks)


# ------------------------------------------------------------------------------------ the oneDNN kernel


@needs_onednn
@pytest.mark.parametrize("dtype,k_eps", [(torch.float32, 8), (torch.bfloat16, 2)])
def test_fused_gelu_linear_is_as_accurate_as_the_unfused_pair(dtype, k_eps):
    """GELU as the GEMM's post-op, against float64 maths: within the unfused pair's own error (plus a
    few ulps of the output dtype), and never a different function (a wrong activation misses by O(1))."""
    if dtype == torch.bfloat16 and not cpu_features().onednn_bf16:
        pytest.skip("oneDNN has no bf16 on this CPU (the fp32-gemm route serves bf16 here)")
    x, w, b = _gemm_operands(dtype)
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), w.double(), b.double()), approximate="tanh")
    fused = onednn_linear(x, w, b, "gelu_tanh").double()
    unfused = torch.nn.functional.gelu(onednn_linear(x, w, b), approximate="tanh").double()
    ulp = torch.finfo(dtype).eps * exact.abs().max()
    assert (fused - exact).abs().max() <= (unfused - exact).abs().max() + k_eps * ulp
    assert (fused - exact).abs().max() < 0.05 * exact.abs().max()
    with pytest.raises(ValueError, match="activation"):
        onednn_linear(x, w, b, "relu")


def _plain(x, w, b, activation):
    """oneDNN's linear on the plain (unpacked) weight: what onednn_linear computed before packing."""
    attr, algorithm = ("gelu", "tanh") if activation == "gelu_tanh" else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algorithm)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_a_packed_weight_gives_the_plain_weight_result_bit_for_bit(dtype, activation):
    """Packing is a layout change only: every row count (the pack's hint or not, 2-D or 3-D) is unchanged."""
    if dtype == torch.bfloat16 and not cpu_features().onednn_bf16:
        pytest.skip("oneDNN has no bf16 on this CPU (the fp32-gemm route serves bf16 here)")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    pw = packed_weight(w, 40)
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        assert pw is not w and pw.layout == torch._mkldnn  # really packed, else this test compares w with w
    for shape in ((40, 64), (7, 64), (2, 20, 64), (3, 33, 64)):
        x = torch.randn(*shape, generator=g).to(dtype)
        want = _plain(x, w, b, activation)
        assert want.abs().max() > 0 and torch.equal(onednn_linear(x, w, b, activation), want), shape


@needs_onednn
def test_a_weight_is_packed_once_and_again_after_an_in_place_change(cpu):
    cpu(AVX512_BF16)  # fp32 on the oneDNN route (oneDNN's fp32 GEMM runs on AVX2 CPUs too)
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48).requires_grad_(False)  # as the backends hold their models
    route_linears(lin)
    assert type(lin) is CpuLinear
    x = torch.randn(5, 64, generator=g)
    before = PACKS["made"]
    first = lin(x)
    assert PACKS["made"] == before + 1 and torch.equal(lin(x), first) and PACKS["made"] == before + 1
    lin.weight.mul_(-2.0)  # the pack of the old values must not be used
    got = lin(x)
    assert PACKS["made"] == before + 2
    # the result of a fresh pack of the new values (not _plain: on AVX2-only CPUs oneDNN's packed and plain
    # fp32 kernels may round differently, and fp32 does not take oneDNN there)
    fresh = onednn_linear(x, lin.weight.clone(), lin.bias)
    assert torch.equal(got, fresh) and not torch.equal(got, first)


@needs_onednn
def test_an_inference_mode_weight_runs_unpacked():
    """Inference tensors have no version counter, so a pack could not see an in-place change: none is made."""
    with torch.inference_mode():
        w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(5, 64)
        before = PACKS["made"]
        assert packed_weight(w, 5) is w
        assert torch.equal(onednn_linear(x, w, b), _plain(x, w, b, "none")) and PACKS["made"] == before


# -------------------------------------------------------------------- a real AVX2-only run, end to end


@pytest.mark.skipif(sys.platform != "linux" or not torch.backends.cpu.get_cpu_capability().startswith(("AVX", "DEFAULT")),
                    reason="the AVX2 limits of ATen, oneDNN and MKL exist on x86 only")
def test_bf16_sampling_runs_on_an_avx2_only_cpu(tmp_path):
    """`igengine sample --precision bf16` on an AVX2-only CPU: it ended in oneDNN's bf16 refusal (a traceback);
    now the bf16 linears take the fp32 GEMM, and the manifest says so."""
    env = {**os.environ, **AVX2_ENV}
    probe = subprocess.run([sys.executable, "-c", "import torch; from igengine.backends.cpu_linear import routes; "
                            "import json; print(json.dumps(routes()))"], env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"float32": "aten", "bfloat16": "fp32-gemm", "cpu_capability": "AVX2",
                                        "onednn_bf16": False}
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "igengine", "sample", "--n", "4", "--steps", "4", "--precision", "bf16",
                          "--threads", "1", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["cpu_linear"] == {"bfloat16": "fp32-gemm", "float32": "aten"}


def test_igengine_info_says_which_route_each_dtype_takes(capsys, cpu):
    from igengine.cli import main

    cpu(AVX2_ONLY)
    assert main(["info"]) == 0
    facts = json.loads(capsys.readouterr().out)["cpu_linear"]
    assert facts == {"float32": "aten", "bfloat16": "fp32-gemm", "cpu_capability": "AVX2", "onednn_bf16": False}


@pytest.mark.parametrize("features,says", [
    (AVX512_BF16, "`fp32` and `bf16` run faster GEMMs (oneDNN) on this CPU"),
    (AVX2_ONLY, "`fp32` runs the same fp32 GEMMs as `reference` here (CPU capability AVX2), so little faster; `bf16` "
                "has no bf16 GEMM on this CPU (its linears run the fp32 GEMM): no faster than `fp32`"),
])
def test_the_default_precision_note_says_what_is_true_of_this_cpu(cpu, features, says):
    """It used to say "`fp32` and `bf16` run faster on a CPU" on every CPU, bf16 crashing on some."""
    import igengine

    cpu(features)
    pipe = igengine.load()
    assert pipe.precision == Precision.REFERENCE
    assert any(says in note for note in pipe.notes), pipe.notes
