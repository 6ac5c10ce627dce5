"""`igengine sample` as a library call: resolve everything, run the sampler in batches, write outputs.

The CLI (``igengine.cli``) only parses flags into a ``SampleJob`` and calls ``run_sample``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import igengine
from igengine.backends import create_backend
from igengine.checkpoint import LoadedCheckpoint, load_checkpoint
from igengine.config import Family, GuidanceConfig, Precision, SamplerConfig, Solver
from igengine.models import paper_sampler
from igengine.noise import balanced_labels, random_labels
from igengine.outputs import (
    MANIFEST,
    SAMPLES,
    atomic_write_bytes,
    atomic_write_json,
    igengine_commit,
    npy_bytes,
    npz_bytes,
    png_bytes,
    prepare_output_folder,
)
from igengine.pixels import PIXEL_CONVERSION, to_uint8
from igengine.sampler import PlanRunner
from igengine.solvers import build_plan

DEFAULT_CHECKPOINT = Path(igengine.__file__).resolve().parent / "assets" / "sit_digits.safetensors"


class JobError(ValueError):
    """A sampling request that cannot be run as given (bad flag values, missing VAE, ...)."""


@dataclass(frozen=True)
class SampleJob:
    """Everything `igengine sample` was asked for. None means: the model's default."""

    out: Path
    n: int = 16
    batch_size: int = 64
    seed: int = 0
    ckpt: Path | None = None
    model: str | None = None
    encoder_depth: int | None = None
    num_heads: int | None = None
    labels: str = "random"  # 'random', 'balanced' or a file path
    solver: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    ig_scale: float | None = None
    ig_interval: tuple[float, float] | None = None
    timestep_shift: float | None = None
    precision: str = "reference"
    device: str = "auto"
    backend: str = "torch"
    onnx: Path | None = None  # exported graph (file or folder) for onnxruntime/tensorrt; None: the export cache
    png: bool = False
    save_latents: Path | None = None
    no_decode: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if self.n < 1:
            raise JobError(f"--n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise JobError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**64:
            raise JobError(f"--seed must lie in [0, 2^64), got {self.seed}")
        if self.steps is not None and self.steps < 1:
            raise JobError(f"--steps must be >= 1, got {self.steps}")
        for name in ("cfg_scale", "ig_scale", "timestep_shift"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and np.isfinite(v)):
                raise JobError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        for name in ("cfg_interval", "ig_interval"):
            iv = getattr(self, name)
            if iv is not None and not (0.0 <= iv[0] <= iv[1] <= 1.0):
                raise JobError(f"--{name.replace('_', '-')} must be LOW,HIGH with 0 <= LOW <= HIGH <= 1, got {iv[0]},{iv[1]}")
        if self.save_latents is not None and Path(self.save_latents).suffix != ".npy":
            raise JobError(f"--save-latents must name a .npy file, got {self.save_latents}")


def parse_interval(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise JobError(f"{flag} must be LOW,HIGH (two numbers), got {text!r}") from None
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------


def resolve_sampler(job: SampleJob, loaded: LoadedCheckpoint) -> SamplerConfig:
    """The job's explicit values over the checkpoint's recommended settings over the paper's."""
    family = loaded.config.family
    base = paper_sampler(family)
    d: dict[str, Any] = {
        "solver": base.solver.value,
        "steps": base.steps,
        "cfg_scale": base.guidance.cfg_scale,
        "cfg_interval": base.guidance.cfg_interval,
        "ig_scale": base.guidance.ig_scale,
        "ig_interval": base.guidance.ig_interval,
        "timestep_shift": base.timestep_shift,
    }
    d.update(loaded.sampler_defaults or {})
    for key in d:
        value = getattr(job, key)
        if value is not None:
            d[key] = value
    try:
        solver = Solver(d["solver"])
    except ValueError:
        raise JobError(f"unknown --solver {d['solver']!r}; choose from {', '.join(s.value for s in Solver)}") from None
    if family == Family.SIT and job.timestep_shift not in (None, 0.0):
        raise JobError("--timestep-shift applies to LightningDiT models only")
    try:
        sampler = SamplerConfig(
            solver=solver,
            steps=int(d["steps"]),
            guidance=GuidanceConfig(
                ig_scale=float(d["ig_scale"]),
                ig_interval=tuple(map(float, d["ig_interval"])),
                cfg_scale=float(d["cfg_scale"]),
                cfg_interval=tuple(map(float, d["cfg_interval"])),
            ),
            timestep_shift=float(d["timestep_shift"]),
            precision=Precision(job.precision),
        )
        build_plan(family, sampler)  # the solver must belong to the family
    except ValueError as e:
        raise JobError(str(e)) from None
    return sampler


def load_label_file(path: Path, n: int, num_classes: int) -> np.ndarray:
    """Class ids from a .npy file or a text file (ids separated by whitespace or commas)."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"labels file not found: {path}")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except (ValueError, OSError) as e:
        raise JobError(f"cannot read labels file {path}: {e}") from None
    values = np.asarray(values).reshape(-1)
    if values.size and not np.all(np.mod(values, 1) == 0):
        raise JobError(f"labels file {path} holds non-integer class ids")
    values = values.astype(np.int64)
    if values.size != n:
        raise JobError(f"labels file {path} has {values.size} class ids but --n is {n}")
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise JobError(f"labels file {path}: class id {int(bad[0])} is outside [0, {num_classes}) for this model")
    return values


def resolve_labels(job: SampleJob, num_classes: int) -> tuple[torch.Tensor, dict]:
    """All n labels and a JSON description of where they came from."""
    indices = np.arange(job.n)
    if job.labels == "random":
        return random_labels(job.seed, indices, num_classes), {"mode": "random"}
    if job.labels == "balanced":
        return balanced_labels(indices, num_classes), {"mode": "balanced"}
    values = load_label_file(Path(job.labels), job.n, num_classes)
    digest = hashlib.sha256(values.tobytes()).hexdigest()
    return torch.from_numpy(values), {"mode": "file", "file": str(job.labels), "sha256": digest}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise JobError(f"unknown --device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JobError("--device cuda was asked for but no CUDA GPU is available")
    return dev


def make_backend(job: SampleJob, loaded: LoadedCheckpoint, device: torch.device):
    return create_backend(job.backend, loaded, Precision(job.precision), device, onnx_path=job.onnx)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Callbacks for the CLI's progress display."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[int], None] = lambda done: None
    finish: Callable[[], None] = lambda: None


@dataclass
class RunResult:
    manifest: dict
    out: Path
    wall_s: float
    samples_per_s: float
    notes: list[str] = field(default_factory=list)


def run_sample(job: SampleJob, progress: Progress | None = None) -> RunResult:
    job.validate()
    progress = progress or Progress()
    ckpt_path = Path(job.ckpt) if job.ckpt is not None else DEFAULT_CHECKPOINT
    overrides = {"encoder_depth": job.encoder_depth, "num_heads": job.num_heads}
    loaded = load_checkpoint(ckpt_path, model_name=job.model, overrides=overrides)
    cfg = loaded.config
    sampler_cfg = resolve_sampler(job, loaded)
    if sampler_cfg.guidance.uses_cfg and not cfg.has_null_class:
        raise JobError(f"{cfg.name} has no null-class row (trained without label dropout): use --cfg-scale 1")
    labels, label_info = resolve_labels(job, cfg.num_classes)
    decode = cfg.pixel_space and not job.no_decode
    if not cfg.pixel_space and not job.no_decode:
        raise JobError(
            f"{cfg.name} samples VAE latents ({cfg.in_channels}x{cfg.input_size}x{cfg.input_size}); VAE decoding is not "
            "available in this version: pass --no-decode to write latents only"
        )
    device = resolve_device(job.device)
    run_key = {
        "checkpoint_sha256": loaded.sha256,
        "model": cfg.to_dict(),
        "sampler": sampler_cfg.to_dict(),
        "seed": job.seed,
        "n": job.n,
        "labels": label_info,
        "backend": job.backend,
        "decode": decode,
    }
    out = Path(job.out)
    prepare_output_folder(out, run_key, job.overwrite)

    backend = make_backend(job, loaded, device)
    runner = PlanRunner(backend, sampler_cfg)
    latents = np.empty((job.n, *cfg.latent_shape), dtype=np.float32)
    t0 = time.perf_counter()
    progress.start(job.n)
    for start in range(0, job.n, job.batch_size):
        idx = torch.arange(start, min(job.n, start + job.batch_size))
        x = runner.run(job.seed, idx, labels[idx], device=device)
        latents[idx.numpy()] = x.cpu().numpy()
        progress.advance(int(idx[-1]) + 1)
    wall = time.perf_counter() - t0
    progress.finish()

    outputs: dict[str, Any] = {}
    if decode:
        pixels = to_uint8(torch.from_numpy(latents), cfg.family)
        atomic_write_bytes(out / SAMPLES, npz_bytes(arr_0=pixels, labels=labels.numpy()))
        outputs["samples"] = SAMPLES
        outputs["pixel_conversion"] = PIXEL_CONVERSION[cfg.family]
        if job.png:
            png_dir = out / "png"
            png_dir.mkdir(exist_ok=True)
            for i, img in enumerate(pixels):
                atomic_write_bytes(png_dir / f"{i:06d}.png", png_bytes(img))
            outputs["png"] = "png/"
    if job.save_latents is not None or not decode:
        lat_path = Path(job.save_latents) if job.save_latents is not None else out / "latents.npy"
        lat_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(lat_path, npy_bytes(latents))
        outputs["latents"] = str(lat_path)
        outputs["labels"] = labels.tolist() if job.n <= 100_000 else "see samples.npz"

    manifest = {
        "igengine": {"version": igengine.__version__, "commit": igengine_commit()},
        "run_key": run_key,
        "checkpoint": {"path": str(ckpt_path), "sha256": loaded.sha256, "weights": loaded.weights,
                       "resolution_notes": loaded.notes},
        "model": cfg.to_dict(),
        "sampler": {**sampler_cfg.to_dict(), "nfe_per_sample": runner.plan.nfe,
                    "time_convention": "t=1 noise, t=0 data" if cfg.family == Family.SIT else "t=0 noise, t=1 data"},
        "seed": job.seed,
        "labels": label_info,
        "n": job.n,
        "precision": sampler_cfg.precision.value,
        "backend": backend.describe(),
        "batch_size": job.batch_size,
        "noise_contract": "igengine.noise: Philox4x32-10, key=(seed lo, hi), counter=(block, stream, index lo, hi)",
        "outputs": outputs,
        "complete": [[0, job.n]],
        "timing": {"wall_s": round(wall, 3), "samples_per_s": round(job.n / wall, 3) if wall > 0 else None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return RunResult(manifest, out, wall, job.n / wall if wall > 0 else float("inf"), loaded.notes)
