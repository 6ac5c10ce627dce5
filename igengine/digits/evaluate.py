"""Is the whole pipeline right? Score samples of the embedded digits model with a held-out classifier.

    python -m igengine.digits.evaluate            # writes benchmarks/results/digits_ig.json

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
from igengine.config import Family


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


def sample_pixels(n: int, seed: int, ig_scale: float, cfg_scale: float, out: Path, batch_size: int = 250,
                  ckpt: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    from igengine.jobs.sample import SampleJob, run_sample

    job = SampleJob(out=out, n=n, batch_size=batch_size, seed=seed, labels="balanced", ig_scale=ig_scale,
                    cfg_scale=cfg_scale, overwrite=True, ckpt=ckpt, device="cpu")
    run_sample(job)
    data = np.load(out / "samples.npz")
    return data["arr_0"], data["labels"]


def score(clf: Classifier, pixels: np.ndarray, labels: np.ndarray, real_feats: np.ndarray) -> dict:
    x = to_unit(pixels)
    acc = float((clf.predict(x) == labels).mean())
    return {"accuracy": round(acc, 4), "fd": round(frechet_distance(clf.features(x), real_feats), 3)}


def evaluate(n: int, seeds: list[int], out_dir: Path, ckpt: Path | None = None) -> dict:
    from igengine.models.checkpoint import load_checkpoint
    from igengine.jobs.sample import DEFAULT_CHECKPOINT

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
    for ig, cfg in ((1.0, 1.0), (ig_default, 1.0), (1.0, cfg_default), (ig_default, cfg_default)):
        t0 = time.perf_counter()
        per_seed = []
        for seed in seeds:
            pixels, labels = sample_pixels(n, seed, ig, cfg, out_dir / f"ig{ig}-cfg{cfg}-seed{seed}", ckpt=ckpt)
            per_seed.append(score(clf, pixels, labels, real_feats))
        acc = np.array([r["accuracy"] for r in per_seed])
        fd = np.array([r["fd"] for r in per_seed])
        row = {"setting": f"IG {ig}, CFG {cfg}", "ig_scale": ig, "cfg_scale": cfg,
               "accuracy": round(float(acc.mean()), 4), "accuracy_std": round(float(acc.std(ddof=1)), 4) if len(seeds) > 1 else None,
               "fd": round(float(fd.mean()), 3), "fd_std": round(float(fd.std(ddof=1)), 3) if len(seeds) > 1 else None,
               "per_seed": per_seed, "wall_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"n_per_seed": n, "seeds": seeds, "sampler_defaults": defaults, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description="Score the embedded digits model with IG on/off, CFG on/off")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ckpt", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("out/digits-eval"))
    root = Path(__file__).resolve().parents[2]
    parser.add_argument("--out", type=Path, default=root / "benchmarks" / "results" / "digits_ig.json")
    args = parser.parse_args()
    result = evaluate(args.n, args.seeds, args.work, args.ckpt)
    try:
        from benchmarks.provenance import provenance

        result["provenance"] = provenance()
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    def pm(mean, std, digits):
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    lines = ["| setting | accuracy | FD (classifier features) |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {pm(r['accuracy'], r.get('accuracy_std'), 3)} | {pm(r['fd'], r.get('fd_std'), 3)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
