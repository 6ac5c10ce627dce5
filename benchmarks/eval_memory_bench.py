"""Peak host memory and time of `igengine evaluate` on synthetic 50,000 x 256 x 256 x 3 samples (9.8 GB).

    nice python benchmarks/eval_memory_bench.py --dir /tmp/igengine-eval-bench

Writes a synthetic samples.npz (streamed, never held in memory) and a 10,000-image reference, then
runs two measurements, each in a child process whose peak RSS (getrusage ru_maxrss) is recorded:

  A. the whole evaluator (``run_evaluate``: streamed reader, device transfer, TF1 resize to 299x299,
     float64 moments of 2048- and 2023-wide features, the 50,000 x 2048 pool features kept for
     precision/recall, FID, sFID, precision/recall on 50k x 10k, metrics.json) with the Inception
     forward replaced by a cheap stand-in of the same output widths. 50,000 real Inception forwards
     take about 14 hours on 2 CPU cores, so this is what can be run end to end here.
  B. the real FID Inception (the [eval] extra's weights) on the first ``--forward-subset`` images
     through the same reader and resize, at the default batch size: its time per image and its peak
     memory (the network's activations), from which the CPU time for 50,000 is extrapolated.

A real CPU run's peak is bounded by A's peak plus B's increase over B's memory before the first
batch (the activations of one batch are freed before the next). On a GPU the activations live on
the device: A's figure is then the host's. Results go to benchmarks/results/eval_memory_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_images(path: Path, n: int, size: int, seed: int) -> float:
    """A synthetic uint8 [n, size, size, 3] npz, streamed in blocks of 500 images; returns seconds."""
    from igengine.store.npzstream import NpzWriter

    t = time.perf_counter()
    block = 500
    base = np.random.default_rng(seed).integers(0, 256, (block, size, size, 3), dtype=np.uint8)
    with open(path, "wb") as f, NpzWriter(f) as w:
        with w.member("arr_0", np.uint8, (n, size, size, 3)) as sink:
            for k, start in enumerate(range(0, n, block)):
                sink.write(base[: min(block, n - start)] + np.uint8(k % 256))
        w.write_array("labels", np.arange(n, dtype=np.int64) % 1000)
    return time.perf_counter() - t


def stand_in_network():
    import torch
    import torch.nn.functional as F

    from igengine.metrics.inception import POOL_DIM, SPATIAL_DIM, KnownWeights, LoadedInception
    from igengine.metrics.resize import tf1_resize_bilinear

    class StandIn(torch.nn.Module):
        """TF1 resize to 299 and the graph's normalisation (real cost), then 48 -> 2048 / 2023 projections."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("a", torch.randn(48, POOL_DIM, generator=g))
            self.register_buffer("b", torch.randn(48, SPATIAL_DIM, generator=g))

        def forward(self, pixels, spatial=True):
            x = (tf1_resize_bilinear(pixels, (299, 299)) - 128.0) * 0.0078125
            t = F.adaptive_avg_pool2d(x, 4).flatten(1)
            return {"pool": torch.relu(t @ self.a), "spatial": torch.tanh(t @ self.b)}

    w = KnownWeights(name="benchmark stand-in", sha256="0" * 64, size=0, kind="stand-in", has_logits=False,
                     origin="benchmarks/eval_memory_bench.py")
    return LoadedInception(model=StandIn(), weights=w, path=Path("stand-in"), logits_weight=None)


def child_full(args) -> dict:
    from igengine.jobs.evaluate import EvaluateJob, EvaluateProgress, run_evaluate

    marks = {}
    t0 = time.perf_counter()
    progress = EvaluateProgress(advance=lambda done: marks.update(rss_at_last_batch_mb=rss_mb(), done=done))
    rec = run_evaluate(EvaluateJob(samples=args.dir / "samples.npz", ref=args.dir / "ref.npz", device="cpu",
                                   batch_size=args.batch_size, out=args.dir / "metrics.json"),
                       progress=progress, network=stand_in_network())
    return {"wall_s": round(time.perf_counter() - t0, 1), "timing": rec["timing"], "metrics": rec["metrics"],
            "peak_rss_mb": round(rss_mb(), 1), "rss_after_features_mb": round(marks.get("rss_at_last_batch_mb", 0), 1),
            "images": marks.get("done")}


def child_forward(args) -> dict:
    import torch

    from igengine.metrics.features import extract
    from igengine.metrics.inception import load_inception
    from igengine.metrics.reader import NpzImages

    net = load_inception()
    before = rss_mb()
    images = NpzImages(args.dir / "samples.npz")
    t = time.perf_counter()
    fs = extract(images, net.model, torch.device("cpu"), args.batch_size, limit=args.forward_subset)
    dt = time.perf_counter() - t
    return {"images": fs.n, "batch_size": args.batch_size, "seconds": round(dt, 1),
            "seconds_per_image": round(dt / fs.n, 3), "rss_before_first_batch_mb": round(before, 1),
            "peak_rss_mb": round(rss_mb(), 1), "torch_threads": torch.get_num_threads(),
            "extrapolated_50k_cpu_hours": round(dt / fs.n * 50_000 / 3600, 1)}


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(args.dir), "--batch-size", str(args.batch_size),
           "--forward-subset", str(args.forward_subset)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.exit(f"eval_memory_bench: child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--ref-n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--forward-subset", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/igengine-eval-bench"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip", choices=["full", "forward"], default=None, help="skip one measurement")
    ap.add_argument("--child", choices=["full", "forward"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_memory_bench.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_full(args) if args.child == "full" else child_forward(args)))
        return

    from benchmarks.provenance import provenance

    args.dir.mkdir(parents=True, exist_ok=True)
    need = (args.n + args.ref_n) * args.size * args.size * 3 * 1.05
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(f"eval_memory_bench: {args.dir} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB")
    result = {"benchmark": "eval_memory_bench", "n": args.n, "ref_n": args.ref_n,
              "image": [args.size, args.size, 3], "batch_size": args.batch_size}
    try:
        if not (args.dir / "samples.npz").exists():
            result["write_samples_s"] = round(write_images(args.dir / "samples.npz", args.n, args.size, 0), 1)
            result["write_ref_s"] = round(write_images(args.dir / "ref.npz", args.ref_n, args.size, 1), 1)
        result["samples_npz_bytes"] = (args.dir / "samples.npz").stat().st_size
        if args.skip != "forward":
            result["B_real_inception_subset"] = run_child("forward", args)
        if args.skip != "full":
            result["A_full_pipeline_stand_in_forward"] = run_child("full", args)
        if "A_full_pipeline_stand_in_forward" in result and "B_real_inception_subset" in result:
            a, b = result["A_full_pipeline_stand_in_forward"], result["B_real_inception_subset"]
            result["cpu_real_run_peak_bound_mb"] = round(a["peak_rss_mb"] + b["peak_rss_mb"]
                                                         - b["rss_before_first_batch_mb"], 1)
        result["what_was_measured"] = (
            "A: everything but the Inception forward, on all images (stand-in network of the same output widths, "
            "with the real TF1 resize); B: the real Inception forward on the first forward-subset images; "
            "50k CPU time extrapolated from B. Peak RSS = getrusage ru_maxrss of each child process.")
        result["provenance"] = provenance()
        result["load_note"] = f"load average at the end: {os.getloadavg()} on {os.cpu_count()} cores (shared machine)"
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
