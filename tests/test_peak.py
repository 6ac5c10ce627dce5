"""Measured matmul peak: a quick CPU measurement, the 2 n^3 FLOP convention, passes over several shapes, argument
checks."""

import math

import pytest
import torch

from igengine.bench.peak import MatmulPeaks, matmul_peak, square_size


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


def test_peak_passes_accumulate_and_the_peak_is_the_best_median_over_shapes_and_kernels():
    shapes = {"square 64": (64, 64, 64), "fc1 48x32x128": (48, 32, 128), "fc2 48x128x32": (48, 128, 32)}
    peaks = MatmulPeaks(torch.float32, "cpu", shapes, calls=2)
    kernels = _expected_kernels(torch.float32)
    assert [(label, mkn) for label, mkn, _ in peaks.products] == [(label, mkn) for label, mkn in shapes.items()
                                                                  for _ in kernels]
    with pytest.raises(RuntimeError, match="run_pass"):
        peaks.result()
    for _ in range(3):
        peaks.run_pass()
    r = peaks.result()
    assert r["passes"] == 3 and r["calls_per_pass"] == 2 and r["threads"] == torch.get_num_threads()
    assert {(p["shape"], p["kernel"]) for p in r["products"]} == {(label, k) for label in shapes for k in kernels}
    for p in r["products"]:
        m, k, n = shapes[p["shape"]]
        seconds = peaks.times[(p["shape"], p["kernel"])]
        assert p["calls"] == len(seconds) == 6 and p["mkn"] == [m, k, n]
        middle = sorted(seconds)[2:4]  # the median of 6 times: the mean of the middle two
        assert p["median_flops"] == pytest.approx(2 * m * k * n / (sum(middle) / 2))
        assert p["max_flops"] == pytest.approx(2 * m * k * n / min(seconds))
    best = max(r["products"], key=lambda p: p["median_flops"])
    assert r["flop_per_s"] == best["median_flops"] and (r["shape"], r["kernel"]) == (best["shape"], best["kernel"])
    assert all(r["flop_per_s"] >= p["median_flops"] for p in r["products"])


def test_cpu_operands_and_warm_up_are_made_in_the_first_pass_only(monkeypatch):
    calls = []
    real = MatmulPeaks._kernel

    def counting(name, a, b, c):
        fn = real(name, a, b, c)
        return lambda: (calls.append((name, a.data_ptr())), fn())[1]

    monkeypatch.setattr(MatmulPeaks, "_kernel", staticmethod(counting))
    peaks = MatmulPeaks(torch.float32, "cpu", {"s": (32, 16, 8)}, calls=1, warmup=2)
    n_kernels = len(peaks.products)
    peaks.run_pass()
    assert len(calls) == n_kernels * (2 + 1)  # warm-up 2 + 1 timed, each kernel
    peaks.run_pass()
    assert len(calls) == n_kernels * (2 + 1) + n_kernels  # no warm-up the second time
    assert len({ptr for _, ptr in calls}) == 1  # the same operands in both passes


def test_without_native_units_torch_mm_is_timed_on_the_small_square_only(monkeypatch):
    """bf16 on a CPU without bf16 units: torch.mm takes a generic loop (about 1 GFLOP/s) that the network never
    runs (its linears take the fp32 GEMM route), so a model's shapes are timed on the routed linear alone."""
    from igengine.backends import cpu_linear

    monkeypatch.setattr(cpu_linear, "cpu_native_low_precision", lambda dtype: False)
    assert square_size(torch.bfloat16, "cpu") == 256 and square_size(torch.float32, "cpu") == 1024
    routed = f"{cpu_linear.linear_route(torch.bfloat16)} linear"
    peaks = MatmulPeaks(torch.bfloat16, "cpu", {"square 256": (256, 256, 256), "fc1": (512, 256, 1024)})
    assert peaks.products == [("square 256", (256, 256, 256), "torch.mm"), ("square 256", (256, 256, 256), routed),
                              ("fc1", (512, 256, 1024), routed)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(shapes={}), "at least one shape"),
    (dict(shapes={"s": (8, 8)}), "shape"),
    (dict(calls=0), "calls"),
    (dict(warmup=-1), "warmup"),
    (dict(dtype=torch.int8), "dtype"),
])
def test_bad_matmul_peaks_arguments_name_the_argument(kwargs, match):
    args = dict(dtype=torch.float32, device="cpu", shapes={"s": (8, 8, 8)}) | kwargs
    with pytest.raises(ValueError, match=match):
        MatmulPeaks(**args)


@pytest.mark.gpu
def test_cuda_peaks_over_passes_use_cuda_events_and_restore_tf32():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    before = torch.backends.cuda.matmul.allow_tf32
    shapes = {"square 1024": (1024, 1024, 1024), "fc1 2048x768x3072": (2048, 768, 3072)}
    peaks = MatmulPeaks(torch.float32, "cuda", shapes, allow_tf32=True, calls=3)
    peaks.run_pass()
    peaks.run_pass()
    r = peaks.result()
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert r["timer"] == "cuda events" and r["tf32"] is True and r["passes"] == 2
    assert [(p["shape"], p["kernel"], p["calls"]) for p in r["products"]] == [(s, "torch.mm", 6) for s in shapes]
    assert all(p["median_flops"] > 0 for p in r["products"]) and r["flop_per_s"] == max(
        p["median_flops"] for p in r["products"])
