"""Measured matmul peak: a quick CPU measurement, the 2 n^3 FLOP convention, argument checks."""

import math

import pytest
import torch

from igengine.bench.peak import matmul_peak


def test_cpu_fp32_peak_is_positive_finite_and_counts_two_n_cubed():
    r = matmul_peak(torch.float32, "cpu", size=256, repeats=3)
    assert r["flop"] == 2 * 256**3
    assert r["size"] == 256 and r["repeats"] == 3 and r["dtype"] == "float32" and r["timer"] == "time.perf_counter"
    for key in ("median_flops", "max_flops", "median_s", "min_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    # The rates are the FLOP count over the measured times (max over the fastest repeat).
    assert r["median_flops"] == pytest.approx(r["flop"] / r["median_s"])
    assert r["max_flops"] == pytest.approx(r["flop"] / r["min_s"])
    assert r["max_flops"] >= r["median_flops"]


def _expected_kernels(dtype) -> set:
    from igengine.backends.cpu_linear import linear_route, routed

    return {"torch.mm", f"{linear_route(dtype)} linear"} if routed(dtype) else {"torch.mm"}


def test_cpu_fp32_peak_is_the_faster_of_mm_and_the_routed_linear():
    r = matmul_peak(torch.float32, "cpu", size=128, repeats=3)
    timed = r["kernels_timed"]
    assert set(timed) == _expected_kernels(torch.float32)
    assert r["kernel"] == max(timed, key=timed.get)
    assert r["median_flops"] == pytest.approx(timed[r["kernel"]])
    mm_only = matmul_peak(torch.float32, "cpu", size=128, repeats=1, kernels="mm")
    assert set(mm_only["kernels_timed"]) == {"torch.mm"} and mm_only["kernel"] == "torch.mm"
    # bf16 too: every CPU routes bf16 linears (oneDNN, or the fp32 GEMM where oneDNN has no bf16).
    bf16 = set(matmul_peak(torch.bfloat16, "cpu", size=32, repeats=1)["kernels_timed"])
    assert bf16 == _expected_kernels(torch.bfloat16) and len(bf16) == 2


def test_cpu_low_precision_default_size_follows_the_native_units():
    from igengine.backends.cpu_linear import cpu_native_low_precision

    for dtype in (torch.bfloat16, torch.float16):
        r = matmul_peak(dtype, "cpu", repeats=1, warmup=0)
        # Native units: the fp32 size (the product is as fast); without them a small one (~10x slower).
        assert r["size"] == (1024 if cpu_native_low_precision(dtype) else 256), dtype
    assert cpu_native_low_precision(torch.float32) is False


def test_cpu_peak_of_a_rectangular_product_counts_two_m_k_n():
    r = matmul_peak(torch.float32, "cpu", shape=(96, 64, 160), repeats=2)
    assert r["shape"] == [96, 64, 160] and r["size"] is None and r["flop"] == 2 * 96 * 64 * 160
    assert r["median_flops"] == pytest.approx(r["flop"] / r["median_s"])


def test_cpu_peak_restores_the_tf32_flag():
    before = torch.backends.cuda.matmul.allow_tf32
    matmul_peak(torch.float32, "cpu", size=64, repeats=1, allow_tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=torch.int32), "dtype"),
    (dict(size=0), "size"),
    (dict(repeats=0), "repeats"),
    (dict(dtype=torch.bfloat16, allow_tf32=True), "allow_tf32"),
    (dict(device="mps"), "device"),
    (dict(kernels="mkl"), "kernels"),
    (dict(size=None, shape=(8, 8)), "shape"),
    (dict(size=None, shape=(8, 0, 8)), "shape"),
    (dict(shape=(8, 8, 8)), "size or shape"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(dtype=torch.float32, device="cpu", size=8, repeats=1) | kwargs
    with pytest.raises(ValueError, match=match):
        matmul_peak(**args)


@pytest.mark.gpu
def test_cuda_bf16_peak_is_positive():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    r = matmul_peak(torch.bfloat16, "cuda", size=2048, repeats=5)
    assert r["timer"] == "cuda events" and r["flop"] == 2 * 2048**3 and r["median_flops"] > 0
