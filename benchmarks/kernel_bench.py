"""Time the glue between two network calls: the fused step against the reference's unfused ops.

    PYTHONPATH=. python benchmarks/kernel_bench.py --device cpu     # CPU twin (writes kernels_cpu_<date>.json)
    PYTHONPATH=. python benchmarks/kernel_bench.py --device cuda    # CUDA kernels (kernels_cuda_<date>.json)

Configurations (the paper's samplers, a step inside both guidance intervals, so IG + CFG with 2N
network rows and the next input duplicated):
  * SiT-XL/2 latents 4x32x32, SDE Euler-Maruyama step (noise drawn per step);
  * LightningDiT-XL/1 latents 32x16x16, heun2 step (predictor + corrector: both glue phases);
  for batch N in 1, 8, 32, 64, 256 (network rows 2N). The network itself is not run: a constant
  backend hands out precomputed outputs, so only the glue is timed.
Variants:
  reference   sampling.loop.reference_step with NumPy noise (torch ops, noise drawn on the host and
              copied to the device, torch.cat for the CFG rows);
  torch_ops   the same maths as torch ops with the noise already on the device (the best an
              unfused implementation can do; capturable in a CUDA graph);
  fused       igengine.kernels.fused_step on fixed buffers (noise drawn in the kernel).
CUDA: medians of per-call CUDA-event times after warm-up, eager and (torch_ops, fused) replayed
from CUDA graphs holding 10 steps (reported per step). CPU: medians of perf_counter times, one
thread for both torch and the twin unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from igengine.config import Family, Precision  # noqa: E402
from igengine.sampling.guidance import cfg_combine, ig_combine  # noqa: E402
from igengine.kernels import library  # noqa: E402
from igengine.kernels.binding import fused_step  # noqa: E402
from igengine.sampling.launches import plan_launches  # noqa: E402
from igengine.models.registry import preset  # noqa: E402
from igengine.noise import gaussian  # noqa: E402
from igengine.sampling import ModelFacts, build_plan, paper_sampler  # noqa: E402
from igengine.sampling.loop import reference_step  # noqa: E402
from igengine.sampling.plan import StepKind  # noqa: E402
from igengine.sampling.randomness import NUMPY  # noqa: E402
from igengine.sampling.updates import heun_correct, heun_predict, sde_update, sit_drift  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCHES = (1, 8, 32, 64, 256)
GRAPH_STEPS = 10
SEED = 0


class ConstBackend:
    """Returns precomputed (v_final, v_inter) for 2N (CFG) or N rows: the glue is all that is timed."""

    name = "const"
    max_batch = None

    def __init__(self, config, outputs: dict[int, tuple[torch.Tensor, torch.Tensor]], device):
        self.config, self.outputs, self.device = config, outputs, torch.device(device)

    def __call__(self, x, t, y):
        return self.outputs[x.shape[0]]

    def describe(self):
        return {"backend": self.name}


def _setup(family: Family, n: int, device: torch.device):
    name = "SiT-XL/2" if family == Family.SIT else "LightningDiT-XL/1"
    cfg = preset(name)
    sampler = paper_sampler(family)
    sampler = dataclasses.replace(sampler, precision=Precision.FP32)
    plan = build_plan(family, sampler)
    # A step inside both intervals whose next step is too (SiT: t ~ 0.6; LightningDiT: t ~ 0.5).
    k = next(i for i, s in enumerate(plan.steps[:-1])
             if all(ev.cfg and ev.ig for ev in s.evals) and plan.steps[i + 1].evals[0].cfg and
             (s.t_cur < 0.65 if family == Family.SIT else s.t_cur > 0.4))
    step = plan.steps[k]
    gen = torch.Generator().manual_seed(n)
    shape = cfg.latent_shape
    e = shape[0] * shape[1] * shape[2]
    vf = torch.randn((2 * n, *shape), generator=gen).to(device)
    vi = (vf.cpu() + 0.3 * torch.randn((2 * n, *shape), generator=gen)).to(device)
    x = torch.randn((n, *shape), generator=gen).to(device)
    backend = ConstBackend(cfg, {2 * n: (vf, vi)}, device)
    return dict(name=name, cfg=cfg, sampler=sampler, plan=plan, step=step, k=k, x=x, vf=vf, vi=vi, e=e,
                backend=backend, labels=torch.arange(n, device=device) % 1000, indices=torch.arange(n))


def reference_fn(s) -> Callable[[], object]:
    step, x, y, idx = s["step"], s["x"], s["labels"], s["indices"]
    facts = ModelFacts.of(s["cfg"])

    def call():
        x_next = reference_step(s["backend"], s["plan"], facts, step, x, y, SEED, idx, NUMPY)
        return torch.cat([x_next, x_next])  # the next network input, as guided_field builds it
    return call


def torch_ops_fn(s, device) -> Callable[[], object]:
    """The reference maths as torch ops on fixed inputs, noise pre-drawn on the device."""
    family = s["plan"].family
    g = s["sampler"].guidance
    step, x, vf, vi = s["step"], s["x"], s["vf"], s["vi"]
    n = x.shape[0]
    rows = torch.cat([x, x])
    if step.kind == StepKind.SDE:
        noise = gaussian(SEED, s["indices"], step.noise_stream, x.shape[1:]).to(device)

        def call():
            v = ig_combine(vf, vi, g.ig_scale, family)
            d = sit_drift(v, rows, step.evals[0].t)
            d = cfg_combine(d[:n], d[n:], g.cfg_scale)
            x_next = sde_update(x, d, step, noise)
            return torch.cat([x_next, x_next])
        return call

    def call():
        f = ig_combine(vf, vi, g.ig_scale, family)
        k1 = cfg_combine(f[:n], f[n:], g.cfg_scale)
        x_pred = heun_predict(x, k1, step.dt)
        mid = torch.cat([x_pred, x_pred])  # the corrector's network input
        f2 = ig_combine(vf, vi, g.ig_scale, family)
        k2 = cfg_combine(f2[:n], f2[n:], g.cfg_scale)
        x_next = heun_correct(x, k1, k2, step.dt)
        return mid, torch.cat([x_next, x_next])
    return call


def fused_fn(s, lib) -> Callable[[], object]:
    sl = plan_launches(s["plan"], SEED)[s["k"]]
    x0, vf, vi = s["x"], s["vf"], s["vi"]
    n, e = x0.shape[0], s["e"]
    x = x0.reshape(n, e).clone()
    net = torch.empty((2 * n, e), dtype=torch.float32, device=x.device)
    k1 = torch.empty_like(x)
    idx = s["indices"].to(x.device)
    if s["step"].kind == StepKind.HEUN:
        pred, corr = sl.launches

        def call():
            fused_step(pred, x, vf, vi, k1_out=k1, net_out=net, library=lib)
            fused_step(corr, x, vf, vi, k1=k1, x_out=x, net_out=net, library=lib)
        return call
    (p,) = sl.launches

    def call():
        fused_step(p, x, vf, vi, indices=idx, x_out=x, net_out=net, library=lib)
    return call


def bytes_moved(s) -> int:
    """Minimum DRAM traffic of the fused step (fp32): reads x, 2N rows of v_final and v_inter (and k1),
    writes x and 2N rows of the next input (and k1, 2N x_pred rows) per element of the state."""
    n, e = s["x"].shape[0], s["e"]
    per = (4 + 16) + (4 + 8)  # read x, vf/vi (2 rows each); write x, 2 net rows
    if s["step"].kind == StepKind.HEUN:
        per += (4 + 16 + 4 + 8)  # predictor: read x, vf/vi; write k1, 2 net rows
        per += 4  # corrector reads k1
    return per * n * e


def time_cpu(fn, min_reps: int, budget_s: float) -> list[float]:
    for _ in range(2):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_cuda(fn, min_reps: int, budget_s: float) -> list[float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + budget_s
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 500):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_cuda_graph(fn, min_reps: int, budget_s: float) -> list[float] | str:
    """Per-step times of a CUDA graph holding GRAPH_STEPS copies of fn, or the reason capture failed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_STEPS):
                fn()
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        return f"capture failed: {type(exc).__name__}: {exc}"
    times = time_cuda(graph.replay, min_reps, budget_s)
    return [t / GRAPH_STEPS for t in times]


