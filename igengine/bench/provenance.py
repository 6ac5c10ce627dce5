"""Who, where and when of a measurement: recorded in every benchmark result (``igengine bench --json``)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """HEAD of the checkout (+dirty when tracked files differ), or $IGENGINE_COMMIT where the tree has no .git."""
    if not (ROOT / ".git").exists() and os.environ.get("IGENGINE_COMMIT"):
        return os.environ["IGENGINE_COMMIT"] + " (from IGENGINE_COMMIT)"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # no git binary, or not a repository
        return os.environ.get("IGENGINE_COMMIT", "unknown")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# The CPU features that decide GEMM speed on the project's CPUs (AVX2-only and AVX-512 BF16 VMs differ 2-4x).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_facts() -> dict:
    """The CPU's model name and which of ``CPU_FLAGS`` it has (Linux /proc/cpuinfo; None elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or None, "cpu_flags": None}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def provenance() -> dict:
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        **cpu_facts(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in load] if load else None,
    }
