"""oneDNN linears on the CPU (igengine.backends.cpu_linear): fp32 and bf16, GELU fused, reference keeps nn.Linear."""

import copy

import pytest
import torch
from torch import nn

from igengine.backends import TorchBackend
from igengine.backends.cpu_linear import (PACKS, OneDNNLinear, OneDNNMlp, onednn_available, onednn_linear, packed_weight,
                                         route_linears)
from igengine.config import Precision
from igengine.models import IGDiT
from igengine.models.layers import Mlp
from igengine.models.registry import preset

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear kernel")


def _model() -> IGDiT:
    torch.manual_seed(0)
    model = IGDiT(preset("SiT-S/8", input_size=16, num_classes=10))
    for p in model.parameters():  # every parameter random: the official init zeroes the heads
        nn.init.normal_(p, std=0.05)
    return model


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 16, 16, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_onednn_linear_matches_aten_in_fp32():
    """Same maths, another summation order: within fp32 rounding of a K-term dot product."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(384, 1152)
    x = torch.randn(2, 64, 384, generator=g)
    want = lin(x)
    route_linears(lin)
    assert type(lin) is OneDNNLinear
    got = lin(x)
    scale = (x.abs() @ lin.weight.abs().t()).max()  # bound on |sum| terms
    assert (got - want).abs().max() <= 384 * torch.finfo(torch.float32).eps * scale


def test_fp32_backend_routes_linears_and_reference_does_not():
    model = _model()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    fast = TorchBackend(copy.deepcopy(model), precision=Precision.FP32)
    ref = TorchBackend(copy.deepcopy(model), precision=Precision.REFERENCE)
    assert fast.onednn_linears == n_linear > 0 and fast.describe()["cpu_linear"] == "onednn"
    assert ref.onednn_linears == 0 and ref.describe()["cpu_linear"] == "aten"
    assert not any(isinstance(m, OneDNNLinear) for m in ref.model.modules())
    x, t, y = _inputs()
    (f_fast, i_fast), (f_ref, i_ref) = fast(x, t, y), ref(x, t, y)
    # fp32 tolerance of the fp32 precision against the reference network (docs/CONTRACTS.md, tolerances)
    for a, b in ((f_fast, f_ref), (i_fast, i_ref)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        assert a.abs().max() > 0


def test_reference_backend_undoes_routing_on_a_shared_model():
    """A model first used by an fp32 backend and then by a reference one runs nn.Linear again (bit for bit)."""
    model = _model()
    x, t, y = _inputs()
    want = TorchBackend(copy.deepcopy(model), precision=Precision.REFERENCE)(x, t, y)
    TorchBackend(model, precision=Precision.FP32)
    got = TorchBackend(model, precision=Precision.REFERENCE)(x, t, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bf16_backend_routes_every_linear_and_fuses_the_gelu():
    model = _model()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    backend = TorchBackend(model, precision=Precision.BF16)
    routed = [m for m in backend.model.modules() if isinstance(m, OneDNNLinear)]
    # the bf16 block matmuls and the fp32 ones (embeddings, adaLN, heads) alike
    assert len(routed) == backend.onednn_linears == n_linear
    assert {m.weight.dtype for m in routed} == {torch.float32, torch.bfloat16}
    assert all(type(b.mlp) is OneDNNMlp for b in backend.model.blocks)


def test_reference_undoes_the_fused_mlp():
    model = _model()
    TorchBackend(model, precision=Precision.FP32)
    assert all(type(b.mlp) is OneDNNMlp for b in model.blocks)
    TorchBackend(model, precision=Precision.REFERENCE)
    assert all(type(b.mlp) is Mlp for b in model.blocks)


@pytest.mark.parametrize("dtype,k_eps", [(torch.float32, 8), (torch.bfloat16, 2)])
def test_fused_gelu_linear_is_as_accurate_as_the_unfused_pair(dtype, k_eps):
    """GELU as the GEMM's post-op, against float64 maths: within the unfused pair's own error (plus a
    few ulps of the output dtype), and never a different function (a wrong activation misses by O(1))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g).to(dtype)
    w = (torch.randn(1536, 384, generator=g) * 384 ** -0.5).to(dtype)
    b = torch.randn(1536, generator=g).to(dtype)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_a_packed_weight_gives_the_plain_weight_result_bit_for_bit(dtype, activation):
    """Packing is a layout change only: every row count (the pack's hint or not, 2-D or 3-D) is unchanged."""
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


def test_a_weight_is_packed_once_and_again_after_an_in_place_change():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48)
    route_linears(lin)
    x = torch.randn(5, 64, generator=g)
    before = PACKS["made"]
    first = lin(x)
    assert PACKS["made"] == before + 1 and torch.equal(lin(x), first) and PACKS["made"] == before + 1
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # the pack of the old values must not be used
    got = lin(x)
    assert PACKS["made"] == before + 2
    assert torch.equal(got, _plain(x, lin.weight, lin.bias, "none")) and not torch.equal(got, first)


def test_an_inference_mode_weight_runs_unpacked():
    """Inference tensors have no version counter, so a pack could not see an in-place change: none is made."""
    with torch.inference_mode():
        w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(5, 64)
        before = PACKS["made"]
        assert packed_weight(w, 5) is w
        assert torch.equal(onednn_linear(x, w, b), _plain(x, w, b, "none")) and PACKS["made"] == before
