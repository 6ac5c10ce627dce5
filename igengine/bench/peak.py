"""Measured matmul peak: the achieved FLOP/s of one matmul (square, or of a given shape), the denominator of an MFU figure.

``matmul_peak`` times ``C = A @ B^T`` for square n x n operands (2 n^3 FLOPs per product, the same
2 x multiply-add convention as ``igengine.bench.flops``), or for A (m, k) and B (n, k) with ``shape``
(2 m k n FLOPs): e.g. a network's own largest linear layer. ``B^T`` is the layout of ``nn.Linear`` (its
weight is stored out x in), so the peak is measured on the path the network's matmuls take: on a CPU
without bf16 matmul units, torch's bf16 ``A @ B`` takes a slow generic path (about 1 GFLOP/s here)
while igengine's bf16 linears take the fp32 GEMM there, and a peak below what the network achieves would
give an MFU above 1.
  CUDA: operands and output preallocated, ``warmup`` untimed products (clocks ramp up, cuBLAS picks
        its kernel), then ``repeats`` products each between two CUDA events, one synchronisation at
        the end. Default n = 8192 (large enough to saturate an H100/H200's tensor cores).
  CPU:  the same with ``time.perf_counter`` around each product. Default n = 1024 for fp32 (tens of
        ms per product on 2 cores) and for bf16/fp16 where the CPU has native units for them
        (``igengine.backends.cpu_linear.cpu_native_low_precision``: oneDNN's check for AVX512-BF16 /
        AMX / AVX512-FP16; on the AMD EPYC (Zen, AVX512-BF16) of 2026-12-02 bf16 ran 4x MKL's fp32 and
        1.9x oneDNN's fp32), else 256 (without such units they run about an order of magnitude slower
        than fp32), so a default call stays under 2 s. For fp32 and bf16, where igengine routes that
        dtype's linears on this CPU (``igengine.backends.cpu_linear.linear_route``: oneDNN, or the fp32
        GEMM for bf16 without oneDNN bf16), the same product is also timed on that route
        (``kernels="fastest"``, the default; on a packed weight, as the network's linears run), named
        "<route> linear", interleaved with ``torch.mm``, and the faster kernel's times are the peak: an
        MKL-only peak would let an MFU exceed what the machine's fastest GEMM allows (oneDNN's fp32
        GEMM ran 2.3x MKL's on an AVX-512 EPYC).
        ``kernels="mm"`` times ``torch.mm`` alone.
The result reports the median and the best (max) FLOP/s over the repeats, and which kernel (``kernel``)
they come from; ``kernels_timed`` gives each timed kernel's median FLOP/s.

Numerics flags: fp32 is measured without TF32 unless ``allow_tf32=True``. The TF32 flags
(``torch.backends.cuda.matmul.allow_tf32``) are set for the measurement only and restored after it;
nothing else global is changed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_SIZE = {"cuda": 8192, "cpu": 1024}
DEFAULT_SIZE_CPU_LOW_PRECISION = 256
DEFAULT_REPEATS = {"cuda": 50, "cpu": 5}
DEFAULT_WARMUP = {"cuda": 10, "cpu": 1}


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """Set cuBLAS's TF32 permission for fp32 matmuls inside the block; restore the caller's value after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_peak(
    dtype: torch.dtype,
    device: torch.device | str,
    size: int | None = None,
    repeats: int | None = None,
    allow_tf32: bool = False,
    warmup: int | None = None,
    kernels: str = "fastest",
    shape: tuple[int, int, int] | None = None,
) -> dict:
    """Achieved FLOP/s of an n x n @ n x n (or ``shape``) matmul in ``dtype`` on ``device`` (see the module docstring).

    dtype: torch.bfloat16, torch.float16 or torch.float32. device: "cpu", "cuda", "cuda:1", ...
    size: n (default 8192 on CUDA; on CPU 1024, or 256 for bf16/fp16 without native units). repeats: timed products (default 50 CUDA, 5 CPU).
    allow_tf32: fp32 only, let cuBLAS use TF32 tensor cores. kernels: "fastest" (CPU fp32/bf16: the faster
    of torch.mm and igengine's routed linear) or "mm" (torch.mm only). shape: (m, k, n) instead of the
    square ``size`` (not both).
    Returns a JSON-able dict: dtype, device, device_name, size (None with ``shape``), shape [m, k, n],
    flop (= 2 m k n per product), repeats, warmup, tf32, timer, kernel, kernels_timed, median_s, min_s,
    median_flops, max_flops (FLOP/s), threads (CPU), torch.
    """
    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
    if device.type not in DEFAULT_SIZE:
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but no CUDA GPU is available")
    if kernels not in ("fastest", "mm"):
        raise ValueError(f"kernels must be 'fastest' or 'mm', got {kernels!r}")
    if allow_tf32 and dtype != torch.float32:
        raise ValueError(f"allow_tf32 only applies to dtype torch.float32, got {dtype}")
    if shape is not None:
        if size is not None:
            raise ValueError("give size or shape, not both")
        if len(shape) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape):
            raise ValueError(f"shape must be three ints >= 1 (m, k, n), got {shape!r}")
    n = size if shape is None else shape[0]
    if n is None:
        from igengine.backends.cpu_linear import cpu_native_low_precision
        slow = device.type == "cpu" and dtype != torch.float32 and not cpu_native_low_precision(dtype)
        n = DEFAULT_SIZE_CPU_LOW_PRECISION if slow else DEFAULT_SIZE[device.type]
    repeats = DEFAULT_REPEATS[device.type] if repeats is None else repeats
    warmup = DEFAULT_WARMUP[device.type] if warmup is None else warmup
    for name, value, low in (("size", n, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    g = torch.Generator(device="cpu").manual_seed(0)
    # Unit-variance entries: sums of n products stay ~sqrt(n), far from fp16's range limit.
    m, k, n_out = shape if shape is not None else (n, n, n)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n_out, k, generator=g).to(device, dtype)
    c = torch.empty(m, n_out, device=device, dtype=dtype)
    flop = 2 * m * k * n_out

    with matmul_tf32(allow_tf32 and device.type == "cuda"):
        if device.type == "cuda":
            timed = {"torch.mm": _time_cuda(a, b, c, repeats, warmup)}
            timer = "cuda events"
        else:
            products = {"torch.mm": lambda: torch.mm(a, b.t(), out=c)}
            if kernels == "fastest":
                from igengine.backends.cpu_linear import cpu_linear, linear_route, routed

                if routed(dtype):  # the route igengine's linears of this dtype take on this CPU
                    products[f"{linear_route(dtype)} linear"] = lambda: cpu_linear(a, b, None)
            timed = _time_cpu(products, repeats, warmup)
            timer = "time.perf_counter"
    kernel = min(timed, key=lambda k: statistics.median(timed[k]))
    times = timed[kernel]
    median_s = statistics.median(times)
    min_s = min(times)
    if not (min_s > 0 and math.isfinite(median_s)):
        raise RuntimeError(f"matmul timing gave non-positive or non-finite times {times}")
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": n if shape is None else None,
        "shape": [m, k, n_out],
        "flop": flop,
        "repeats": repeats,
        "warmup": warmup,
        "tf32": bool(allow_tf32 and device.type == "cuda"),
        "timer": timer,
        "kernel": kernel,
        "kernels_timed": {k: flop / statistics.median(v) for k, v in timed.items()},
        "median_s": median_s,
        "min_s": min_s,
        "median_flops": flop / median_s,
        "max_flops": flop / min_s,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
    }


def _time_cuda(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    with torch.cuda.device(a.device):
        for _ in range(warmup):
            torch.mm(a, b.t(), out=c)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            torch.mm(a, b.t(), out=c)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]  # elapsed_time is in ms


def _time_cpu(products: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each product, the products interleaved within each repeat."""
    for product in products.values():
        for _ in range(warmup):
            product()
    times: dict[str, list[float]] = {name: [] for name in products}
    for _ in range(repeats):
        for name, product in products.items():
            t0 = time.perf_counter()
            product()
            times[name].append(time.perf_counter() - t0)
    return times
