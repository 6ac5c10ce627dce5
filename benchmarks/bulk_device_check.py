"""GPU check of bulk sampling (tiny LightningDiT + tiny VA-VAE, no downloads).

    PYTHONPATH=. python3 benchmarks/bulk_device_check.py [--out RESULT.json]

Runs `igengine sample` on the GPU as one process with batch 64 (the reference), one process with
batch 7, torchrun with 1 process (device from LOCAL_RANK) and torchrun with 2 processes sharing
cuda:0, and reports against the reference: labels equal, latents max |diff|, and how many uint8
pixel values differ. Also records the device each run's manifest names.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from tests.bulk_fixtures import save_ldit, save_stats, save_vavae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--shared-device", default="cuda:0", help="device both torchrun processes share (cpu for a dry run)")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="igengine-gpu-"))
    files = [save_ldit(d / "ldit.safetensors"), save_vavae(d / "vavae.pt"), save_stats(d / "stats.pt")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def sample(name: str, batch: int, procs: int = 0, device: str = "auto") -> dict:
        out = d / name
        flags = ["sample", "--ckpt", str(files[0]), "--vae", str(files[1]), "--latent-stats", str(files[2]),
                 "--num-samples", str(args.n), "--steps", "6", "--chunk-size", "8", "--batch-size", str(batch),
                 "--device", device, "--save-latents", str(out / "lat.npy"), "--out", str(out)]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                    if procs else [sys.executable])
        t0 = time.perf_counter()
        proc = subprocess.run([*launcher, "-m", "igengine", *flags], env=env, capture_output=True, text=True,
                              timeout=240)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        m = json.loads((out / "manifest.json").read_text())
        z = np.load(out / "samples.npz")
        return {"pixels": z["arr_0"], "labels": z["labels"], "latents": np.load(out / "lat.npy"),
                "device": m["backend"]["device"], "world_size": m["world_size"], "wall_s": time.perf_counter() - t0}

    runs = {"ref_b64": sample("ref", 64), "b7": sample("b7", 7), "torchrun1": sample("tr1", 64, procs=1),
            "torchrun2_shared_gpu": sample("tr2", 64, procs=2, device=args.shared_device)}
    ref = runs["ref_b64"]
    report = {}
    for name, r in runs.items():
        report[name] = {
            "device": r["device"], "world_size": r["world_size"], "wall_s": round(r["wall_s"], 2),
            "labels_equal": bool(np.array_equal(r["labels"], ref["labels"])),
            "latents_max_abs_diff": float(np.abs(r["latents"] - ref["latents"]).max()),
            "pixel_values_differing": int((r["pixels"] != ref["pixels"]).sum()),
            "pixel_values": int(ref["pixels"].size),
        }
    result = {"check": "bulk_device_check", "n": args.n, "runs": report, "provenance": provenance()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
