"""Cold vs warm start of the compiled backend: time to a usable backend in a fresh process.

Not a test. Two child processes run the same thing one after the other against one cache folder:
  1. cold: $IGENGINE_CACHE is a new, empty folder (Inductor's FX graph cache and AOTAutograd's
     cache start empty), so every graph is compiled from scratch;
  2. warm: the same folder, now filled by the cold run: graphs are loaded from the cache (Dynamo
     still traces the model in each process; that part is never cached).
Each child measures, from its own start: importing torch + igengine, building the model (random
weights), constructing ``CompiledBackend``, ``warmup()`` (first call per row count, and the compile
time of each graph as the backend recorded it), and one timed call per row count after warm-up.

    python benchmarks/compile_start_bench.py                                  # SiT-B/2, CPU, fp32, rows 1 2
    python benchmarks/compile_start_bench.py --models SiT-XL/2 LightningDiT-XL/1 --device cuda \
        --precision bf16 --rows 64 128
    python benchmarks/compile_start_bench.py --depth 2 --rows 2               # a quick, shallow check

Results: benchmarks/results/compile_start_<device>_<date>.json with provenance.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(name: str, device: str, precision: str, rows: list[int], depth: int | None, mode: str | None,
          regions: bool | None = None) -> dict:
    t_import = time.perf_counter()
    import torch

    from igengine.backends.compiled import CompiledBackend
    from igengine.models import IGDiT, preset

    import_s = time.perf_counter() - t_import
    overrides = {} if depth is None else {"depth": depth, "encoder_depth": min(depth, 8)}
    cfg = preset(name, **overrides)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = IGDiT(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if pname.endswith("norm.weight") else 0.0))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend = CompiledBackend(model, row_counts=tuple(rows), precision=precision, device=device, mode=mode,
                              regions=regions)
    construct_s = time.perf_counter() - t0
    backend.warmup()
    after = {}
    for n in rows:
        x = torch.randn(n, *cfg.latent_shape, device=device)
        t = torch.rand(n, device=device)
        y = torch.randint(0, cfg.num_classes, (n,), device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend(x, t, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        after[str(n)] = round(time.perf_counter() - t0, 4)
    d = backend.describe()
    return {
        "model": name,
        "depth": cfg.depth,
        "import_s": round(import_s, 2),
        "build_model_s": round(build_s, 2),
        "construct_backend_s": round(construct_s, 2),
        "warmup_s": round(d["warmup_seconds"], 2),
        "first_call_s": {k: round(v, 2) for k, v in d["first_call_seconds"].items()},
        "compile_s": [round(v, 2) for v in d["compile_seconds"]],
        "call_after_warmup_s": after,
        "process_to_ready_s": round(time.perf_counter() - T_START, 2),
        "recompiles": d["recompiles"],
        "backend": d,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["SiT-B/2"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["reference", "fp32", "bf16", "fp16"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--depth", type=int, default=None, help="override the preset's depth (quick checks)")
    ap.add_argument("--mode", default=None, help="torch.compile mode (see igengine.backends.compiled.MODES)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache folder, kept (default: a new temporary one, deleted at the end)")
    ap.add_argument("--regions", choices=["default", "on", "off", "both"], default="default",
                    help="block regions of the compiled backend (igengine.models.layers.compile_region): "
                         "default: the backend's choice for the device; both: each model with and without, "
                         "each in its own cache")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one model in this process
    args = ap.parse_args()
    if args.child:
        regions = {"default": None, "on": True, "off": False}[args.regions]
        print(json.dumps(child(args.child, args.device, args.precision, args.rows, args.depth, args.mode, regions)))
        return

    from benchmarks.provenance import provenance

    results = []
    variants = ["on", "off"] if args.regions == "both" else [args.regions]
    if args.cache is not None and len(variants) > 1:
        sys.exit("--cache holds one variant's artifacts: use it with --regions on or off")
    for name, regions in ((n, r) for n in args.models for r in variants):
        cache = args.cache or Path(tempfile.mkdtemp(prefix="igengine-compile-bench-"))
        entry = {"model": name, "regions": regions, "cache": str(cache)}
        for phase in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--precision", args.precision,
                   "--rows", *map(str, args.rows), "--regions", regions]
            if args.depth is not None:
                cmd += ["--depth", str(args.depth)]
            if args.mode:
                cmd += ["--mode", args.mode]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "IGENGINE_CACHE": str(cache)})
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"{name} {phase} failed:\n{proc.stderr[-4000:]}")
            entry[phase] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "child_wall_s": round(wall, 2)}
            print(phase, f"regions {regions}", json.dumps({k: v for k, v in entry[phase].items() if k != "backend"}), flush=True)
        results.append(entry)
        if args.cache is None:  # a temporary cache of this run only
            shutil.rmtree(cache, ignore_errors=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / f"compile_start_{args.device.split(':')[0]}_{stamp}.json"
    report = {
        "provenance": provenance(),
        "what": ("compiled backend start-up in a fresh process: cold = empty Inductor cache, warm = the cache the "
                 "cold run filled; seconds; process_to_ready_s counts from interpreter start to the end of warmup()"),
        "settings": {"device": args.device, "precision": args.precision, "rows": args.rows, "depth": args.depth,
                     "mode": args.mode or "default", "regions": args.regions},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
