"""Which GEMM each precision's linears should take on this CPU: the network forward on every route that runs here.

Not a test. ``igengine.backends.cpu_linear`` decides each linear dtype's route from the CPU's features (oneDNN
for fp32 on AVX-512 CPUs, MKL elsewhere; oneDNN for bf16 where oneDNN has bf16, else the bf16 values through
MKL's fp32 GEMM). This measures the choice: an eager forward of a B-size model (every parameter random, so no
path is the identity) at ``--rows`` rows, for each precision on each route that can run on this CPU, with the
routes forced by replacing the CPU features they are decided from:

  fp32: ``onednn`` | ``aten`` (nn.Linear, MKL; also what ``reference`` runs)
  bf16: ``onednn`` (only where oneDNN has bf16) | ``fp32-gemm`` | ``aten`` (torch's own bf16 addmm)

interleaved (A B C A B C ...) over ``--repeats``, as wall time on the run's threads. The median per route and
each route's ratio to the chosen one, paired per repeat, and which route the CPU's own features choose.

    python benchmarks/cpu_linear_routes.py --json benchmarks/results/cpu_linear_routes_<cpu>.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/cpu_linear_routes.py ...   # what an AVX2-only CPU gives (provenance records the limits)
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
from igengine.backends import cpu_linear as cl  # noqa: E402
from igengine.config import Precision  # noqa: E402
from igengine.models import IGDiT  # noqa: E402
from igengine.models.registry import preset  # noqa: E402


def features_for(dtype: torch.dtype, route: str, real: cl.CpuFeatures) -> cl.CpuFeatures | None:
    """CpuFeatures under which ``linear_route(dtype) == route`` on this machine, or None where it cannot run."""
    if route == "onednn" and (not real.onednn or (dtype == torch.bfloat16 and not real.onednn_bf16)):
        return None
    if dtype == torch.float32:
        return cl.CpuFeatures("AVX512" if route == "onednn" else "AVX2", real.onednn, real.onednn_bf16)
    if route == "fp32-gemm":
        return cl.CpuFeatures(real.capability, real.onednn, False)
    return real if route == "onednn" else None  # bf16 "aten" is timed as plain nn.Linear (routing off)


def build(model: IGDiT, precision: Precision, route: str, real: cl.CpuFeatures):
    """A TorchBackend whose linears take ``route`` (bf16 ``aten``: the routing undone, plain nn.Linear)."""
    dtype = torch.float32 if precision == Precision.FP32 else torch.bfloat16
    if route == "aten" and dtype == torch.bfloat16:
        backend = TorchBackend(model, precision=precision)
        cl.route_linears(backend.model, fast=False)
        return backend
    features = features_for(dtype, route, real)
    if features is None:
        return None
    cl.cpu_features = lambda: features  # read by linear_route at construction and at every call
    return TorchBackend(model, precision=precision)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SiT-B/2")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    real = cl.cpu_features()
    chooser = cl.cpu_features
    cfg = preset(args.model)
    torch.manual_seed(0)
    base = IGDiT(cfg)
    for p in base.parameters():  # every parameter random: the official init zeroes the heads
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.rows, *cfg.latent_shape, generator=g)
    t = torch.rand(args.rows, generator=g)
    y = torch.randint(0, cfg.num_classes, (args.rows,), generator=g)

    rows = {}
    for precision, routes in ((Precision.FP32, ("onednn", "aten")), (Precision.BF16, ("onednn", "fp32-gemm", "aten"))):
        for route in routes:
            backend = build(copy.deepcopy(base), precision, route, real)
            if backend is not None:
                rows[f"{precision.value} {route}"] = (backend, cl.cpu_features)
    cl.cpu_features = chooser
    chosen = {"fp32": cl.linear_route(torch.float32), "bf16": cl.linear_route(torch.bfloat16)}

    times = {name: [] for name in rows}
    for name, (backend, features) in rows.items():  # warm-up: packs, fp32 copies, allocator
        cl.cpu_features = features
        backend(x, t, y)
    for r in range(args.repeats):
        for name, (backend, features) in rows.items():
            cl.cpu_features = features
            t0 = time.perf_counter()
            backend(x, t, y)
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
    cl.cpu_features = chooser

    result = {"model": args.model, "rows": args.rows, "repeats": args.repeats, "chosen": chosen,
              "this_cpu": {"capability": real.capability, "onednn": real.onednn, "onednn_bf16": real.onednn_bf16},
              "forward_s": {}, "provenance": provenance()}
    for name, ts in times.items():
        p = name.split()[0]
        ref = f"{p} {chosen[p]}"
        ratio = [a / b for a, b in zip(ts, times[ref])] if ref in times else None
        result["forward_s"][name] = {"median": statistics.median(ts), "min": min(ts), "max": max(ts),
                                     "vs_chosen_median": statistics.median(ratio) if ratio else None}
        vs = f"{statistics.median(ratio):.2f}x the chosen route's time" if ratio else ""
        print(f"{name:>16}: {statistics.median(ts) * 1e3:8.1f} ms  {vs}")
    print(json.dumps({"chosen": chosen}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
