"""The Python steps of benchmarks/device_check.sh (one subcommand per step; see that script).

    python benchmarks/device_check_steps.py env --out env.json          # versions, GPU, source hash
    python benchmarks/device_check_steps.py kernels --expect cmake --out k.json   # load + self-test
    python benchmarks/device_check_steps.py make-ckpt --model SiT-XL/2 --out ckpt.safetensors
    python benchmarks/device_check_steps.py compare --dir SECTION_DIR --out compare.json
    python benchmarks/device_check_steps.py record --work WORK --out OUT --log LOG ...

``record`` runs after every section: it rewrites OUT/device_check.json (the summary) and
OUT/device_check.tar.gz (every section's files) atomically, so that whatever stops the script
leaves the results of every finished section in OUT. It imports no torch (it runs ~20 times).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# What the device tool returns: at most 8 files of at most 16 MiB each. The script writes three
# (log, summary, archive); an archive member above MAX_MEMBER is left out (and listed), and the
# archive is kept under MAX_ARCHIVE by leaving out the largest members first.
OUT_FILES = ("device_check.log", "device_check.json", "device_check.tar.gz")
MAX_OUT_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_MEMBER = 4 * 2**20
MAX_ARCHIVE = 15 * 2**20
LOG_KEEP_HEAD = 2 * 2**20
LOG_KEEP_TAIL = 12 * 2**20

SOURCE_GLOBS = ("igengine/**/*.py", "igengine/**/*.json", "csrc/*", "benchmarks/*.py", "benchmarks/*.sh",
                "tests/*.py", "CMakeLists.txt", "pyproject.toml")


def sources_sha256(root: Path = ROOT) -> str:
    """sha256 over the sources that decide a result (names and bytes): identifies the tree where it has no .git."""
    h = hashlib.sha256()
    files = sorted({p for g in SOURCE_GLOBS for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts})
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout + out.stderr).strip() or None


# ---------------------------------------------------------------------------------------------- env


def cmd_env(args) -> int:
    from benchmarks.provenance import provenance

    info = {"provenance": provenance(), "sources_sha256": sources_sha256(),
            "executable": sys.executable,
            "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                                "--format=csv,noheader"]),
            "nvcc": _run([os.environ.get("CUDACXX") or "nvcc", "--version"]),
            "cmake": next(iter((_run(["cmake", "--version"]) or "").splitlines()), None),
            "ninja": _run(["ninja", "--version"])}
    import importlib.util

    import torch

    info["modules"] = {m: importlib.util.find_spec(m) is not None
                       for m in ("triton", "matplotlib", "cuda.bindings", "timm", "torchdiffeq", "onnxruntime")}
    if torch.cuda.is_available():
        info["cuda_devices"] = [{"name": torch.cuda.get_device_name(i),
                                 "capability": "sm_%d%d" % torch.cuda.get_device_capability(i)}
                                for i in range(torch.cuda.device_count())]
    print(json.dumps(info, indent=1))
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    return 0 if torch.cuda.is_available() else 3


# ------------------------------------------------------------------------------------------ kernels


def cmd_kernels(args) -> int:
    """Load the CUDA kernel library of the build that IGENGINE_KERNELS_BUILD chooses, describe it and run
    the self-test (``igengine.kernels.selftest``) on it; exit 1 if the expected build did not load or
    failed the self-test, 3 without a GPU."""
    import torch

    from igengine.kernels import library
    from igengine.kernels.selftest import SelfTestError, check_against_reference

    result: dict = {"build_asked": os.environ.get(library.ENV_BUILD, "auto"), "expect": args.expect}
    if not torch.cuda.is_available():
        result["error"] = "no CUDA GPU"
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 3
    result["describe"] = library.describe()
    lib = library.cuda_library(0)
    ok = lib is not None and (args.expect is None or result["describe"]["cuda_build"] == args.expect)
    if lib is not None:
        cpu = library.cpu_library()
        try:
            notes = check_against_reference(lib, 0, cpu)
            result["selftest"] = {"passed": True, "notes": notes, "cpu_twin": cpu is not None}
        except (SelfTestError, library.KernelError, RuntimeError) as exc:
            result["selftest"] = {"passed": False, "error": str(exc)}
            ok = False
    result["ok"] = ok
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------- make-ckpt


def cmd_make_ckpt(args) -> int:
    """A checkpoint of ``--model`` with every parameter random (``igengine.bench.job.random_model``, the
    weights igengine bench times), kept: a rerun on the same machine finds it (written atomically)."""
    out = Path(args.out)
    if out.is_file():
        print(f"{out}: present ({out.stat().st_size / 2**30:.2f} GiB), kept")
        return 0
    from igengine.bench.job import random_model
    from igengine.models.checkpoint import save_safetensors

    t0 = time.perf_counter()
    model = random_model(args.model, args.seed)
    t1 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.safetensors")
    save_safetensors(model, tmp, extra={"igengine.device_check": f"random {args.model} seed {args.seed}"})
    os.replace(tmp, out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, built in {t1 - t0:.1f} s, "
          f"written in {time.perf_counter() - t1:.1f} s ({out.stat().st_size / 2**30:.2f} GiB)")
    return 0


# ------------------------------------------------------------------------------------------- compare

# bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2.0e-3). A bf16 network's final latents after a
# few steps stay within a relative L2 error of that order of the fp32 reference (an H100 run of SiT-XL/2,
# 8 steps, batch 16: 4.7e-4, benchmarks/results/gpu_sampling_20261127-081841.json); above 2^-6 the path
# is wrong (a dtype or a kernel), not rounding.
BF16_REL_L2_SANITY = 2.0**-6
# Slack of the parity rule below: float32 rounding of the reference's own scale.
ABS_SLACK = 1e-6


def _errors(a, b) -> dict:
    import numpy as np

    d = a.astype(np.float64) - b.astype(np.float64)
    ref = np.linalg.norm(b.astype(np.float64))
    return {"max_abs": float(np.abs(d).max()), "rel_l2": float(np.linalg.norm(d) / max(ref, 1e-30))}


def compare_runs(captured: Path, eager: Path, reference: Path) -> dict:
    """Final latents of ``igengine sample`` at bf16 (captured), bf16 with --capture off and --precision
    reference, compared; the verdict names each bound and whether it holds.

    Bounds (docs/CONTRACTS.md "Tolerances"; the parity rule of shared/STYLE.md):
      * capture is a replay of the same kernels: its error against the reference may be at most twice
        the error of the same bf16 maths launched one by one (plus float32 slack of the scale);
      * the captured and uncaptured runs differ by rounding only: at most twice the bf16 error itself;
      * the bf16 error itself: relative L2 below ``BF16_REL_L2_SANITY`` (a broken path, not rounding);
      * the runs took the paths they were asked for (manifest ``backend.step``), and all is finite.
    """
    import numpy as np

    runs = {}
    for name, folder in (("captured", captured), ("eager", eager), ("reference", reference)):
        m = _load(folder / "manifest.json") or {}
        lat = folder / "latents.npy"
        runs[name] = {"latents": np.load(lat) if lat.is_file() else None,
                      "step": (m.get("backend") or {}).get("step"), "precision": (m.get("sampler") or {}).get("precision"),
                      "kernels": (m.get("backend") or {}).get("kernels"), "timing": m.get("timing")}
    missing = [k for k, r in runs.items() if r["latents"] is None]
    out: dict = {"runs": {k: {kk: v for kk, v in r.items() if kk != "latents"} for k, r in runs.items()}}
    if missing:
        out.update(ok=False, error=f"no latents.npy from {', '.join(missing)}")
        return out
    a, b, c = (runs[k]["latents"] for k in ("captured", "eager", "reference"))
    shapes = {k: list(r["latents"].shape) for k, r in runs.items()}
    out["shapes"] = shapes
    if len({tuple(s) for s in shapes.values()}) != 1:
        out.update(ok=False, error=f"latent shapes differ: {shapes}")
        return out
    scale = float(np.abs(c).max())
    slack = ABS_SLACK * max(1.0, scale)
    e_cap, e_eager, d_cap = _errors(a, c), _errors(b, c), _errors(a, b)
    out.update(reference_max_abs=scale, captured_vs_reference=e_cap, eager_vs_reference=e_eager,
               captured_vs_eager=d_cap)
    checks = {
        "finite": bool(np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(c).all()),
        "paths": (runs["captured"]["step"], runs["eager"]["step"], runs["reference"]["step"])
        == ("cuda-graph", "cuda", "reference"),
        "captured_within_twice_eager_error": e_cap["max_abs"] <= 2 * e_eager["max_abs"] + slack,
        "capture_difference_within_twice_bf16_error": d_cap["max_abs"] <= 2 * e_eager["max_abs"] + slack,
        "bf16_rel_l2_below_sanity_bound": e_eager["rel_l2"] <= BF16_REL_L2_SANITY
        and e_cap["rel_l2"] <= BF16_REL_L2_SANITY,
    }
    out["bounds"] = {
        "captured_within_twice_eager_error": "max|captured - reference| <= 2 max|eager - reference| + 1e-6 max(1, |ref|)",
        "capture_difference_within_twice_bf16_error": "max|captured - eager| <= 2 max|eager - reference| + 1e-6 max(1, |ref|)",
        "bf16_rel_l2_below_sanity_bound": f"relative L2 of each bf16 run against the reference <= 2^-6 = {BF16_REL_L2_SANITY:.4g}",
        "paths": "manifest backend.step: captured 'cuda-graph', eager 'cuda' (fused kernels, launched one by "
                 "one), reference 'reference'",
    }
    out["checks"] = checks
    out["ok"] = all(checks.values())
    return out


def cmd_compare(args) -> int:
    d = Path(args.dir)
    result = compare_runs(d / "captured", d / "eager", d / "reference")
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0 if result.get("ok") else 1


# -------------------------------------------------------------------------------------------- record

SECTION_FIELDS = ("name", "status", "rc", "seconds", "cap", "need", "est", "start", "reason")


def read_sections(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = dict(zip(SECTION_FIELDS, line.split("\t")))
            for k in ("rc", "seconds", "cap", "need", "est", "start"):
                if row.get(k) not in (None, ""):
                    row[k] = int(row[k])
            rows.append(row)
    return rows


def _junit(path: Path) -> dict | None:
    try:
        import xml.etree.ElementTree as ET

        root = ET.parse(path).getroot()
    except Exception:  # noqa: BLE001 - a missing or half-written file after a timeout
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**total, "failed": failed[:50]}


def _bench(report: dict) -> dict:
    rows = [{k: r.get(k) for k in ("precision", "backend", "batch_size", "repeats_done", "samples_per_s", "mfu",
                                   "first_sample_s", "max_abs_vs_reference", "recompiles", "step_path")}
            for r in report.get("rows", [])]
    return {"model": (report.get("workload") or {}).get("model"), "partial": report.get("partial"),
            "stage": report.get("stage"), "error": report.get("error"), "rows": rows}


def highlights(sections_dir: Path, log: Path | None) -> dict:
    """The results that answer the check's questions, from each section's files (whatever exists)."""
    out: dict = {}
    for sec in sorted(p for p in sections_dir.iterdir() if p.is_dir()) if sections_dir.is_dir() else []:
        name = sec.name.split("-", 1)[1] if "-" in sec.name else sec.name
        got: dict = {}
        for f in sorted(sec.glob("*.json")):
            d = _load(f)
            if d is None:
                got[f.name] = "unreadable (cut off?)"
            elif f.name == "bench.json":
                got["bench"] = _bench(d)
            elif f.name == "compare.json":
                got["compare"] = {k: d.get(k) for k in ("ok", "checks", "captured_vs_reference", "eager_vs_reference",
                                                        "captured_vs_eager", "error")}
            elif f.name in ("cmake.json", "nvrtc.json", "nvrtc_with_twin.json"):
                got[f.stem] = {"ok": d.get("ok"), "cuda_build": (d.get("describe") or {}).get("cuda_build"),
                               "selftest": d.get("selftest"), "error": d.get("error")}
            elif f.name == "bulk.json":
                got["bulk"] = d.get("runs")
            elif f.name == "env.json":
                got["env"] = {k: d.get(k) for k in ("nvidia_smi", "cuda_devices", "modules")}
                got["env"]["torch"] = (d.get("provenance") or {}).get("torch")
        junit = sec / "junit.xml"
        if junit.is_file():
            got["pytest"] = _junit(junit)
        if got:
            out[name] = got
    if log is not None and log.is_file():  # pytest's last summary line (also after a timeout: -v prints as it goes)
        text = log.read_text(errors="replace")
        m = re.findall(r"^=+ (.*(?:passed|failed|error|skipped|no tests ran).*) =+$", text, re.M)
        if m:
            out["pytest_last_summary"] = m[-1]
    return out


def pack(sections_dir: Path, archive: Path) -> dict:
    """tar.gz of every section's files; members above MAX_MEMBER are left out, then the largest members
    until the archive is under MAX_ARCHIVE. Written atomically. Returns what went in and what did not."""
    files = sorted(p for p in sections_dir.rglob("*") if p.is_file()) if sections_dir.is_dir() else []
    left_out = [{"path": str(p.relative_to(sections_dir)), "bytes": p.stat().st_size, "why": "over 4 MiB"}
                for p in files if p.stat().st_size > MAX_MEMBER]
    keep = [p for p in files if p.stat().st_size <= MAX_MEMBER]
    while True:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
            for p in keep:
                tar.add(p, arcname=f"sections/{p.relative_to(sections_dir)}")
        if len(buf.getvalue()) <= MAX_ARCHIVE or not keep:
            break
        big = max(keep, key=lambda p: p.stat().st_size)
        keep.remove(big)
        left_out.append({"path": str(big.relative_to(sections_dir)), "bytes": big.stat().st_size,
                         "why": "archive over 15 MiB"})
    _atomic_write(archive, buf.getvalue())
    return {"file": archive.name, "bytes": len(buf.getvalue()), "members": len(keep), "left_out": left_out}


def trim_log(log: Path) -> bool:
    """Keep the head and the tail of a log above MAX_FILE_BYTES (the tool returns no larger file)."""
    if not log.is_file() or log.stat().st_size <= LOG_KEEP_HEAD + LOG_KEEP_TAIL:
        return False
    data = log.read_bytes()
    cut = len(data) - LOG_KEEP_HEAD - LOG_KEEP_TAIL
    _atomic_write(log, data[:LOG_KEEP_HEAD] + f"\n[... {cut} bytes cut by device_check_steps.py ...]\n".encode()
                  + data[-LOG_KEEP_TAIL:])
    return True


def cmd_record(args) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections_dir = work / "sections"
    log = Path(args.log) if args.log else None
    trimmed = trim_log(log) if (args.final and log is not None) else False
    env = next(iter(sorted(sections_dir.glob("*-env/env.json"))), None) if sections_dir.is_dir() else None
    env_d = _load(env) if env else None
    if env_d and env_d.get("provenance"):
        prov = env_d["provenance"]
    else:  # before (or without) the env section: what is known without torch
        from igengine.bench.provenance import git_commit

        prov = {"commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    summary = {
        "check": "igengine device check (benchmarks/device_check.sh)",
        "stamp": args.stamp,
        "dry_run": bool(args.dry_run),
        "final": bool(args.final),
        "budget_s": args.budget,
        "reserve_s": args.reserve,
        "elapsed_s": args.elapsed,
        "provenance": prov,
        "sources_sha256": (env_d or {}).get("sources_sha256") or sources_sha256(),
        "sections": read_sections(work / "sections.tsv"),
        "results": highlights(sections_dir, log),
        "archive": pack(sections_dir, out / "device_check.tar.gz"),
        "log_trimmed": trimmed,
    }
    _atomic_write(out / "device_check.json", (json.dumps(summary, indent=1) + "\n").encode())
    if args.final:
        extra = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES)
        big = sorted(p.name for p in out.iterdir() if p.is_file() and p.stat().st_size > MAX_FILE_BYTES)
        print(f"OUT: {sum(1 for _ in out.iterdir())} files (at most {MAX_OUT_FILES}), none over 16 MiB: "
              f"{'yes' if not big else 'NO: ' + ', '.join(big)}" + (f"; also there: {', '.join(extra)}" if extra else ""))
        for s in summary["sections"]:
            print(f"  {s['name']:<20} {s['status']:<10} rc={s.get('rc', '')!s:<4} {s.get('seconds', '')!s:>4}s"
                  + (f"  ({s['reason']})" if s.get("reason") else ""))
    return 0


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="device_check_steps.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("kernels")
    p.add_argument("--expect", choices=("cmake", "nvrtc"), default=None)
    p.add_argument("--out", required=True)
    p = sub.add_parser("make-ckpt")
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("--dir", required=True, help="folder holding captured/, eager/ and reference/ (igengine sample outputs)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("record")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log", default=None)
    p.add_argument("--stamp", default="")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--reserve", type=int, default=0)
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--final", action="store_true")
    args = ap.parse_args(argv)
    return {"env": cmd_env, "kernels": cmd_kernels, "make-ckpt": cmd_make_ckpt, "compare": cmd_compare,
            "record": cmd_record}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
