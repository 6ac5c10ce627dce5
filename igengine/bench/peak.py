"""Measured matmul peak: the achieved FLOP/s of matmuls of given shapes, the denominator of an MFU figure.

Products are ``C = A @ B^T`` with A (m, k) and B (n, k), 2 m k n FLOPs each (the same 2 x multiply-add
convention as ``igengine.bench.flops``). ``B^T`` is the layout of ``nn.Linear`` (its weight is stored
out x in), so the peak is measured on the path the network's matmuls take: on a CPU without bf16 matmul
units, torch's bf16 ``A @ B`` takes a slow generic path (about 1 GFLOP/s there) while igengine's bf16 linears
take the fp32 GEMM, and a peak below what the network achieves would give an MFU above 1.

``MatmulPeaks`` times several products of one dtype (shapes x kernels) in passes: each ``run_pass`` times
every product ``calls`` times, the kernels of a shape interleaved, and the passes can be spread over a
run (``igengine bench`` runs one after the rows of every repeat, so the peak is timed under the same load
as the rows). ``result`` gives every product's median and best FLOP/s over all passes and the peak: the
highest median over the products, with the shape and kernel that gave it. ``matmul_peak`` is one pass of
one shape (a square n x n by default), timed at once.
Operands: A and C are views into one buffer each, sized for the largest shape, and shapes with the same
(k, n) share B, so the memory is about that of the largest product.
  CUDA: ``torch.mm`` into a preallocated output; per pass and shape, ``warmup`` untimed products (clocks
        ramp up, cuBLAS picks its kernel), then ``calls`` products each between two CUDA events, one
        synchronisation per shape. Operands are made for the pass and dropped after it (a model's GEMMs
        at a large batch take GBs). Default square n = 8192 (large enough to saturate an H100/H200's
        tensor cores).
  CPU:  the same with ``time.perf_counter`` around each product; operands are kept between passes, the
        warm-up runs in the first pass only. Default square n = 1024 for fp32 (tens of ms per product on
        2 cores) and for bf16/fp16 where the CPU has native units for them
        (``igengine.backends.cpu_linear.cpu_native_low_precision``: oneDNN's check for AVX512-BF16 /
        AMX / AVX512-FP16; on the AMD EPYC (Zen, AVX512-BF16) of 2026-12-02 bf16 ran 4x MKL's fp32 and
        1.9x oneDNN's fp32), else 256 (without such units they run about an order of magnitude slower
        than fp32). For fp32 and bf16, where igengine routes that dtype's linears on this CPU
        (``igengine.backends.cpu_linear.linear_route``: oneDNN, or the fp32 GEMM for bf16 without oneDNN
        bf16), the same product is also timed on that route (``kernels="fastest"``, the default; on a
        packed weight, as the network's linears run), named "<route> linear", beside ``torch.mm``: an
        MKL-only peak would let an MFU exceed what the machine's fastest GEMM allows (oneDNN's fp32 GEMM
        ran 2.3x MKL's on an AVX-512 EPYC). Where ``torch.mm`` of a low-precision dtype takes the generic
        loop (no native units) and a routed kernel exists, ``torch.mm`` is timed only on products no
        larger than the small square: the network never runs it, and on a model's shapes it would take
        seconds. ``kernels="mm"`` times ``torch.mm`` alone.
The thread count is torch's at the time (``threads`` in the result): the run's own.

Numerics flags: fp32 is measured without TF32 unless ``allow_tf32=True``. The TF32 flags
(``torch.backends.cuda.matmul.allow_tf32``) are set for the measurement only and restored after it;
nothing else global is changed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_SIZE = {"cuda": 8192, "cpu": 1024}
DEFAULT_SIZE_CPU_LOW_PRECISION = 256
DEFAULT_REPEATS = {"cuda": 50, "cpu": 5}  # matmul_peak's timed products
DEFAULT_CALLS = {"cuda": 5, "cpu": 1}  # MatmulPeaks: timed products per shape and kernel in each pass
DEFAULT_WARMUP = {"cuda": 10, "cpu": 1}  # matmul_peak's untimed products
DEFAULT_PASS_WARMUP = {"cuda": 2, "cpu": 1}  # MatmulPeaks: per shape and kernel (CUDA: every pass; CPU: the first)
MM = "torch.mm"


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """Set cuBLAS's TF32 permission for fp32 matmuls inside the block; restore the caller's value after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _slow_mm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch.mm of ``dtype`` takes a generic loop here: a CPU low-precision dtype without native units."""
    if device.type != "cpu" or dtype == torch.float32:
        return False
    from igengine.backends.cpu_linear import cpu_native_low_precision

    return not cpu_native_low_precision(dtype)


def square_size(dtype: torch.dtype, device: torch.device | str) -> int:
    """The default square n for ``dtype`` on ``device`` (see the module docstring)."""
    device = torch.device(device)
    return DEFAULT_SIZE_CPU_LOW_PRECISION if _slow_mm(dtype, device) else DEFAULT_SIZE[device.type]


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_shape(shape) -> None:
    if (not isinstance(shape, tuple | list) or len(shape) != 3
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape)):
        raise ValueError(f"shape must be three ints >= 1 (m, k, n), got {shape!r}")


class MatmulPeaks:
    """The matmul peak of one dtype on ``device``, over several shapes and kernels, timed in passes.

    shapes: {label: (m, k, n)}, timed in this order (e.g. {"square 1024": (1024, 1024, 1024), "fc1 2048x768x3072":
    (2048, 768, 3072)}). allow_tf32: fp32 only, let cuBLAS use TF32 tensor cores. kernels: "fastest" (CPU
    fp32/bf16: ``torch.mm`` and igengine's routed linear) or "mm" (``torch.mm`` only). calls: timed products
    per shape and kernel in each pass (default 5 CUDA, 1 CPU). warmup: untimed products per shape and kernel
    (every pass on CUDA, the first pass on the CPU; default 2 CUDA, where passes follow the rows on a warm GPU,
    and 1 CPU).

    ``products`` lists what each pass times: (label, (m, k, n), kernel) in order. See the module docstring.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str, shapes: dict[str, tuple[int, int, int]],
                 allow_tf32: bool = False, kernels: str = "fastest", calls: int | None = None,
                 warmup: int | None = None):
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
        if not shapes:
            raise ValueError("give at least one shape")
        for shape in shapes.values():
            _check_shape(shape)
        self.calls = DEFAULT_CALLS[device.type] if calls is None else calls
        self.warmup = DEFAULT_PASS_WARMUP[device.type] if warmup is None else warmup
        _check_int("calls", self.calls, 1)
        _check_int("warmup", self.warmup, 0)
        self.dtype, self.device, self.tf32 = dtype, device, bool(allow_tf32 and device.type == "cuda")
        self.shapes = {label: tuple(shape) for label, shape in shapes.items()}

        routed_kernel = None
        if device.type == "cpu" and kernels == "fastest":
            from igengine.backends.cpu_linear import linear_route, routed

            if routed(dtype):  # the route igengine's linears of this dtype take on this CPU
                routed_kernel = f"{linear_route(dtype)} linear"
        small = 2 * DEFAULT_SIZE_CPU_LOW_PRECISION**3
        self.products: list[tuple[str, tuple[int, int, int], str]] = []
        for label, (m, k, n) in self.shapes.items():
            mm_here = not (routed_kernel and _slow_mm(dtype, device) and 2 * m * k * n > small)
            for kernel in ([MM] if mm_here else []) + ([routed_kernel] if routed_kernel else []):
                self.products.append((label, (m, k, n), kernel))
        self.times: dict[tuple[str, str], list[float]] = {(label, kernel): [] for label, _, kernel in self.products}
        self.passes = 0
        self.seconds = 0.0  # wall time spent in the passes (warm-up and operands included): the measurement's cost
        self.threads = torch.get_num_threads() if device.type == "cpu" else None
        self._operands: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # CPU: kept between passes

    def _make_operands(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(A, B, C) of every shape: A and C are views into one buffer each, as large as the largest shape needs,
        and shapes with the same (k, n) share B (a model's GEMMs at several row counts differ in m only), so the
        memory is about that of the largest shape, not of all of them together."""
        dev, dt = self.device, self.dtype
        # Drawn where they are used (a model's GEMMs at a large batch: 1e8-1e9 entries, made in every CUDA pass).
        g = torch.Generator(device=dev).manual_seed(0)
        # Unit-variance entries: sums of k products stay ~sqrt(k), far from fp16's range limit.
        a = torch.randn(max(m * k for m, k, _ in self.shapes.values()), generator=g, device=dev).to(dt)
        c = torch.empty(max(m * n for m, _, n in self.shapes.values()), device=dev, dtype=dt)
        weights: dict[tuple[int, int], torch.Tensor] = {}
        out = {}
        for label, (m, k, n) in self.shapes.items():
            if (k, n) not in weights:
                weights[(k, n)] = torch.randn(n, k, generator=g, device=dev).to(dt)
            out[label] = (a[:m * k].view(m, k), weights[(k, n)], c[:m * n].view(m, n))
        return out

    @staticmethod
    def _kernel(name: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> Callable[[], object]:
        if name == MM:
            return lambda: torch.mm(a, b.t(), out=c)
        from igengine.backends.cpu_linear import cpu_linear

        return lambda: cpu_linear(a, b, None)

    def run_pass(self) -> None:
        """Time every product ``calls`` times (the kernels of a shape interleaved); the times accumulate."""
        t0 = time.perf_counter()
        by_shape: dict[str, list[str]] = {}
        for label, _, kernel in self.products:
            by_shape.setdefault(label, []).append(kernel)
        operands = self._operands or self._make_operands()  # CUDA: made for this pass, dropped at its end
        if self.device.type == "cpu":
            self._operands = operands
        with matmul_tf32(self.tf32):
            for label, kernels in by_shape.items():
                fns = {k: self._kernel(k, *operands[label]) for k in kernels}
                if self.device.type == "cuda":
                    got = _time_cuda(fns, self.calls, self.warmup, self.device)
                else:
                    got = _time_cpu(fns, self.calls, self.warmup if self.passes == 0 else 0)
                for kernel, seconds in got.items():
                    if not all(s > 0 and math.isfinite(s) for s in seconds):
                        raise RuntimeError(f"matmul timing of {label} {kernel} gave non-positive or non-finite times "
                                           f"{seconds}")
                    self.times[(label, kernel)].extend(seconds)
        self.passes += 1
        self.seconds += time.perf_counter() - t0

    def release(self) -> None:
        """Drop the operands kept between passes (the timings stay)."""
        self._operands.clear()

    def result(self) -> dict:
        """JSON-able: the peak (``flop_per_s``: the highest median FLOP/s over the products), the ``shape`` and
        ``kernel`` that gave it (its ``mkn``, ``median_flops`` = flop_per_s, and ``max_flops``: its fastest
        call), and every product's figures (``products``: shape, mkn, kernel, calls, median_flops, max_flops),
        with dtype, device, device_name, tf32, timer, threads (CPU), passes, calls_per_pass, warmup,
        seconds (the passes' wall time), torch."""
        if self.passes == 0:
            raise RuntimeError("no pass was timed yet: call run_pass() first")
        products = []
        for label, (m, k, n), kernel in self.products:
            seconds = self.times[(label, kernel)]
            flop = 2 * m * k * n
            products.append({"shape": label, "mkn": [m, k, n], "kernel": kernel, "calls": len(seconds),
                             "median_flops": flop / statistics.median(seconds), "max_flops": flop / min(seconds)})
        best = max(products, key=lambda p: p["median_flops"])
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "tf32": self.tf32,
            "flop_per_s": best["median_flops"],
            "peak": "the highest median FLOP/s over the products (shape x kernel)",
            "shape": best["shape"],
            "mkn": best["mkn"],
            "kernel": best["kernel"],
            "median_flops": best["median_flops"],
            "max_flops": best["max_flops"],
            "products": products,
            "timer": "cuda events" if self.device.type == "cuda" else "time.perf_counter",
            "threads": self.threads,
            "passes": self.passes,
            "calls_per_pass": self.calls,
            "warmup": self.warmup,
            "seconds": self.seconds,
            "torch": torch.__version__,
        }


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
    """Achieved FLOP/s of an n x n @ n x n (or ``shape``) matmul in ``dtype`` on ``device``, timed now (see the
    module docstring).

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
    if shape is not None:
        if size is not None:
            raise ValueError("give size or shape, not both")
        _check_shape(shape)
    if size is not None:
        _check_int("size", size, 1)
    repeats = DEFAULT_REPEATS.get(device.type, 1) if repeats is None else repeats
    _check_int("repeats", repeats, 1)
    warmup = DEFAULT_WARMUP.get(device.type, 0) if warmup is None else warmup
    if shape is None and size is None and dtype in DTYPES and device.type in DEFAULT_SIZE:
        size = square_size(dtype, device)
    m, k, n = shape if shape is not None else (size, size, size)
    peaks = MatmulPeaks(dtype, device, {"product": (m, k, n)}, allow_tf32, kernels, calls=repeats, warmup=warmup)
    peaks.run_pass()
    timed = {kernel: peaks.times[(label, kernel)] for label, _, kernel in peaks.products}
    kernel = min(timed, key=lambda name: statistics.median(timed[name]))
    times = timed[kernel]
    flop = 2 * m * k * n
    median_s, min_s = statistics.median(times), min(times)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": size if shape is None else None,
        "shape": [m, k, n],
        "flop": flop,
        "repeats": repeats,
        "warmup": peaks.warmup,
        "tf32": peaks.tf32,
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "kernel": kernel,
        "kernels_timed": {name: flop / statistics.median(v) for name, v in timed.items()},
        "median_s": median_s,
        "min_s": min_s,
        "median_flops": flop / median_s,
        "max_flops": flop / min_s,
        "threads": peaks.threads,
        "torch": torch.__version__,
    }


def _time_cuda(products: dict[str, Callable[[], object]], calls: int, warmup: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each product (CUDA events), the products interleaved within each call round."""
    with torch.cuda.device(device):
        for product in products.values():
            for _ in range(warmup):
                product()
        events = {name: [] for name in products}
        for _ in range(calls):
            for name, product in products.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                product()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(device)
        # elapsed_time is in ms
        return {name: [start.elapsed_time(end) / 1e3 for start, end in pairs] for name, pairs in events.items()}


def _time_cpu(products: dict[str, Callable[[], object]], calls: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each product, the products interleaved within each call round."""
    for product in products.values():
        for _ in range(warmup):
            product()
    times: dict[str, list[float]] = {name: [] for name in products}
    for _ in range(calls):
        for name, product in products.items():
            t0 = time.perf_counter()
            product()
            times[name].append(time.perf_counter() - t0)
    return times
