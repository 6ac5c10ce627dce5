"""Is the whole pipeline right? Score samples of the embedded digits model with a held-out classifier.

    python -m igengine.digits.evaluate            # writes benchmarks/results/digits_ig.json
    python -m igengine.digits.evaluate --settings default \
        --configs reference/torch,fp32/torch,bf16/torch,bf16/compiled   # benchmarks/results/digits_precision.json

A small MLP classifier is trained on the 600 held-out real digits (never seen by the generator).
For each sampler setting, 1,000 samples with balanced labels (100 per class) are drawn through the
same library path as `igengine sample` and scored by
  * accuracy: the fraction the classifier assigns to the class they were asked for;
  * FD: the Frechet distance between the classifier's hidden features (64 ReLU units) of the samples
    and of the generator's 1,197 real training digits (both through the same uint8 conversion).
The "real" row gives the classifier's accuracy on the 1,197 real training digits, and the FD between
two halves of those digits (598 vs 599 images: FD estimates are biased upwards by small sample
sizes, so this is a yardstick, not a floor). Each setting is run with several seeds (disjoint noise)
and reported as mean and standard deviation, so that differences can be told from sampling noise.

Precision and backend (``--configs PRECISION/BACKEND,...``): the same scores per numerical mode
(``igengine.precision``) and backend (eager torch, torch.compile), each at the same seeds, so the
noise of sample i is the same in every configuration (the noise contract) and differences are paired.
Every configuration is compared with the baseline (``--baseline``, fp32/torch) by the criterion
``PRECISION_CRITERION``, fixed before the first measurement:
  |mean(config) - mean(baseline)| <= 1 x the baseline's seed-to-seed standard deviation (ddof=1),
for the accuracy and for the FD, and, for the compiled backend, no recompilation after warm-up.
One standard deviation (not two) is the literal reading of "within the seed-to-seed spread": the
seeds are shared, so a precision that changes samples only by rounding moves each seed's score by
far less than the seeds differ from one another, and 1x is the stricter test of that. The per-seed
paired differences (same noise) are recorded next to it.
Without ``--configs`` the command and its output are those of the IG/CFG table (the default
precision of the device, reference on the CPU, eager torch backend).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igengine.digits.data import load_split, to_unit
from igengine.vae.pixels import to_uint8
from igengine.config import BackendName, Family, Precision

PRECISION_CRITERION = ("|mean(config) - mean(baseline)| <= 1 x std(baseline over seeds, ddof=1), for accuracy "
                       "and FD; compiled backend: 0 recompiles after warm-up")
BASELINE = "fp32/torch"
SETTINGS = ("all", "default")


@dataclass(frozen=True)
class RunConfig:
    """One numerical mode on one backend. precision None: the device's default (reference on the CPU)."""

    precision: Precision | None = None
    backend: BackendName = BackendName.TORCH

    @property
    def name(self) -> str:
        return f"{self.precision.value if self.precision else 'default'}/{BackendName(self.backend).value}"


def parse_configs(text: str) -> list[RunConfig]:
    """'reference/torch,bf16/compiled' -> [RunConfig, ...]; a precision alone means the torch backend."""
    configs = []
    for part in text.split(","):
        prec, _, backend = part.strip().partition("/")
        try:
            config = RunConfig(Precision(prec), BackendName(backend or "torch"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad config {part.strip()!r}: PRECISION/BACKEND with PRECISION one of "
                f"{', '.join(p.value for p in Precision)} and BACKEND one of torch, compiled") from None
        if config.backend.needs_graph:
            raise argparse.ArgumentTypeError(f"bad config {part.strip()!r}: only the torch and compiled backends are scored here")
        if config in configs:
            raise argparse.ArgumentTypeError(f"config {config.name} is given twice")
        configs.append(config)
    if not configs:
        raise argparse.ArgumentTypeError("--configs needs at least one PRECISION/BACKEND")
    return configs


@dataclass
class Classifier:
    w1: np.ndarray
    b1: np.ndarray
    model: object

    def features(self, x_unit: np.ndarray) -> np.ndarray:
        return np.maximum(0.0, (x_unit / 16.0) @ self.w1 + self.b1)

    def predict(self, x_unit: np.ndarray) -> np.ndarray:
        return self.model.predict(x_unit / 16.0)


def train_classifier(seed: int = 0) -> Classifier:
    from sklearn.neural_network import MLPClassifier

    split = load_split()
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=3000, random_state=seed)
    held = _through_pixels(split["held_x"])
    clf.fit(held / 16.0, split["held_y"])
    return Classifier(clf.coefs_[0], clf.intercepts_[0], clf)


