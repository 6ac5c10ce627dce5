"""Peak memory and time of `igengine pack` on synthetic chunks (default: 50,000 x 256 x 256 x 3 = 9.8 GB).

    nice python benchmarks/pack_bench.py --dir /tmp/igengine-pack-bench

Writes the chunks with ``ChunkStore.write`` (as the sampler does), runs ``python -m igengine pack``
in a child process and reads the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), checks
the header, the labels and the first and last chunk of the result, records JSON under
benchmarks/results/ and deletes the data (unless --keep). Needs about 2.1 x the data on disk.
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
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from igengine.store.chunks import ChunkSpec, ChunkStore  # noqa: E402
from igengine.store.atomic import atomic_write_json  # noqa: E402
from igengine.store.manifest import MANIFEST, SAMPLES  # noqa: E402
from igengine.store.pack import BulkLayout  # noqa: E402


def synthetic(base: np.ndarray, k: int, size: int) -> np.ndarray:
    """Pixels of chunk k: a random block shifted by k (different per chunk, cheap to make)."""
    return base[:size] + np.uint8(k % 256)


def read_rows(path: Path, start: int, count: int, row_bytes: int) -> np.ndarray:
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)(f)
        f.seek(f.tell() + start * row_bytes)
        return np.frombuffer(f.read(count * row_bytes), dtype=dtype).reshape(count, *shape[1:]), shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/igengine-pack-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the chunks and samples.npz")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pack_bench.json")
    args = ap.parse_args()

    row = args.size * args.size * 3
    data_bytes = args.n * row
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 2.1 * data_bytes:
        sys.exit(f"pack_bench: {args.dir} has {free / 1e9:.1f} GB free, needs {2.1 * data_bytes / 1e9:.1f} GB")

    layout = BulkLayout(n=args.n, chunk_size=args.chunk_size, chunks_dir="chunks/bench",
                        pixels=(args.size, args.size, 3), latents=None, latents_path=None)
    store = ChunkStore(args.dir / layout.chunks_dir, ChunkSpec(layout.pixels, None))
    store.folder.mkdir(parents=True, exist_ok=True)
    plan = layout.plan
    base = np.random.default_rng(0).integers(0, 256, (args.chunk_size, args.size, args.size, 3), dtype=np.uint8)
    try:
        t0 = time.perf_counter()
        for k, c in enumerate(plan.chunks):
            store.write(c, c.indices(), synthetic(base, k, c.size), None)
        write_s = time.perf_counter() - t0
        atomic_write_json(args.dir / MANIFEST, {"n": args.n, "bulk": layout.to_dict(), "outputs": {}})

        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "igengine", "pack", str(args.dir)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        pack_wall = time.perf_counter() - t0
        peak_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            sys.exit(f"pack failed: {proc.stderr}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])

        out = args.dir / SAMPLES
        first, shape = read_rows(out, 0, plan.chunks[0].size, row)
        last_chunk = plan.chunks[-1]
        last, _ = read_rows(out, last_chunk.start, last_chunk.size, row)
        assert shape == (args.n, args.size, args.size, 3)
        assert np.array_equal(first, synthetic(base, 0, plan.chunks[0].size))
        assert np.array_equal(last, synthetic(base, len(plan.chunks) - 1, last_chunk.size))
        with np.load(out) as z:
            assert np.array_equal(z["labels"], np.arange(args.n))
        result = {
            "benchmark": "pack_bench",
            "n": args.n, "image": [args.size, args.size, 3], "chunk_size": args.chunk_size,
            "pixel_bytes": data_bytes, "samples_npz_bytes": out.stat().st_size,
            "write_chunks_s": round(write_s, 2),
            "pack_s": summary["pack_s"], "pack_process_wall_s": round(pack_wall, 2),
            "pack_peak_rss_mb": round(peak_rss_kb / 1024, 1),
            "pack_throughput_gb_s": round(data_bytes / 1e9 / summary["pack_s"], 3),
            "command": f"python -m igengine pack {args.dir}",
            "provenance": provenance(),
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