def _stats(times) -> dict:
    if isinstance(times, str):
        return {"error": times}
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def bench(device: str, batches, budget_s: float) -> dict:
    dev = torch.device(device)
    lib = library.library_for(dev)
    out = {"provenance": provenance(), "device_type": dev.type, "kernel_library": None, "rows": []}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    if lib is None:
        out["error"] = f"no kernel library for {dev}: {library.describe()}"
        return out
    out["kernel_library"] = {"path": str(lib.path), "build": lib.build_info}
    if dev.type == "cpu":
        out["threads"] = torch.get_num_threads()
    for family in (Family.SIT, Family.LIGHTNINGDIT):
        for n in batches:
            s = _setup(family, n, dev)
            row = {"model": s["name"], "solver": s["sampler"].solver.value, "step": s["k"], "t": s["step"].t_cur,
                   "batch": n, "network_rows": 2 * n, "elements": n * s["e"], "fused_min_bytes": bytes_moved(s)}
            fns = {"reference": reference_fn(s), "torch_ops": torch_ops_fn(s, dev), "fused": fused_fn(s, lib)}
            for variant, fn in fns.items():
                reps = 5 if variant == "reference" else 20
                try:
                    if dev.type == "cuda":
                        row[variant] = _stats(time_cuda(fn, reps, budget_s))
                        if variant != "reference":
                            row[variant + "_graph"] = _stats(time_cuda_graph(fn, reps, budget_s))
                    else:
                        row[variant] = _stats(time_cpu(fn, reps, budget_s))
                except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
                    row[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            _ratios(row)
            out["rows"].append(row)
            print(_line(row), flush=True)
            del s, fns
    return out


def _med(row, key):
    v = row.get(key)
    return v.get("median_ms") if isinstance(v, dict) else None


def _ratios(row) -> None:
    f, fg = _med(row, "fused"), _med(row, "fused_graph")
    if f:
        for key in ("reference", "torch_ops"):
            if _med(row, key):
                row[f"speedup_vs_{key}"] = _med(row, key) / f
    if fg and _med(row, "torch_ops_graph"):
        row["speedup_graph_vs_torch_ops_graph"] = _med(row, "torch_ops_graph") / fg
    if fg:
        row["fused_graph_GBps"] = row["fused_min_bytes"] / (fg * 1e-3) / 1e9


def _fmt(v):
    return "-" if v is None else f"{v:9.3f}"


def _line(row) -> str:
    cols = [_med(row, k) for k in ("reference", "torch_ops", "fused", "torch_ops_graph", "fused_graph")]
    sp = row.get("speedup_vs_reference")
    tail = f" | x{sp:.1f} vs reference" if sp else ""
    return f"{row['model']:18s} {row['solver']:6s} N={row['batch']:4d} | " + " ".join(_fmt(c) for c in cols) + tail


def table(result: dict) -> str:
    head = (f"{'model':18s} {'solver':6s} {'batch':>6s} | {'reference':>9s} {'torch_ops':>9s} {'fused':>9s} "
            f"{'ops_graph':>9s} {'fus_graph':>9s} | ref/fused ops/fused graph-ratio GB/s")
    lines = [f"median ms per step ({result.get('gpu', result['device_type'])}):", head, "-" * len(head)]
    for r in result["rows"]:
        cols = [_med(r, k) for k in ("reference", "torch_ops", "fused", "torch_ops_graph", "fused_graph")]
        ratios = [r.get("speedup_vs_reference"), r.get("speedup_vs_torch_ops"), r.get("speedup_graph_vs_torch_ops_graph"),
                  r.get("fused_graph_GBps")]
        lines.append(f"{r['model']:18s} {r['solver']:6s} {r['batch']:6d} | " + " ".join(_fmt(c) for c in cols) + " | "
                     + " ".join("-" if v is None else f"{v:.1f}" for v in ratios))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per variant (after the minimum reps)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU only: torch intra-op threads, also used by the twin (default 1: on a small shared "
                         "machine OpenMP spin-waiting makes multi-threaded timings meaningless)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>_<date>.json)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time on cuda", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    result = bench(args.device, [int(b) for b in args.batches.split(",")], args.budget)
    path = Path(args.out) if args.out else RESULTS / f"kernels_{torch.device(args.device).type}_{time.strftime('%Y%m%d')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    if "error" in result:
        print(result["error"], file=sys.stderr)
        return 1
    print(table(result))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
