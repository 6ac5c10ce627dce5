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


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_ne_convert", "amx_bf16", "amx_tile")
# Environment variables that hold ATen, oneDNN or MKL to a smaller instruction set than the CPU has.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_facts() -> dict:
    """The CPU a figure ran on: its model name, the vector and matrix flags that decide its GEMMs (Linux's
    /proc/cpuinfo), ATen's CPU capability, and any instruction-set limit set in the environment."""
    import torch

    model, flags = platform.processor() or None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in (None, "", "x86_64"):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "aten_capability": capability,
            "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}}


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
        "cpu": cpu_facts(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in load] if load else None,
    }
