"""Where an eager CPU forward spends its time, and what routing the linears through oneDNN saves.

Not a test. For each model (random weights, every parameter random) and row count, on one thread:
  * the operator breakdown of one eager fp32 forward (torch.profiler, self CPU time), grouped into
    GEMMs (mm, addmm, oneDNN linear), attention (SDPA), and everything else (elementwise: modulate,
    gates, norms, RoPE, GELU/SiLU, copies);
  * the forward time of the ``reference`` network (nn.Linear: MKL) against the ``fp32`` one
    (``igengine.backends.cpu_linear``: oneDNN), interleaved (A B A B ...) over R repeats, as thread
    CPU time (``time.thread_time``: on one thread it counts this thread's work only, so other work on
    a shared machine disturbs it far less than wall time); ratio per repeat, median and min-max;
  * the largest difference between the two networks' outputs (same maths, other summation order).

    python benchmarks/eager_cpu_profile.py                       # SiT-B/2 and LightningDiT-B/1, rows 2 and 4
    python benchmarks/eager_cpu_profile.py --model SiT-B/2 --rows 2 --repeats 3

Writes benchmarks/results/eager_cpu_profile_<date>.json (``--json``) with provenance.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import provenance  # noqa: E402
from igengine.backends import TorchBackend  # noqa: E402
from igengine.config import Precision  # noqa: E402
from igengine.models import IGDiT  # noqa: E402
from igengine.models.registry import preset  # noqa: E402

GEMM = {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::bmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product"


def random_model(name: str, seed: int = 1) -> IGDiT:
    torch.manual_seed(seed)
    model = IGDiT(preset(name))
    for p in model.parameters():  # the official init zeroes adaLN and the heads: no path may be the identity
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def breakdown(backend: TorchBackend, x, t, y) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend(x, t, y)
    groups = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if e.key in GEMM:
            groups["gemm"] += e.self_cpu_time_total
        elif e.key.startswith(ATTENTION_PREFIX):
            groups["attention"] += e.self_cpu_time_total
        elif e.key.startswith(("aten::", "mkldnn::")):
            groups["other"] += e.self_cpu_time_total
    total = sum(groups.values())
    return {k: round(v / total, 4) for k, v in groups.items()} | {"profiled_self_ms": round(total / 1e3, 1)}  # shares are what count: the profiler adds overhead


def measure(name: str, rows: int, repeats: int) -> dict:
    model = random_model(name)
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *c.latent_shape, generator=g)
    t = torch.rand(rows, generator=g)
    y = torch.randint(0, c.num_classes, (rows,), generator=g)
    ref = TorchBackend(copy.deepcopy(model), precision=Precision.REFERENCE)
    fast = TorchBackend(copy.deepcopy(model), precision=Precision.FP32)
    out_ref, out_fast = ref(x, t, y), fast(x, t, y)  # warm-up, and the accuracy check
    diff = max(float((a - b).abs().max()) for a, b in zip(out_ref, out_fast))
    scale = max(float(a.abs().max()) for a in out_ref)
    times = {"reference": [], "fp32": []}
    for _ in range(repeats):
        for label, backend in (("reference", ref), ("fp32", fast)):
            t0 = time.thread_time()
            backend(x, t, y)
            times[label].append(time.thread_time() - t0)
    ratios = [a / b for a, b in zip(times["reference"], times["fp32"])]
    return {
        "model": name, "rows": rows, "repeats": repeats,
        "ms_per_forward": {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()},
        "speedup_fp32_over_reference": {"median": round(statistics.median(ratios), 3),
                                        "min": round(min(ratios), 3), "max": round(max(ratios), 3)},
        "max_abs_fp32_vs_reference": diff, "max_abs_reference_output": scale,
        "cpu_linear": {"reference": ref.describe()["cpu_linear"], "fp32": fast.describe()["cpu_linear"]},
        "breakdown_reference": breakdown(ref, x, t, y),
        "breakdown_fp32": breakdown(fast, x, t, y),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="default: SiT-B/2 and LightningDiT-B/1")
    ap.add_argument("--rows", default="2,4", help="comma list of network rows (N, and 2N with CFG)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path,
                    default=Path(__file__).parent / "results" / f"eager_cpu_profile_{time.strftime('%Y%m%d')}.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in args.model or ["SiT-B/2", "LightningDiT-B/1"]:
        for rows in (int(r) for r in args.rows.split(",")):
            r = measure(name, rows, args.repeats)
            print(json.dumps(r), flush=True)
            results.append(r)
    record = {"provenance": provenance(), "threads": 1, "timer": "time.thread_time (one thread)",
              "method": "reference (nn.Linear, MKL) vs fp32 (oneDNN linears) eager forwards, interleaved",
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
