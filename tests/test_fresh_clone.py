"""What a new user met on a fresh clone (issue 19, items 4, 6, 8 and 10): choices that ran without a word,
messages that named the wrong problem, commands that needed a checkpoint `sample` does without.

Each test failed before its fix: a warning that was missing, a refusal that blamed a file or a setting
nobody gave, `--overwrite` ignoring the folder's chunk size, `export`/`bench` insisting on `--ckpt`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import igengine
from igengine.cli import main
from igengine.errors import JobError
from igengine.jobs.sample import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stderr_lines(err: str, start: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(start)]


# ----------------------------------------------------------------------------------------------
# Item 6: messages that say what is wrong
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, expect", [
    ("-1", "--labels -1: class ids are whole numbers >= 0"),
    ("0-9,,", "--labels '0-9,,' has an empty entry (two commas in a row, or one at an end)"),
    (",3", "has an empty entry"),
    ("4-", "--labels range 4- has no end"),
    ("+3", "--labels +3: write class ids without a sign (3)"),
    ("1 2", "--labels '1 2': separate class ids with commas (1,2)"),
    ("1-2-3", "--labels entry '1-2-3' is neither a class id nor a range"),
    ("", "--labels is empty"),
])
def test_a_malformed_class_list_is_named_as_one_not_as_a_missing_file(labels, expect, tmp_path, capsys):
    code, out, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--labels", labels, "--out", tmp_path / "o")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("igengine: error: ") and expect in lines[0], lines[0]
    assert "file not found" not in lines[0]
    assert not (tmp_path / "o").exists()


def test_a_file_whose_name_looks_like_a_bad_class_list_is_still_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-1").write_text("3 1")
    code, _, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--labels", "-1", "--out", tmp_path / "o")
    assert code == 0, err
    assert np.load(tmp_path / "o" / "samples.npz")["labels"].tolist() == [3, 1]


def test_an_unknown_label_mode_in_python_is_named_before_indices_are_asked_for():
    pipe = igengine.load(steps=2)
    for call in (lambda: pipe.images("foo"), lambda: pipe.sample("foo"), lambda: pipe.images("foo", indices=[0])):
        with pytest.raises(JobError) as e:
            call()
        assert str(e.value).startswith("`labels` 'foo' is not a label mode: use 'random', 'balanced'")
    with pytest.raises(JobError, match="`indices` is needed with `labels` 'random'"):  # a real mode still needs them
        pipe.images("random")


def test_a_refusal_names_only_given_settings_and_overwrite_keeps_the_folders_chunk_size(tmp_path, capsys):
    """README: 'The default chunk size is that of the run already in OUT, else 256'. A refusal used to add
    'chunk_size: 100 in the folder, 256 asked' without --chunk-size, and --overwrite then used 256."""
    out = tmp_path / "run"
    assert cli(capsys, "sample", "--n", 3, "--steps", 2, "--chunk-size", 2, "--out", out)[0] == 0
    code, stdout, err = cli(capsys, "sample", "--n", 3, "--steps", 3, "--out", out)
    assert code == 1 and stdout == ""
    assert err.splitlines() == [f"igengine: error: {out} holds the manifest of a different run (sampler.steps: 2 in "
                                "the folder, 3 asked); choose another --out or pass --overwrite"]
    # An explicit chunk size is a setting the user gave: it is named.
    code, _, err = cli(capsys, "sample", "--n", 3, "--steps", 3, "--chunk-size", 5, "--out", out)
    assert code == 1 and "chunk_size: 2 in the folder, 5 asked" in err
    code, _, err = cli(capsys, "sample", "--n", 3, "--steps", 3, "--overwrite", "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bulk"]["chunk_size"] == 2 and manifest["run_key"]["chunk_size"] == 2
    assert manifest["sampler"]["steps"] == 3
    assert "chunk size 2, that of the run already in" in err


# ----------------------------------------------------------------------------------------------
# Item 4: slow or meaningless choices are said, once, on stderr
# ----------------------------------------------------------------------------------------------


def test_tf32_on_the_cpu_warns_and_is_byte_identical_to_fp32(tmp_path, capsys):
    code, _, err = cli(capsys, "sample", "--n", 3, "--steps", 3, "--precision", "tf32", "--out", tmp_path / "tf32")
    assert code == 0, err
    warned = stderr_lines(err, "igengine: warning:")
    assert len(warned) == 1 and "--precision tf32 on the CPU computes exactly what fp32 computes" in warned[0]
    assert "use --precision fp32 here" in warned[0]
    manifest = json.loads((tmp_path / "tf32" / "manifest.json").read_text())
    assert manifest["precision"] == "tf32" and len(manifest["warnings"]) == 1
    code, _, err = cli(capsys, "sample", "--n", 3, "--steps", 3, "--precision", "fp32", "--out", tmp_path / "fp32")
    assert code == 0 and not stderr_lines(err, "igengine: warning:"), err
    a, b = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("tf32", "fp32"))
    assert a.tobytes() == b.tobytes()  # what the warning says


@pytest.mark.parametrize("native_bf16, instead", [(True, "use --precision bf16 (oneDNN runs bf16 on this CPU) or fp32"),
                                                  (False, "use --precision fp32")])
def test_fp16_on_a_cpu_without_fp16_units_warns_and_names_the_precision_to_use(native_bf16, instead, tmp_path, capsys,
                                                                                monkeypatch):
    from igengine.jobs import advice

    monkeypatch.setattr(advice, "cpu_native_low_precision", lambda dtype: False)
    monkeypatch.setattr(advice, "linear_route", lambda dtype: "onednn" if native_bf16 else "fp32-gemm")
    code, _, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--precision", "fp16", "--out", tmp_path / "o")
    assert code == 0, err
    warned = stderr_lines(err, "igengine: warning:")
    assert len(warned) == 1 and "--precision fp16 is slow on this CPU: it has no fp16 matmul units" in warned[0]
    assert warned[0].endswith(instead), warned[0]
    assert advice.precision_warnings("fp16", "cpu", "compiled") != []  # torch's kernels too
    assert advice.precision_warnings("fp16", "cpu", "onnxruntime") == []  # ONNX Runtime's own: not measured, not said


def test_fp16_on_a_cpu_with_fp16_units_and_the_default_precision_run_without_a_warning(tmp_path, capsys, monkeypatch):
    from igengine.jobs import advice

    monkeypatch.setattr(advice, "cpu_native_low_precision", lambda dtype: dtype == torch.float16)
    assert advice.precision_warnings("fp16", "cpu") == []
    assert advice.precision_warnings("tf32", "cuda") == [] and advice.precision_warnings("fp16", "cuda") == []
    code, _, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--out", tmp_path / "o")
    assert code == 0 and not stderr_lines(err, "igengine: warning:"), err
    assert "warnings" not in json.loads((tmp_path / "o" / "manifest.json").read_text())


def test_the_real_fp16_check_of_this_cpu_decides_the_warning():
    from igengine.backends.cpu_linear import cpu_native_low_precision
    from igengine.jobs import advice

    warned = advice.precision_warnings("fp16", "cpu")
    assert (warned == []) == cpu_native_low_precision(torch.float16)


def test_python_load_warns_as_the_command_does():
    with pytest.warns(RuntimeWarning, match="`precision` tf32 on the CPU computes exactly what fp32 computes"):
        igengine.load(precision="tf32", steps=2)


def test_more_threads_than_usable_cores_warn(tmp_path, capsys, monkeypatch):
    from igengine.jobs import threads as threads_mod

    monkeypatch.setattr(threads_mod, "usable_cpus", lambda: 1)  # whatever this machine has: 2 threads on 1 core
    code, _, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--threads", 2, "--out", tmp_path / "o")
    assert code == 0, err
    warned = stderr_lines(err, "igengine: warning:")
    assert len(warned) == 1, err
    assert warned[0].startswith("igengine: warning: --threads 2 is more than the 1 CPU core(s) this process may use")
    assert "give --threads 1 or fewer, or leave it out" in warned[0]
    code, _, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--threads", 1, "--out", tmp_path / "p")
    assert code == 0 and not stderr_lines(err, "igengine: warning:"), err


def test_oversubscription_names_its_source_and_spares_the_automatic_choice():
    from igengine.jobs.threads import ThreadChoice, oversubscription

    assert oversubscription(ThreadChoice(100, "threads", "100 asked for"), cpus=2).startswith(
        "`threads` 100 is more than the 2 CPU core(s)")
    env = oversubscription(ThreadChoice(8, "OMP_NUM_THREADS", "OMP_NUM_THREADS=8"), cpus=4)
    assert env.startswith("OMP_NUM_THREADS=8 is more than the 4 CPU core(s)") and "set OMP_NUM_THREADS to 4" in env
    assert oversubscription(ThreadChoice(2, "threads", "2 asked for"), cpus=2) is None
    assert oversubscription(ThreadChoice(64, "auto", "64 core(s) usable"), cpus=2) is None


# ----------------------------------------------------------------------------------------------
# Item 8: export and bench without --ckpt take the embedded model, as sample does
# ----------------------------------------------------------------------------------------------


def test_bench_without_ckpt_times_the_embedded_model(tmp_path, capsys):
    report = tmp_path / "b.json"
    code, out, err = cli(capsys, "bench", "--precision", "reference", "--batch-size", 1, "--steps", 1, "--repeats", 1,
                         "--warmup", 0, "--no-anchor", "--device", "cpu", "--json", report)
    assert code == 0, err
    workload = json.loads(report.read_text())["workload"]
    assert workload["model"] == "SiT-digits" and workload["checkpoint"] == str(DEFAULT_CHECKPOINT)


def test_export_without_ckpt_exports_the_embedded_model(tmp_path, capsys):
    pytest.importorskip("onnx", reason="needs the onnx extra (pip install -e '.[onnx]')")
    pytest.importorskip("onnxscript", reason="needs the onnx extra (the dynamo exporter's onnxscript)")
    from igengine.models.checkpoint import load_checkpoint

    code, out, err = cli(capsys, "export", "--out", tmp_path / "e")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "SiT-digits"
    record = json.loads((tmp_path / "e" / "export.json").read_text())
    assert load_checkpoint(DEFAULT_CHECKPOINT).sha256 in json.dumps(record)


# ----------------------------------------------------------------------------------------------
# Item 4: FID of fewer images than features
# ----------------------------------------------------------------------------------------------


def _evaluate_sets(tmp_path, n_samples: int, n_ref: int, log: list[str]):
    from igengine.jobs.evaluate import EvaluateJob, EvaluateProgress, run_evaluate
    from tests.metrics_fixtures import random_images, save_npz, stand_in

    s = save_npz(tmp_path / f"s{n_samples}.npz", arr_0=random_images(1, n_samples, size=8))
    r = save_npz(tmp_path / f"r{n_ref}.npz", arr_0=random_images(2, n_ref, size=8, low=20))
    job = EvaluateJob(samples=s, ref=r, device="cpu", kid_subsets=2)
    return run_evaluate(job, EvaluateProgress(log=log.append), network=stand_in(pool_dim=40, spatial_dim=24))


def test_fid_of_fewer_images_than_features_is_noted_and_warned(tmp_path):
    """The stand-in network has 40 pool features: 40 samples give a covariance of rank <= 39 (rank-deficient)."""
    log: list[str] = []
    record = _evaluate_sets(tmp_path, 40, 41, log)
    want = "FID of SAMPLES from 40 images: their covariance has rank at most 39, below the 40 features"
    assert [n for n in record["notes"] if n.startswith("FID of")] == [n for n in record["notes"] if want in n]
    assert any(want in n and "biased upward" in n for n in record["notes"])
    assert [line for line in log if line.startswith("warning: ")] == [f"warning: {n}" for n in record["notes"]
                                                                      if n.startswith("FID of")]
    assert any(want in n for n in json.loads((tmp_path / "s40.metrics.json").read_text())["notes"])
    # The reference computed from its own images counts the same way; enough images on both sides: no note.
    both = _evaluate_sets(tmp_path, 12, 30, [])
    assert [n.split(":")[0] for n in both["notes"] if n.startswith("FID of")] == ["FID of SAMPLES from 12 images",
                                                                                 "FID of REF from 30 images"]
    enough: list[str] = []
    assert not any(n.startswith("FID of") for n in _evaluate_sets(tmp_path, 41, 41, enough)["notes"])
    assert not any(line.startswith("warning: ") for line in enough)


def test_cli_evaluate_warns_on_stderr_about_a_rank_deficient_fid(tmp_path, capsys, monkeypatch):
    from igengine.jobs import evaluate as evaluate_mod
    from tests.metrics_fixtures import random_images, save_npz, stand_in

    monkeypatch.setattr(evaluate_mod, "_network", lambda job, device: stand_in(pool_dim=40, spatial_dim=24))
    s = save_npz(tmp_path / "samples.npz", arr_0=random_images(1, 20, size=8))
    r = save_npz(tmp_path / "ref.npz", arr_0=random_images(2, 50, size=8, low=20))
    code, out, err = cli(capsys, "evaluate", s, "--ref", r, "--kid-subsets", 2)
    assert code == 0, err
    warned = stderr_lines(err, "igengine: warning:")
    assert len(warned) == 1 and warned[0].startswith("igengine: warning: FID of SAMPLES from 20 images: their "
                                                     "covariance has rank at most 19, below the 40 features"), err
    assert any(n.startswith("FID of SAMPLES from 20 images") for n in json.loads(out)["notes"])


# ----------------------------------------------------------------------------------------------
# Item 10: `igengine info` says whether this CPU has bf16 (and fp16) in hardware
# ----------------------------------------------------------------------------------------------

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 avx512_vnni\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c\n"
X86_SPR = "flags\t\t: avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
ARM_N1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid\n"
ARM_V1 = "Features\t: fp asimd fphp asimdhp sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, bf16, fp16", [(X86_BF16, True, False), (X86_AVX2, False, False),
                                                 (X86_SPR, True, True), (ARM_N1, False, True), (ARM_V1, True, True)])
def test_native_low_precision_reads_the_cpus_flags(cpuinfo, bf16, fp16):
    from igengine.backends.cpu_linear import native_low_precision

    assert native_low_precision(cpuinfo) == {"native_bf16": bf16, "native_fp16": fp16}


def test_info_shows_native_bf16_and_fp16_as_plain_booleans(capsys):
    from igengine.backends.cpu_linear import native_low_precision

    code, out, err = cli(capsys, "info")
    assert code == 0, err
    facts = json.loads(out)
    assert isinstance(facts["native_bf16"], bool) and isinstance(facts["native_fp16"], bool)
    assert {k: facts[k] for k in ("native_bf16", "native_fp16")} == native_low_precision()
    assert list(facts).index("native_bf16") < list(facts).index("cpu_linear")  # beside the routes they explain
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():  # torch's own x86 check agrees
        assert facts["native_bf16"] is True
