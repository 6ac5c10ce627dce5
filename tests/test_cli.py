"""`igengine sample` end to end on the embedded model, and every bad input of issue 2.

Each bad input must give one line on stderr, a non-zero exit and no traceback, and must leave
whatever was already written untouched.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from igengine.models.checkpoint import save_safetensors
from igengine.cli import main
from igengine.jobs.sample import DEFAULT_CHECKPOINT
from tests.conftest import randomize_, tiny_model

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")


def run_cli(capsys, *args):
    code = main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, expect):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("igengine: error:") and "Traceback" not in err
    assert expect in lines[0], lines[0]


def test_embedded_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "--n", 6, "--batch-size", 4, "--steps", 6, "--out", out, "--png",
                                "--save-latents", tmp_path / "lat.npy")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["n"] == 6 and summary["model"] == "SiT-digits"
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["labels"].dtype == np.int64 and data["labels"].shape == (6,)
    assert (data["arr_0"][..., 0] == data["arr_0"][..., 2]).all()
    assert sorted(p.relative_to(out / "png").as_posix() for p in (out / "png").rglob("*.png")) == [
        f"000000/{i:06d}.png" for i in range(6)]  # EDM2's --subdirs layout: 1,000 per subfolder
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["encoder_depth"] == 2 and m["model"]["encoder_depth_source"]
    assert m["checkpoint"]["sha256"] and m["sampler"]["solver"] == "sde" and m["sampler"]["steps"] == 6
    assert m["complete"] == [[0, 6]] and m["precision"] == "reference" and m["backend"]["backend"] == "torch"
    assert np.load(tmp_path / "lat.npy").shape == (6, 1, 8, 8)
    # Same command again into the same folder: it resumes, computes nothing, and the outputs stay.
    before = (out / "samples.npz").read_bytes()
    code, stdout, err = run_cli(capsys, "--n", 6, "--batch-size", 3, "--steps", 6, "--out", out)
    assert code == 0, err
    assert json.loads(stdout)["already_complete"] == 6
    assert (out / "samples.npz").read_bytes() == before
    # The same run computed afresh elsewhere, with another batch size, gives the same samples.
    code, _, err = run_cli(capsys, "--n", 6, "--batch-size", 5, "--steps", 6, "--out", tmp_path / "fresh")
    assert code == 0, err
    fresh = np.load(tmp_path / "fresh" / "samples.npz")
    assert np.array_equal(fresh["labels"], data["labels"])
    assert np.abs(fresh["arr_0"].astype(int) - data["arr_0"].astype(int)).max() <= 1  # see README: uint8 rounding


def test_a_different_run_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "--n", 2, "--steps", 4, "--out", out)[0] == 0
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "--n", 2, "--steps", 4, "--seed", 5, "--out", out)
    assert_one_line_error(code, err, "different run")
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_cli(capsys, "--n", 2, "--steps", 4, "--seed", 5, "--out", out, "--overwrite")[0] == 0


def test_labels_from_files(tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.array([3, 1, 4]))
    (tmp_path / "y.txt").write_text("3, 1\n4\n")
    for f in ("y.npy", "y.txt"):
        out = tmp_path / f"out-{f}"
        assert run_cli(capsys, "--n", 3, "--steps", 4, "--labels", tmp_path / f, "--out", out)[0] == 0
        assert np.load(out / "samples.npz")["labels"].tolist() == [3, 1, 4]


def test_balanced_labels(tmp_path, capsys):
    assert run_cli(capsys, "--n", 12, "--steps", 3, "--labels", "balanced", "--out", tmp_path / "b")[0] == 0
    assert np.load(tmp_path / "b" / "samples.npz")["labels"].tolist() == list(range(10)) + [0, 1]


@pytest.mark.parametrize("flag, spec, n, expect", [
    ("--labels", "3", 4, [3, 3, 3, 3]),
    ("--class", "7", 2, [7, 7]),
    ("--labels", "1,5,9", 5, [1, 5, 9, 1, 5]),
    ("--labels", "0-2,5", 6, [0, 1, 2, 5, 0, 1]),
    ("--labels", "8-9,9", 4, [8, 9, 9, 8]),
])
def test_classes_on_the_command_line_are_cycled_in_order(tmp_path, capsys, flag, spec, n, expect):
    out = tmp_path / "c"
    code, _, err = run_cli(capsys, "--n", n, "--steps", 2, flag, spec, "--out", out)
    assert code == 0, err
    assert np.load(out / "samples.npz")["labels"].tolist() == expect
    info = json.loads((out / "manifest.json").read_text())["labels"]
    assert info["mode"] == "classes" and info["spec"] == spec and info["classes"] == expect[:info["num_given"]]
    assert info["assignment"] == "sample i gets classes[i mod len(classes)]"


@pytest.fixture
def evil_checkpoint(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"ema": {}, "args": Payload()}, path)
    return path


BAD_INPUTS = [
    (["--ckpt", "{tmp}/nope.pt"], "checkpoint not found"),
    (["--ckpt", "{evil}"], "refusing to load"),
    (["--ckpt", "{ldit}", "--model", "SiT-B/2"], "its tensors have LightningDiT's layers, which SiT has not"),
    (["--ckpt", "{ldit}", "--model", "Nope-XL/9"], "unknown model"),
    (["--model", "LightningDiT-B/2"], "--model LightningDiT-B/2 is a LightningDiT model but"),
    (["--model", "SiT-S/2"], "(it records model SiT-digits)"),
    (["--n", 0], "--n must be >= 1"),
    (["--n", -3], "--n must be >= 1"),
    (["--batch-size", 0], "--batch-size must be >= 1"),
    (["--chunk-size", 0], "--chunk-size must be >= 1"),
    (["--n", 3, "--labels", "{tmp}/short.txt"], "has 2 class ids but --n is 3"),
    (["--n", 3, "--labels", "{tmp}/big.txt"], "class id 10 is outside [0, 10)"),
    (["--n", 3, "--labels", "{tmp}/missing.txt"], "labels file not found"),
    (["--labels", "10"], "--labels class 10 is outside [0, 10) for this model"),
    (["--class", "0-10"], "--labels class 10 is outside [0, 10) for this model"),
    (["--labels", "5-2"], "--labels range 5-2 runs backwards: write it as 2-5"),
    (["--labels", "3x"], "labels file not found: 3x (--labels is random, balanced, classes such as 207"),
    (["--cfg-interval", "0.5,1.5"], "--cfg-interval must be LOW,HIGH"),
    (["--ig-interval", "0.8,0.2"], "--ig-interval must be LOW,HIGH"),
    (["--cfg-interval", "abc"], "--cfg-interval must be LOW,HIGH (two numbers)"),
    (["--cfg-scale", -1], "--cfg-scale must be a finite number >= 0"),
    (["--ig-scale", -0.5], "--ig-scale must be a finite number >= 0"),
    (["--steps", 0], "--steps must be >= 1"),
    (["--solver", "heun2"], "not a sit solver"),
    (["--solver", "rk4"], "'rk4' is not one of"),
    (["--timestep-shift", 0.3], "--timestep-shift applies to LightningDiT and RAEv2 models only"),
    (["--precision", "fp8"], "'fp8' is not one of"),
    (["--backend", "jax"], "'jax' is not one of"),
    (["--onnx", "{tmp}/g.onnx"], "--onnx only applies to the onnxruntime and tensorrt backends"),
    (["--png", "--no-decode"], "--png needs decoded pixels but --no-decode was given"),
    (["--out", "{tmp}/a_file"], "is not a folder"),
    (["--out", "{tmp}/a_file/sub"], "cannot create output folder"),
    (["--seed", -1], "--seed must lie in [0, 2^64)"),
    (["--seed", 2**64], "--seed must lie in [0, 2^64)"),
    (["--save-latents", "{tmp}/x.txt"], "--save-latents must name a .npy file"),
    (["--device", "mps"], "--device 'mps' is not supported: igengine runs on auto, cpu, cuda or cuda:N"),
    (["--device", "xla:0"], "--device 'xla:0' is not supported"),
    (["--device", "gpu"], "unknown --device 'gpu'"),
]


@pytest.mark.parametrize("args, expect", BAD_INPUTS, ids=[" ".join(map(str, a)) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, evil_checkpoint, args, expect):
    (tmp_path / "short.txt").write_text("1 2")
    (tmp_path / "big.txt").write_text("1 2 10")
    (tmp_path / "a_file").write_text("x")
    ldit = tmp_path / "ldit.pt"
    if any("{ldit}" in str(a) for a in args):
        torch.save(tiny_model("lightningdit").state_dict(), ldit)
    args = [str(a).format(tmp=tmp_path, evil=evil_checkpoint, ldit=ldit) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o")]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, expect)
    # A bad request exits 2; an output folder that cannot be used is reported as a failed run (1).
    assert code == (1 if expect in ("is not a folder", "cannot create output folder") else 2)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_lightningdit_weights_under_a_sit_style_args_namespace_sample_with_a_lightningdit_model(tmp_path, capsys):
    """Issue 18: LightningDiT tensors saved with an argparse Namespace (as REPA-style trainers do) sample with
    `--model LightningDiT-...`; `--model SiT-...` on them is one line naming the tensor that refutes it."""
    import argparse

    model = tiny_model("lightningdit")
    ckpt = tmp_path / "repa-ldit.pt"
    args = argparse.Namespace(model="SiT-B/2", encoder_depth=2, num_classes=10, resolution=64)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": args}, ckpt)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "--ckpt", ckpt, "--model", "LightningDiT-B/1", "--num-heads", 4, "--n", 1,
                           "--steps", 2, "--no-decode", "--device", "cpu", "--out", out)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["family"] == "lightningdit" and m["model"]["use_swiglu"] and m["model"]["use_rope"]
    assert m["model"]["encoder_depth"] == 2 and m["model"]["encoder_depth_source"] == "checkpoint args"
    notes = m["checkpoint"]["resolution_notes"]
    assert any(n.startswith("family LightningDiT from `model` LightningDiT-B/1 and its tensors") for n in notes), notes
    latents = np.load(out / "latents.npy")
    assert m["sampler"]["solver"] == "heun2" and latents.shape == (1, 8, 4, 4) and np.isfinite(latents).all()
    code, _, err = run_cli(capsys, "--ckpt", ckpt, "--model", "SiT-B/2", "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "--model SiT-B/2 is a SiT model but")
    assert "blocks.0.mlp.w12.weight is a SwiGLU MLP" in err and "records model SiT-B/2" in err and code == 2


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "42", "null", "\xff\xfe", "{not json"])
def test_a_manifest_that_is_not_an_object_is_refused_in_one_line_and_overwrite_replaces_it(tmp_path, capsys, text):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_bytes(text.encode("latin-1"))
    code, _, err = run_cli(capsys, "--n", 1, "--steps", 2, "--out", out)
    assert_one_line_error(code, err, f"{out / 'manifest.json'}")
    assert "--overwrite" in err and code == 1
    assert (out / "manifest.json").read_bytes() == text.encode("latin-1")
    code, _, err = main(["pack", str(out)]), *capsys.readouterr()
    assert_one_line_error(code, err, "manifest.json")
    assert run_cli(capsys, "--n", 1, "--steps", 2, "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_every_output_file_gets_the_mode_of_the_umask(tmp_path, capsys):
    import os

    saved = os.umask(0o002)  # a group-shared project folder
    try:
        out = tmp_path / "shared"
        code, _, err = run_cli(capsys, "--n", 2, "--steps", 2, "--png", "--chunk-size", 1, "--out", out,
                               "--save-latents", tmp_path / "lat.npy")
        assert code == 0, err
    finally:
        os.umask(saved)
    files = [p for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts] + [tmp_path / "lat.npy"]
    names = {p.name for p in files}
    assert {"samples.npz", "manifest.json", "grid.png", "000000.png", "00000000-00000000.npz", "lat.npy"} <= names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o664) for p in files}


@pytest.mark.parametrize("gpus, device, expect", [
    (0, "cuda", "--device cuda was asked for but no CUDA GPU is available here"),
    (0, "cuda:0", "--device cuda:0 was asked for but no CUDA GPU is available here"),
    (2, "cuda:7", "--device cuda:7 does not exist here: 2 CUDA device(s) are visible (cuda:0..cuda:1)"),
])
def test_a_cuda_device_this_machine_lacks_is_one_line_exit_2(tmp_path, capsys, monkeypatch, gpus, device, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    code, _, err = run_cli(capsys, "--n", 1, "--device", device, "--out", tmp_path / "o")
    assert_one_line_error(code, err, expect)
    assert code == 2 and not (tmp_path / "o").exists()


def test_console_script_refuses_an_unsupported_device_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "igengine", "sample", "--device", "mps", "--n", "1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("igengine: error: --device 'mps' is not supported: igengine runs on auto, cpu, "
                                   "cuda or cuda:N")


@pytest.mark.parametrize("target", ["manifest.json", "samples.npz", "rank-0"])
def test_disk_full_outside_a_chunk_names_the_file(tmp_path, capsys, monkeypatch, target):
    """ENOSPC while writing the manifest, samples.npz or the lock: one line naming that file."""
    import errno
    import os

    real_fsync, real_pwrite = os.fsync, os.pwrite

    def full_for(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        return name == target or name.startswith(f".{target}.")

    def fsync(fd):
        if full_for(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def pwrite(fd, data, offset):
        if full_for(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "--n", 2, "--steps", 2, "--out", out)
    monkeypatch.undo()
    assert code == 1 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("igengine: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    path = out / ".locks" / "rank-0" if target == "rank-0" else out / target
    assert errors[0].startswith(f"igengine: error: cannot write {path}: No space left on device; "), errors[0]
    assert not list(out.rglob(".*.tmp"))  # no temporary file left behind
    assert run_cli(capsys, "--n", 2, "--steps", 2, "--out", out)[0] == 0  # and the rerun completes


def test_unknown_sampler_defaults_in_a_checkpoint_are_refused_in_one_line(tmp_path, capsys):
    """A checkpoint's `igengine.sampler_defaults` with a key igengine does not know names the file and the key."""
    model = tiny_model("sit", in_channels=1, input_size=8)
    path = tmp_path / "odd.safetensors"
    save_safetensors(model, path, sampler_defaults={"sde_steps": 20})
    code, _, err = run_cli(capsys, "--ckpt", path, "--n", 2, "--no-decode", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown SamplerSettings key(s) ['sde_steps']")
    assert str(path) in err and code == 2


def test_unwritable_folder(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root (the not-a-folder cases are tested above)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "--n", 1, "--out", locked)
        assert_one_line_error(code, err, "not writable")
    finally:
        locked.chmod(0o700)


def test_nan_in_latents_is_reported_with_step_and_indices(tmp_path, capsys):
    model = tiny_model("sit", in_channels=1, input_size=8)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("inf"))
    path = tmp_path / "blowup.safetensors"
    save_safetensors(model, path)
    code, _, err = run_cli(capsys, "--ckpt", path, "--n", 3, "--steps", 5, "--cfg-scale", 1, "--ig-scale", 1,
                           "--no-decode", "--out", tmp_path / "nan")
    # A failure during the run: progress lines (the precision chosen) may precede it; the error is one line.
    assert code == 1 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("igengine: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert "NaN/Inf in the latents at solver step 0 for sample indices [0, 1, 2]" in errors[0]
    # The manifest written at the start says the run is not complete, and no chunk or output exists.
    m = json.loads((tmp_path / "nan" / "manifest.json").read_text())
    assert m["status"] == "running" and m["complete"] == []
    assert not list((tmp_path / "nan").rglob("*.npz")) and not list((tmp_path / "nan").rglob("*.npy"))


def test_latent_model_needs_no_decode(tmp_path, capsys):
    path = tmp_path / "sit.safetensors"
    save_safetensors(randomize_(tiny_model("sit")), path)
    code, _, err = run_cli(capsys, "--ckpt", path, "--n", 2, "--steps", 3, "--out", tmp_path / "a")
    assert_one_line_error(code, err, "--no-decode")
    code, _, err = run_cli(capsys, "--ckpt", path, "--n", 2, "--steps", 3, "--no-decode", "--out", tmp_path / "a")
    assert code == 0, err
    assert np.load(tmp_path / "a" / "latents.npy").shape == (2, 4, 8, 8)


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "igengine", "sample", "--n", "abc"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("igengine: error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, expect", [
    (["--version"], "igengine 0.1.0"),
    (["-h"], "Usage: igengine [OPTIONS] COMMAND"),
    (["--help"], "Usage: igengine [OPTIONS] COMMAND"),
    (["sample", "-h"], "Usage: igengine sample [OPTIONS]"),
    (["sample", "--help"], "igengine sample --n 64 --out out/digits"),
    (["sample", "--help"], "--grid / --no-grid"),
    (["export", "-h"], "Usage: igengine export [OPTIONS]"),
    (["bench", "--help"], "Usage: igengine bench [OPTIONS]"),
    (["pack", "-h"], "Usage: igengine pack [OPTIONS]"),
])
def test_version_and_help_answer_without_importing_torch(argv, expect):
    import igengine

    code = ("import json, sys\nfrom igengine.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    *text, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"rc": 0, "torch": False}, proc.stderr
    assert expect.replace("0.1.0", igengine.__version__) in "\n".join(text)


def test_the_cli_choices_written_out_are_the_librarys():
    """The choices cli.py spells out (their modules import torch) equal the library's enums."""
    from igengine import cli
    from igengine.config import Precision
    from igengine.export.config import GRAPH_PRECISIONS, ExportFormat
    from igengine.vae import VAEKind

    assert {c.value for c in cli.VAEKindChoice} == {"auto"} | {k.value for k in VAEKind}
    from igengine.sampling.sampler import CAPTURE_CHOICES

    assert tuple(c.value for c in cli.CaptureChoice) == CAPTURE_CHOICES
    assert {c.value for c in cli.ExportFormatChoice} == {f.value for f in ExportFormat}
    assert {c.value for c in cli.ExportPrecisionChoice} == {p.value for p in GRAPH_PRECISIONS}
    assert [c.value for c in cli.PrecisionChoice] == ["auto"] + [p.value for p in Precision]


def test_sample_job_refuses_an_unknown_capture(tmp_path):
    from igengine.errors import JobError
    from igengine.jobs.sample import SampleJob

    SampleJob(out=tmp_path, capture="off").validate()
    with pytest.raises(JobError, match="unknown `capture` 'sometimes'; choose auto or off"):
        SampleJob(out=tmp_path, capture="sometimes").validate()