def _through_pixels(x: np.ndarray) -> np.ndarray:
    """Real images through the same uint8 conversion the samples get."""
    return to_unit(to_uint8(torch.from_numpy(x), Family.SIT))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    # A small ridge keeps the product well-posed when some ReLU units never fire (singular covariances).
    ridge = 1e-6 * np.eye(a.shape[1])
    s1, s2 = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def sample_run(n: int, seed: int, ig_scale: float | None, cfg_scale: float | None, out: Path, batch_size: int = 250,
               ckpt: Path | None = None, config: RunConfig = RunConfig(),
               fresh: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Balanced samples through `igengine sample`'s library path: (pixels, labels, manifest).

    A folder holding a finished run of the same configuration is resumed, i.e. nothing is sampled
    again; ``fresh`` deletes ``out`` first, so that every sample (and the backend's warm-up and
    recompile count in the manifest) comes from this call.
    """
    import shutil

    from igengine.jobs.sample import SampleJob, run_sample

    if fresh and Path(out).exists():
        shutil.rmtree(out)
    job = SampleJob(out=out, n=n, batch_size=batch_size, seed=seed, labels="balanced", ig_scale=ig_scale,
                    cfg_scale=cfg_scale, overwrite=True, ckpt=ckpt, device="cpu", precision=config.precision,
                    backend=config.backend)
    result = run_sample(job)
    data = np.load(out / "samples.npz")
    return data["arr_0"], data["labels"], result.manifest


def sample_pixels(n: int, seed: int, ig_scale: float | None, cfg_scale: float | None, out: Path, batch_size: int = 250,
                  ckpt: Path | None = None, config: RunConfig = RunConfig()) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels, _ = sample_run(n, seed, ig_scale, cfg_scale, out, batch_size, ckpt, config)
    return pixels, labels


def score(clf: Classifier, pixels: np.ndarray, labels: np.ndarray, real_feats: np.ndarray, fd_digits: int = 3) -> dict:
    x = to_unit(pixels)
    acc = float((clf.predict(x) == labels).mean())
    return {"accuracy": round(acc, 4), "fd": round(frechet_distance(clf.features(x), real_feats), fd_digits)}


def _summary(per_seed: list[dict], fd_digits: int = 3) -> dict:
    """Mean and standard deviation over seeds (None with one seed) of the accuracy and the FD."""
    acc = np.array([r["accuracy"] for r in per_seed])
    fd = np.array([r["fd"] for r in per_seed])
    several = len(per_seed) > 1
    return {"accuracy": round(float(acc.mean()), 4), "accuracy_std": round(float(acc.std(ddof=1)), 4) if several else None,
            "fd": round(float(fd.mean()), fd_digits),
            "fd_std": round(float(fd.std(ddof=1)), fd_digits) if several else None}


def evaluate(n: int, seeds: list[int], out_dir: Path, ckpt: Path | None = None, configs: list[RunConfig] | None = None,
             settings: str = "all", baseline: str = BASELINE) -> dict:
    """Score each sampler setting (``settings``: all four IG/CFG combinations, or only the checkpoint's
    default) at each seed; with ``configs``, once per precision/backend and compared with ``baseline``."""
    from igengine.models.checkpoint import load_checkpoint
    from igengine.jobs.sample import DEFAULT_CHECKPOINT

    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {settings!r}")
    split = load_split()
    clf = train_classifier()
    real_train = _through_pixels(split["train_x"])
    real_feats = clf.features(real_train)
    half = len(real_feats) // 2
    defaults = load_checkpoint(ckpt or DEFAULT_CHECKPOINT).sampler_defaults or {}
    ig_default, cfg_default = defaults.get("ig_scale", 1.4), defaults.get("cfg_scale", 1.35)
    rows = [{
        "setting": "real digits (yardstick)",
        "accuracy": round(float((clf.predict(real_train) == split["train_y"]).mean()), 4),
        "fd": round(frechet_distance(real_feats[:half], real_feats[half:]), 3),
    }]
    grid = ((1.0, 1.0), (ig_default, 1.0), (1.0, cfg_default), (ig_default, cfg_default))
    if settings == "default":
        grid = grid[-1:]
    for config in configs or [None]:
        for ig, cfg in grid:
            t0 = time.perf_counter()
            per_seed = []
            for seed in seeds:
                if config is None:  # the IG/CFG table, exactly as it was first measured
                    pixels, labels = sample_pixels(n, seed, ig, cfg, out_dir / f"ig{ig}-cfg{cfg}-seed{seed}", ckpt=ckpt)
                    per_seed.append(score(clf, pixels, labels, real_feats))
                    continue
                work = out_dir / config.name.replace("/", "-") / f"ig{ig}-cfg{cfg}-seed{seed}"
                pixels, labels, manifest = sample_run(n, seed, ig, cfg, work, ckpt=ckpt, config=config, fresh=True)
                record = score(clf, pixels, labels, real_feats, fd_digits=5)
                be = manifest["backend"]
                record["step"] = be.get("step")
                if config.backend == BackendName.COMPILED:
                    record.update(recompiles=be["recompiles"], compiles=be["compiles"],
                                  warmup_s=round(be["warmup_seconds"], 1) if be.get("warmup_seconds") is not None else None)
                record["sampling_s"] = manifest["timing"]["wall_s"]
                record["computed"] = manifest["timing"]["computed_this_session"]
                per_seed.append(record)
            row = {"setting": f"IG {ig}, CFG {cfg}", "ig_scale": ig, "cfg_scale": cfg}
            if config is not None:
                row.update(config=config.name, precision=config.precision.value, backend=config.backend.value)
            row.update(_summary(per_seed, fd_digits=3 if config is None else 5))  # more digits for the paired comparison
            if config is not None and config.backend == BackendName.COMPILED:
                row["recompiles"] = sum(r["recompiles"] for r in per_seed)
            row.update(per_seed=per_seed, wall_s=round(time.perf_counter() - t0, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"n_per_seed": n, "seeds": seeds, "sampler_defaults": defaults, "rows": rows}
    if configs:
        result["criterion"] = PRECISION_CRITERION
        result["baseline"] = baseline
        result["comparisons"] = compare(rows, baseline)
    return result


def _paired(rows_a: dict, rows_b: dict, key: str) -> list[float]:
    return [a[key] - b[key] for a, b in zip(rows_a["per_seed"], rows_b["per_seed"])]


def compare(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Each configuration against ``baseline`` at the same setting, by ``PRECISION_CRITERION``."""
    out = []
    by_setting: dict[str, dict] = {r["setting"]: r for r in rows if r.get("config") == baseline}
    for r in rows:
        base = by_setting.get(r["setting"])
        if "config" not in r or base is None or r["config"] == baseline:
            continue
        entry = {"setting": r["setting"], "config": r["config"], "baseline": baseline}
        passes = True
        for key in ("accuracy", "fd"):
            values = np.array([s[key] for s in r["per_seed"]])
            ref = np.array([s[key] for s in base["per_seed"]])
            diff = float(values.mean() - ref.mean())
            std = float(ref.std(ddof=1)) if len(ref) > 1 else None
            paired = _paired(r, base, key)
            within = std is not None and abs(diff) <= std
            passes = passes and within
            entry[key] = {"mean": round(float(values.mean()), 5), "baseline_mean": round(float(ref.mean()), 5),
                          "mean_diff": round(diff, 5), "baseline_std": round(std, 5) if std is not None else None,
                          "abs_diff_over_std": round(abs(diff) / std, 3) if std else None,
                          "within_1_std": within, "paired_diff_per_seed": [round(d, 5) for d in paired],
                          "max_abs_paired_diff": round(max(abs(d) for d in paired), 5)}
        if "recompiles" in r:
            entry["recompiles"] = r["recompiles"]
            passes = passes and r["recompiles"] == 0
        entry["passes"] = passes
        out.append(entry)
    return out


def anchor_check(result: dict, table: Path) -> dict | None:
    """The reference/torch rows against the same settings of the IG/CFG table (``table``, digits_ig.json),
    at that table's rounding: the precision table is anchored to the README's numbers."""
    if not table.exists():
        return None
    old = {r["setting"]: r for r in json.loads(table.read_text())["rows"] if "per_seed" in r}
    checks = []
    for r in result["rows"]:
        if r.get("config") != "reference/torch" or r["setting"] not in old:
            continue
        mine = [{"accuracy": s["accuracy"], "fd": round(s["fd"], 3)} for s in r["per_seed"]]
        theirs = [{"accuracy": s["accuracy"], "fd": s["fd"]} for s in old[r["setting"]]["per_seed"]]
        checks.append({"setting": r["setting"], "table": table.name, "per_seed": mine, "table_per_seed": theirs,
                       "identical": mine == theirs})
    return {"rows": checks, "identical": all(c["identical"] for c in checks)} if checks else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = evaluate(args.n, args.seeds, args.work, args.ckpt, args.configs, args.settings, args.baseline)
    root = Path(__file__).resolve().parents[2]
    if args.configs:
        anchor = anchor_check(result, root / "benchmarks" / "results" / "digits_ig.json")
        if anchor is not None:
            result["anchor"] = anchor
    try:
        from benchmarks.provenance import provenance

        result["provenance"] = provenance()
    except ImportError:
        pass
    out = args.out or (root / "benchmarks" / "results" / ("digits_precision.json" if args.configs else "digits_ig.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result) if not args.configs else precision_table(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score the embedded digits model with IG on/off, CFG on/off, "
                                                 "and optionally per precision and backend")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ckpt", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("out/digits-eval"))
    parser.add_argument("--settings", choices=SETTINGS, default="all",
                        help="all: IG and CFG each on/off (four settings); default: the checkpoint's own (IG 1.4, CFG 1.35)")
    parser.add_argument("--configs", type=parse_configs, default=None, metavar="PRECISION/BACKEND,...",
                        help="score each precision/backend (e.g. reference/torch,fp32/torch,bf16/compiled) and compare "
                             f"each with --baseline; without it: the device's default precision, torch backend")
    parser.add_argument("--baseline", default=BASELINE, help=f"the config the others are compared with ({BASELINE})")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (default benchmarks/results/digits_ig.json, with --configs digits_precision.json)")
    args = parser.parse_args(argv)
    if args.configs and args.baseline not in [c.name for c in args.configs]:
        parser.error(f"--baseline {args.baseline} is not among --configs")
    return args


def markdown_table(result: dict) -> str:
    def pm(mean, std, digits):
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    lines = ["| setting | accuracy | FD (classifier features) |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {pm(r['accuracy'], r.get('accuracy_std'), 3)} | {pm(r['fd'], r.get('fd_std'), 3)} |")
    return "\n".join(lines)


def precision_table(result: dict) -> str:
    """Markdown: each config's mean ± std, and the paired difference from the baseline."""
    comp = {(c["setting"], c["config"]): c for c in result.get("comparisons", [])}
    lines = ["| setting | precision/backend | accuracy | FD (classifier features) | accuracy diff vs "
             f"{result.get('baseline', BASELINE)}, per seed | FD diff, per seed | within 1 std | recompiles |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "config" not in r:
            continue
        c = comp.get((r["setting"], r["config"]))
        acc = f"{r['accuracy']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if r.get("accuracy_std") is not None else "")
        fd = f"{r['fd']:.3f}" + (f" ± {r['fd_std']:.3f}" if r.get("fd_std") is not None else "")
        if c is None:
            pa = pf = within = "(baseline)" if r["config"] == result.get("baseline") else ""
        else:
            pa = ", ".join(f"{d:+.3f}" for d in c["accuracy"]["paired_diff_per_seed"])
            pf = ", ".join(f"{d:+.4f}" for d in c["fd"]["paired_diff_per_seed"])
            within = f"acc {'yes' if c['accuracy']['within_1_std'] else 'NO'}, FD {'yes' if c['fd']['within_1_std'] else 'NO'}"
        lines.append(f"| {r['setting']} | {r['config']} | {acc} | {fd} | {pa} | {pf} | {within} | {r.get('recompiles', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
