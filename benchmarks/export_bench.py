"""Export cost and ONNX Runtime vs torch speed for XL-sized models on this machine's CPU.

Not a test (minutes, ~8 GB of RAM per model). Run, with the machine otherwise quiet:

    nice -n 10 python benchmarks/export_bench.py [--models SiT-XL/2 LightningDiT-XL/1] [--reps 3]

For each model (random weights, std 0.02, no layer the identity; fp32 graph, opset 18) a child
process measures, in order:
  * export: wall time of ``export_onnx`` (torch.export + ONNX passes + onnx.checker full check +
    digests) and peak RSS up to then; the sizes of model.onnx and model.onnx.data;
  * ONNX Runtime: InferenceSession creation time (CPU provider);
  * forward at batch 1 and 2: median wall time over --reps calls (after one warm-up) of the ONNX
    Runtime backend and of the torch backend (fp32, eager), and their ratio (torch / ORT);
  * peak RSS of the whole child.
Each model runs in its own process, so one model's memory does not inflate the next one's peak.
Results: benchmarks/results/export_bench.json with provenance (commit, machine, versions).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.provenance import provenance  # noqa: E402

DEFAULT_MODELS = ("SiT-XL/2", "LightningDiT-XL/1")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_model(name: str, reps: int, threads: int) -> dict:
    """Everything for one model, in this process (called in a child by ``main``)."""
    from igengine.backends import TorchBackend
    from igengine.jobs.backend import build_backend
    from igengine.models.checkpoint import LoadedCheckpoint
    from igengine.config import Precision
    from igengine.export import ExportConfig
    from igengine.export.contract import SIDECAR
    from igengine.export.onnx import export_onnx
    from igengine.models import IGDiT, preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = preset(name)
    model = IGDiT(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if pname.endswith("norm.weight") else 0.0))
    n_params = sum(p.numel() for p in model.parameters())
    # No checkpoint file (that would be another 2.7 GB on disk): the record names the random weights.
    loaded = LoadedCheckpoint(model, cfg, Path(f"random-{name.replace('/', '-')}"), "random", _sha256="0" * 64)
    rss_before = peak_rss_gb()
    with tempfile.TemporaryDirectory(prefix="igengine-bench-") as tmp:
        t0 = time.perf_counter()
        result = export_onnx(loaded, ExportConfig(precision=Precision.FP32), Path(tmp) / "export")
        export_s = time.perf_counter() - t0
        rss_export = peak_rss_gb()
        sidecar = json.loads((result.folder / SIDECAR).read_text())

        t0 = time.perf_counter()
        ort_backend = build_backend("onnxruntime", loaded, Precision.FP32, "cpu", onnx=result.folder)
        ort_load_s = time.perf_counter() - t0
        torch_backend = TorchBackend(model, precision=Precision.FP32)

        forward = {}
        for n in (1, 2):
            g = torch.Generator().manual_seed(n)
            x = torch.randn(n, *cfg.latent_shape, generator=g)
            t = torch.rand(n, generator=g)
            y = torch.randint(0, cfg.num_classes, (n,), generator=g)
            ort_s = median_time(lambda: ort_backend(x, t, y), reps)
            torch_s = median_time(lambda: torch_backend(x, t, y), reps)
            a, b = ort_backend(x, t, y), torch_backend(x, t, y)
            forward[f"batch_{n}"] = {
                "ort_median_s": round(ort_s, 4),
                "torch_median_s": round(torch_s, 4),
                "torch_over_ort": round(torch_s / ort_s, 3),
                "max_abs_diff_v_final": float((a[0] - b[0]).abs().max()),
                "max_abs_diff_v_inter": float((a[1] - b[1]).abs().max()),
            }
    return {
        "model": name,
        "params": n_params,
        "precision": "fp32",
        "opset": 18,
        "threads": threads,
        "reps": reps,
        "export_s": round(export_s, 2),
        "torch_export_s": sidecar["timing"]["torch_export_s"],
        "peak_rss_before_export_gb": round(rss_before, 2),
        "peak_rss_after_export_gb": round(rss_export, 2),
        "files_bytes": {k: v["bytes"] for k, v in sidecar["files"].items()},
        "ort_session_load_s": round(ort_load_s, 2),
        "forward": forward,
        "peak_rss_total_gb": round(peak_rss_gb(), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model in this process
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_bench.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_model(args.one, args.reps, args.threads)))
        return
    import onnxruntime

    results = []
    for name in args.models:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--reps", str(args.reps),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    report = {"provenance": {**provenance(), "onnxruntime": onnxruntime.__version__,
                             "onnxruntime_providers": ["CPUExecutionProvider"]},
              "what": "fp32 graph, opset 18, random weights; times in seconds, medians over reps after one warm-up; "
                      "torch_over_ort > 1 means ONNX Runtime is faster", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
