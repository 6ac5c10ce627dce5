"""`igengine sweep`: grid expansion, points equal to plain `igengine sample` runs, resume, paired error bars, bad input.

Sampling uses the embedded digits model with a few steps and a handful of samples (seconds on 2 CPU
cores); evaluation uses the stand-in feature network of the metrics tests (the real Inception costs
minutes on the CPU and is not what these tests pin).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from igengine.cli import main
from igengine.errors import Interrupted, JobError
from igengine.jobs.sample import SampleJob, run_sample
from igengine.jobs.sweep import (POINTS_DIR, SWEEP_CSV, SWEEP_FILE, SweepJob, SweepPoint, expand_grid, load_points,
                                 point_name, run_sweep, split_list, table_rows)
from igengine.metrics.bootstrap import FixedReferenceFID, paired_bootstrap
from igengine.metrics.fid import frechet_distance
from tests.metrics_fixtures import stand_in

COMMON = dict(n=6, batch_size=3, seed=5, labels="balanced", steps=3, chunk_size=3, precision=None, threads=1,
              preflight="off", grid=False)


def _base(out: Path, **kw) -> SampleJob:
    return SampleJob(out=out, **{**COMMON, **kw})


# ----------------------------------------------------------------------------------------------
# Grid expansion and point files
# ----------------------------------------------------------------------------------------------


def test_grid_is_the_product_with_the_first_axis_slowest_and_readable_names():
    pts = expand_grid({"ig_scale": split_list("1,1.4", "ig_scale"),
                       "cfg_interval": split_list("0,0.7;0,1", "cfg_interval"), "steps": ["3"]})
    assert [p.settings for p in pts] == [
        {"ig_scale": 1.0, "cfg_interval": [0.0, 0.7], "steps": 3},
        {"ig_scale": 1.0, "cfg_interval": [0.0, 1.0], "steps": 3},
        {"ig_scale": 1.4, "cfg_interval": [0.0, 0.7], "steps": 3},
        {"ig_scale": 1.4, "cfg_interval": [0.0, 1.0], "steps": 3},
    ]
    assert [p.name for p in pts] == ["steps3_ig1_cfgi0-0.7", "steps3_ig1_cfgi0-1", "steps3_ig1.4_cfgi0-0.7",
                                     "steps3_ig1.4_cfgi0-1"]
    assert len({p.name for p in pts}) == 4


def test_no_axes_give_one_point_of_the_checkpoint_defaults():
    assert expand_grid({}) == [SweepPoint("defaults", {})]


@pytest.mark.parametrize("axes, fragment", [
    ({"ig_scale": []}, "empty list"),
    ({"ig_scale": ["1.4", "1.40"]}, "twice"),
    ({"guidance": ["1"]}, "cannot be swept"),
    ({"solver": ["rk4"]}, "not valid"),
    ({"steps": ["2.5"]}, "not valid"),
    ({"cfg_interval": ["0.7"]}, "cfg_interval"),
])
def test_bad_grids_are_refused(axes, fragment):
    with pytest.raises(JobError, match=fragment):
        expand_grid(axes)


def test_split_list_refuses_an_empty_value():
    with pytest.raises(JobError, match="empty value"):
        split_list("1,,1.4", "ig_scale")


def test_points_file_names_and_settings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"name": "ig-only", "ig_scale": 1.7, "cfg_scale": 1}, {"cfg_scale": 1.35}]))
    pts = load_points(f)
    assert pts == [SweepPoint("ig-only", {"cfg_scale": 1.0, "ig_scale": 1.7}), SweepPoint("cfg1.35", {"cfg_scale": 1.35})]


@pytest.mark.parametrize("content, fragment", [
    ("[]", "non-empty"),
    ('[{"ig_scale": 1.4}, {"ig_scale": 1.4}]', "two points are named|same settings"),
    ('[{"name": "a", "ig_scale": 1.4}, {"name": "b", "ig_scale": 1.4}]', "same settings"),
    ('[{"name": "../x", "ig_scale": 1.4}]', "folder name"),
    ('[{"guidance": 2}]', "unknown setting"),
    ("{not json", "not readable JSON"),
])
def test_bad_points_files_are_refused(tmp_path, content, fragment):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(JobError, match=fragment):
        load_points(f)


# ----------------------------------------------------------------------------------------------
# Points are plain `igengine sample` runs; resume
# ----------------------------------------------------------------------------------------------


def test_a_point_equals_a_plain_sample_run_byte_for_byte(tmp_path):
    pts = expand_grid({"ig_scale": ["1", "1.6"]})
    run_sweep(SweepJob(base=_base(tmp_path / "sw"), points=tuple(pts)))
    plain = run_sample(_base(tmp_path / "plain", ig_scale=1.6))
    swept = tmp_path / "sw" / POINTS_DIR / point_name({"ig_scale": 1.6}) / "samples.npz"
    assert swept.read_bytes() == (plain.out / "samples.npz").read_bytes()
    other = tmp_path / "sw" / POINTS_DIR / point_name({"ig_scale": 1.0}) / "samples.npz"
    with np.load(other) as a, np.load(swept) as b:
        assert (a["labels"] == b["labels"]).all()  # shared labels
        assert not (a["arr_0"] == b["arr_0"]).all()  # and the guidance did change the pixels
    record = json.loads((tmp_path / "sw" / SWEEP_FILE).read_text())
    assert record["status"] == "complete" and [p["status"] for p in record["points"]] == ["done", "done"]
    assert all(p["nfe_per_sample"] > 0 for p in record["points"])


def test_a_sweep_interrupted_inside_a_point_resumes_from_its_chunks(tmp_path, monkeypatch):
    from igengine.store.chunks import ChunkStore

    pts = tuple(expand_grid({"ig_scale": ["1", "1.6"]}))
    job = SweepJob(base=_base(tmp_path / "sw"), points=pts)
    real_write = ChunkStore.write
    writes = []

    def write_then_stop(self, chunk, *args):  # point 1 completes (2 chunks); point 2 stops after its first chunk
        writes.append(chunk)
        real_write(self, chunk, *args)
        if len(writes) == 3:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(ChunkStore, "write", write_then_stop)
    with pytest.raises(Interrupted):
        run_sweep(job)
    monkeypatch.setattr(ChunkStore, "write", real_write)
    first = tmp_path / "sw" / POINTS_DIR / pts[0].name / "samples.npz"
    before = first.stat().st_mtime_ns
    assert json.loads((tmp_path / "sw" / SWEEP_FILE).read_text())["status"] == "interrupted"

    computed = []
    real_run = run_sample

    def counting_run(pjob, progress=None):
        result = real_run(pjob, progress)
        computed.append((Path(pjob.out).name, result.computed, result.reused))
        return result

    monkeypatch.setattr("igengine.jobs.sweep.run_sample", counting_run)
    record = run_sweep(job)
    assert record["status"] == "complete"
    assert first.stat().st_mtime_ns == before  # the finished point was not redone
    assert computed == [(pts[1].name, 3, 3)]  # the second point: its first chunk kept, the other computed
    plain = real_run(_base(tmp_path / "plain", ig_scale=1.6))
    assert (tmp_path / "sw" / POINTS_DIR / pts[1].name / "samples.npz").read_bytes() == \
        (plain.out / "samples.npz").read_bytes()


def test_a_point_that_fails_at_run_time_is_reported_and_the_others_run(tmp_path, monkeypatch):
    pts = tuple(expand_grid({"ig_scale": ["1", "1.6"]}))
    real_run = run_sample

    def failing(pjob, progress=None):
        if Path(pjob.out).name == pts[0].name:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return real_run(pjob, progress)

    monkeypatch.setattr("igengine.jobs.sweep.run_sample", failing)
    record = run_sweep(SweepJob(base=_base(tmp_path / "sw"), points=pts))
    assert [p["status"] for p in record["points"]] == ["failed", "done"]
    assert record["points"][0]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert record["status"] == "partial"
    assert "failed" in table_rows(record)[0]
    assert (tmp_path / "sw" / SWEEP_CSV).read_text().count("\n") == 3


# ----------------------------------------------------------------------------------------------
# Evaluation and the results
# ----------------------------------------------------------------------------------------------


def test_points_are_evaluated_against_a_reference_with_paired_error_bars(tmp_path):
    from igengine.digits.data import write_reference_npz

    ref = tmp_path / "ref.npz"
    write_reference_npz(ref)
    pts = tuple(expand_grid({"ig_scale": ["1", "2.5"]}))
    record = run_sweep(SweepJob(base=_base(tmp_path / "sw", n=12, batch_size=6, chunk_size=6), points=pts, ref=ref,
                                resamples=5), network=stand_in())
    assert (tmp_path / "sw" / "reference_stats.npz").is_file()  # the reference's features: computed once
    for p in record["points"]:
        folder = tmp_path / "sw" / POINTS_DIR / p["name"]
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert p["metrics"]["fid"] == metrics["fid"]
        assert (folder / "features.npz").is_file()
        assert p["fid_se"] > 0
    best = min(record["points"], key=lambda p: p["metrics"]["fid"])
    assert record["best"] == best["name"] and best["diff_from_best"] == 0
    other = next(p for p in record["points"] if p is not best)
    assert other["diff_from_best"] > 0 and other["diff_se"] > 0
    assert other["within_noise"] == (other["diff_from_best"] < 2 * other["diff_se"])
    assert record["bootstrap"]["resamples"] == 5
    header = (tmp_path / "sw" / SWEEP_CSV).read_text().splitlines()[0].split(",")
    assert {"name", "ig_scale", "fid", "fid_se", "diff_se", "samples_per_s", "nfe_per_sample"} <= set(header)
    assert table_rows(record)[[p["name"] for p in record["points"]].index(best["name"])][0] == "*"


# ----------------------------------------------------------------------------------------------
# Paired bootstrap on Gaussian features (FID known in closed form)
# ----------------------------------------------------------------------------------------------


def _gaussian_case(d=6, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    sigma = a @ a.T / d + 0.5 * np.eye(d)
    return rng.normal(size=d), sigma, np.linalg.cholesky(sigma)


def test_fixed_reference_fid_equals_the_frechet_distance():
    mu, sigma, _ = _gaussian_case()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)) * 1.3 + 0.2
    fd = FixedReferenceFID(mu, sigma)
    expect = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
    assert fd.of_features(x) == pytest.approx(expect, rel=1e-10, abs=1e-12)


def test_paired_bootstrap_standard_errors_match_the_spread_over_independent_draws():
    """Features of two 'points' share their noise z (x_p = mu_p + L z): the bootstrap SE of each FID and of
    their difference must match the standard deviation over many independent draws (Monte Carlo), the
    FIDs must centre on the closed-form Frechet distance, and the paired SE of the difference must be far
    below the unpaired sqrt(SE_a^2 + SE_b^2)."""
    mu_r, sigma_r, chol = _gaussian_case()
    shift_a, shift_b = np.full(6, 0.30), np.full(6, 0.36)
    n = 400
    truth_a = frechet_distance(mu_r + shift_a, sigma_r, mu_r, sigma_r)  # = |shift_a|^2 (same covariance)
    assert truth_a == pytest.approx(6 * 0.30 ** 2)
    fids, diffs, ses, dses = [], [], [], []
    rng = np.random.default_rng(2)
    for rep in range(60):
        z = rng.normal(size=(n, 6)) @ chol.T
        feats = [mu_r + shift_a + z, mu_r + shift_b + z]
        fd = FixedReferenceFID(mu_r, sigma_r)
        full = [fd.of_features(f) for f in feats]
        fids.append(full[0])
        diffs.append(full[1] - full[0])
        if rep < 8:  # the bootstrap is the expensive part
            pe = paired_bootstrap(feats, mu_r, sigma_r, resamples=40, seed=rep)
            assert pe.best == 0 and pe.fid == pytest.approx(full)
            ses.append(pe.se[0])
            dses.append(pe.diff_se[1])
    sd_fid, sd_diff = np.std(fids, ddof=1), np.std(diffs, ddof=1)
    assert abs(np.mean(fids) - truth_a) < 4 * sd_fid / np.sqrt(len(fids)) + 0.05 * truth_a  # centred (small n bias)
    assert 0.6 < np.mean(ses) / sd_fid < 1.5
    assert 0.6 < np.mean(dses) / sd_diff < 1.5
    assert np.mean(dses) < 0.5 * np.sqrt(2) * np.mean(ses)  # pairing removes most of the shared noise


def test_within_noise_marks_small_differences():
    mu_r, sigma_r, chol = _gaussian_case()
    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 6)) @ chol.T
    jitter = 0.3 * rng.normal(size=(300, 6)) @ chol.T  # the same distribution: any difference is noise
    feats = [mu_r + 0.3 + z, mu_r + 0.3 + (z + jitter) / np.sqrt(1 + 0.3 ** 2), mu_r + 1.0 + z]
    pe = paired_bootstrap(feats, mu_r, sigma_r, resamples=20)
    assert pe.best in (0, 1)
    assert pe.within_noise(0) and pe.within_noise(1) and not pe.within_noise(2)
    assert pe.diff[2] > 10 * pe.diff_se[2]


# ----------------------------------------------------------------------------------------------
# The command line: bad input is one line and exit 2
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--ig-scale", ""], "empty value"),
    (["--ig-scale", "1,1"], "twice"),
    (["--solver", "heun2"], "point 'heun2'"),  # a LightningDiT solver for the SiT digits model
    (["--ig-scale", "1", "--points", "p.json"], "not both"),
    (["--ref", "missing.npz"], "not found"),
    (["--ref", "ref16.npz"], "16x16"),  # the digits model makes 8x8 images
    (["--timestep-shift", "0.3"], "LightningDiT and RAEv2 models only"),  # a setting the SiT family does not have
    (["--resamples", "1"], "resamples"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text('[{"ig_scale": 1.4}]')
    np.savez(tmp_path / "ref16.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    code = main(["sweep", "--out", str(tmp_path / "sw"), "--n", "2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and fragment in err and err.startswith("igengine: error:")
    assert not (tmp_path / "sw").exists()  # nothing written


def test_cli_refuses_an_out_holding_a_different_sweep(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--out", str(out), "--n", "3", "--steps", "2", "--ig-scale", "1,1.5", "--threads", "1"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    code = main(["sweep", "--out", str(out), "--n", "3", "--steps", "2", "--ig-scale", "1,1.6", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "different sweep" in err and "points" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_sweep_help_shows_a_runnable_example_without_importing_torch():
    import subprocess
    import sys

    code = ("import json, sys\nfrom igengine.cli import main\nrc = main(['sweep', '--help'])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    *text, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"rc": 0, "torch": False}, proc.stderr
    assert "igengine sweep --ig-scale 1,1.4,1.8" in "\n".join(text)


def test_without_matplotlib_the_plot_is_one_line_and_no_file(tmp_path, monkeypatch):
    import importlib.util

    from igengine.jobs.sweep import write_plot

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    record = {"points": [{"name": "ig1", "settings": {"ig_scale": 1.0}, "status": "done", "metrics": {"fid": 3.0}}]}
    line = write_plot(record, tmp_path / "sweep.png")
    assert "matplotlib is not installed" in line and "\n" not in line
    assert not (tmp_path / "sweep.png").exists()


def test_the_plot_draws_fid_against_the_swept_scale(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed here")
    from igengine.jobs.sweep import write_plot

    record = {"points": [{"name": f"ig{s}_cfg{c}", "settings": {"ig_scale": s, "cfg_scale": c}, "status": "done",
                          "metrics": {"fid": 10 - s + c}, "fid_se": 0.1} for s in (1.0, 1.4) for c in (1.0, 1.35)]}
    assert write_plot(record, tmp_path / "sweep.png").startswith("wrote")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_under_torchrun_gives_the_points_of_a_one_process_sweep(tmp_path):
    """Two torchrun workers (OMP_NUM_THREADS=1) against one process with one thread: every point's pixels
    and labels are equal, and only rank 0 reports."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["sweep", "--num-samples", "6", "--batch-size", "3", "--chunk-size", "3", "--steps", "3", "--labels", "balanced",
            "--ig-scale", "1,1.6", "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "igengine", *args, "--threads", "1", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "igengine", *args, "--out", str(tmp_path / "tr")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["status"] == "complete"
    for name in ("steps3_ig1", "steps3_ig1.6"):
        with np.load(tmp_path / "one" / POINTS_DIR / name / "samples.npz") as a, \
                np.load(tmp_path / "tr" / POINTS_DIR / name / "samples.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
        manifest = json.loads((tmp_path / "tr" / POINTS_DIR / name / "manifest.json").read_text())
        assert manifest["world_size"] == 2


def test_a_missing_fid_network_is_refused_before_any_point_is_sampled(tmp_path, monkeypatch):
    from igengine.digits.data import write_reference_npz

    ref = tmp_path / "ref.npz"
    write_reference_npz(ref)
    monkeypatch.setattr("igengine.metrics.inception.packaged_weights", lambda: None)
    with pytest.raises(JobError, match="not installed"):
        run_sweep(SweepJob(base=_base(tmp_path / "sw"), points=tuple(expand_grid({"ig_scale": ["1"]})), ref=ref))
    assert not (tmp_path / "sw").exists()
