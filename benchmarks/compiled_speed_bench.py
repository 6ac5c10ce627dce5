"""Forward speed of the compiled backend against eager PyTorch (and ONNX Runtime when installed).

Not a test. For each model (random weights, std 0.02) a child process builds, at fp32:
  * eager: ``TorchBackend``;
  * compiled_<variant>: ``CompiledBackend`` with row counts = the batches measured (warmed up first):
    its defaults, and/or Inductor's own linears (aten), and/or with freezing (--variants);
  * ort (if onnx, onnxscript and onnxruntime import, and not --no-ort): an fp32 graph exported into a
    temporary folder, on ONNX Runtime's provider for the device;
then, per batch, runs the backends in turn, --reps rounds (one untimed round first), so that a
machine shared with other work slows all of them alike; reports medians, the ratios
eager/compiled and ort/compiled (> 1: compiled faster), and the max abs difference to eager.

    nice -n 10 python benchmarks/compiled_speed_bench.py                     # SiT-B/2 and LightningDiT-B/1, CPU
    python benchmarks/compiled_speed_bench.py --models SiT-XL/2 --device cuda --batches 8 32 --no-ort

Results: benchmarks/results/compiled_speed_<device>_<date>.json with provenance.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("SiT-B/2", "LightningDiT-B/1")
# Compiled-backend variants (constructor arguments): the CPU default, plain Inductor, Inductor + freezing.
VARIANTS = {
    "default": {},
    "aten": {"cpu_linear": "aten"},
    "freezing": {"cpu_linear": "aten", "freezing": True},
}


def child(name: str, device: str, batches: list[int], reps: int, depth: int | None, ort: bool,
          variants: list[str], threads: int | None) -> dict:
    import torch

    from igengine.backends import TorchBackend
    from igengine.backends.compiled import CompiledBackend
    from igengine.models.checkpoint import LoadedCheckpoint
    from igengine.config import Precision
    from igengine.models import IGDiT, preset

    if threads:
        torch.set_num_threads(threads)
    cfg = preset(name, **({} if depth is None else {"depth": depth, "encoder_depth": min(depth, 8)}))
    torch.manual_seed(0)
    model = IGDiT(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if pname.endswith("norm.weight") else 0.0))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    import copy

    backends = {"eager": TorchBackend(copy.deepcopy(model), precision=Precision.FP32, device=device)}
    compiled = {}
    for variant in variants:
        compiled[variant] = CompiledBackend(copy.deepcopy(model), row_counts=tuple(batches), precision=Precision.FP32,
                                            device=device, **VARIANTS[variant])
        compiled[variant].warmup()
        backends[f"compiled_{variant}"] = compiled[variant]
    tmp = None
    if ort:
        try:
            from igengine.backends.onnxruntime_backend import OnnxRuntimeBackend
            from igengine.export.contract import read_record
            from igengine.export import ExportConfig
            from igengine.export.onnx import export_onnx

            loaded = LoadedCheckpoint(model, cfg, Path(f"random-{name.replace('/', '-')}"), "random", _sha256="0" * 64)
            tmp = tempfile.TemporaryDirectory(prefix="igengine-speed-")
            result = export_onnx(loaded, ExportConfig(precision=Precision.FP32, max_batch=max(batches)),
                                 Path(tmp.name) / "export")
            graph = result.folder / "model.onnx"
            backends["ort"] = OnnxRuntimeBackend(graph, read_record(graph), cfg, device, threads=threads or 0)
        except ImportError as e:
            print(f"ONNX Runtime comparison skipped: {e}", file=sys.stderr)

    out = {}
    for n in batches:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, *cfg.latent_shape, generator=g).to(device)
        t = torch.rand(n, generator=g).to(device)
        y = torch.randint(0, cfg.num_classes, (n,), generator=g).to(device)
        results = {k: b(x, t, y) for k, b in backends.items()}  # untimed round
        times = {k: [] for k in backends}
        for _ in range(reps):
            for k, b in backends.items():
                sync()
                t0 = time.perf_counter()
                b(x, t, y)
                sync()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {f"{k}_median_s": round(v, 4) for k, v in med.items()}
        for variant in variants:
            c = med[f"compiled_{variant}"]
            row[f"eager_over_compiled_{variant}"] = round(med["eager"] / c, 3)
            if "ort" in med:
                row[f"ort_over_compiled_{variant}"] = round(med["ort"] / c, 3)
        for k in results:
            if k != "eager":
                row[f"max_abs_diff_{k}_vs_eager"] = max(float((a.cpu() - b.cpu()).abs().max())
                                                       for a, b in zip(results[k], results["eager"]))
        out[f"batch_{n}"] = row
        print(name, n, json.dumps(row), file=sys.stderr, flush=True)
    for c in compiled.values():
        c.check_no_recompiles()
    if tmp is not None:
        tmp.cleanup()
    return {"model": name, "depth": cfg.depth, "device": device, "threads": torch.get_num_threads(), "reps": reps,
            "forward": out, "compiled": {k: c.describe() for k, c in compiled.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=None, help="override the preset's depth (quick checks)")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime comparison")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                    help="compiled backends to measure: default (CPU: oneDNN linears), aten (Inductor's own "
                         "linears, MKL), freezing (aten + Inductor's freezing)")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.batches, args.reps, args.depth, not args.no_ort,
                                    args.variants, args.threads)))
        return

    from benchmarks.provenance import provenance

    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--batches", *map(str, args.batches),
               "--reps", str(args.reps)] + (["--depth", str(args.depth)] if args.depth else []) + \
              (["--no-ort"] if args.no_ort else []) + ["--variants", *args.variants] + \
              (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / f"compiled_speed_{args.device.split(':')[0]}_{stamp}.json"
    report = {
        "provenance": {**provenance(), "onnxruntime": ort_version},
        "what": ("fp32 forward, random weights; seconds, medians over reps with the backends interleaved; "
                 "eager_over_compiled_* / ort_over_compiled_* > 1 means that compiled backend is faster"),
        "settings": {"batches": args.batches, "reps": args.reps, "depth": args.depth,
                     "variants": args.variants, "threads": args.threads},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
