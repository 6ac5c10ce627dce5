"""MFU of one network forward: compiled vs eager, against the measured bf16 matmul peak (CUDA).

Not a test. Measures ``igengine.bench.peak.matmul_peak`` for the network dtype, then for each
model and row count: the median forward time (CUDA-synchronised wall time over --reps calls after
the warm-up) of ``CompiledBackend`` and of the eager ``TorchBackend``, and
MFU = ``forward_flops(config, rows)`` / time / measured peak. Random weights (std 0.02).

    python benchmarks/compiled_mfu_bench.py --models SiT-XL/2 --rows 64 128 256 --precision bf16

Results: benchmarks/results/compiled_mfu_<device>_<date>.json with provenance.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["SiT-XL/2"])
    ap.add_argument("--rows", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from benchmarks.provenance import provenance
    from igengine.backends import TorchBackend
    from igengine.backends.compiled import CompiledBackend
    from igengine.bench.flops import forward_flops
    from igengine.bench.peak import matmul_peak
    from igengine.models import IGDiT, preset
    from igengine.precision import NETWORK_DTYPE
    from igengine.config import Precision

    device = torch.device(args.device)
    dtype = NETWORK_DTYPE[Precision(args.precision)]
    peak = matmul_peak(dtype, device)
    print("peak", json.dumps(peak), flush=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(args.reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    results = []
    for name in args.models:
        cfg = preset(name)
        torch.manual_seed(0)
        model = IGDiT(cfg).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname != "pos_embed":
                    p.copy_(torch.randn_like(p) * 0.02 + (1.0 if pname.endswith("norm.weight") else 0.0))
        eager = None if args.no_eager else TorchBackend(copy.deepcopy(model), precision=args.precision, device=device)
        compiled = CompiledBackend(model, row_counts=tuple(args.rows), precision=args.precision, device=device,
                                   mode=args.mode)
        compiled.warmup()
        entry = {"model": name, "precision": args.precision, "rows": {}}
        for n in args.rows:
            x = torch.randn(n, *cfg.latent_shape, device=device)
            t = torch.rand(n, device=device)
            y = torch.randint(0, cfg.num_classes, (n,), device=device)
            flop = forward_flops(cfg, n)
            row = {"flop": flop}
            row["compiled_s"] = median_time(lambda: compiled(x, t, y))
            row["compiled_mfu"] = flop / row["compiled_s"] / peak["median_flops"]
            if eager is not None:
                row["eager_s"] = median_time(lambda: eager(x, t, y))
                row["eager_mfu"] = flop / row["eager_s"] / peak["median_flops"]
                a, b = compiled(x, t, y), eager(x, t, y)
                row["max_abs_diff_vs_eager"] = max(float((u - v).abs().max()) for u, v in zip(a, b))
            entry["rows"][str(n)] = row
            print(name, n, json.dumps(row), flush=True)
        compiled.check_no_recompiles()
        entry["compiled"] = compiled.describe()
        results.append(entry)
        del eager, compiled, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / f"compiled_mfu_{device.type}_{stamp}.json"
    report = {"provenance": provenance(), "peak": peak,
              "what": "MFU = forward_flops / median forward time / measured matmul peak (median FLOP/s)",
              "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
