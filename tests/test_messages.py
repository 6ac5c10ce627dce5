"""What igengine says when it refuses or takes a while (issue 11, item 13).

A folder holding another run is refused naming the settings that differ (at most three, the rest
counted), so the user sees which flag to change; an export into the ONNX cache says that it runs
and how long it took, and the run's timing keeps it apart from the sampling loop.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from igengine.cli import main
from igengine.errors import OutputError
from igengine.jobs.sample import DEFAULT_CHECKPOINT
from igengine.store.manifest import MANIFEST, prepare_output_folder

SHA_A = hashlib.sha256(b"checkpoint a").hexdigest()
SHA_B = hashlib.sha256(b"checkpoint b").hexdigest()
TAIL = "; choose another `out` or pass `overwrite`"

RUN_KEY = {
    "checkpoint_sha256": SHA_A,
    "model": {"family": "sit", "name": "SiT-digits", "depth": 6, "encoder_depth": 2},
    "sampler": {"solver": "sde", "steps": 50, "guidance": {"ig_scale": 1.4, "ig_interval": [0.0, 1.0],
                                                           "cfg_scale": 1.35, "cfg_interval": [0.0, 0.7]},
                "timestep_shift": 0.0, "precision": "reference"},
    "seed": 0,
    "labels": {"mode": "random"},
    "backend": "torch",
    "decode": True,
    "vae": None,
    "chunk_size": 1000,
}


def folder_of(tmp_path, run_key):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"run_key": run_key, "status": "complete"}))
    return folder


def refusal(tmp_path, stored, asked) -> str:
    folder = folder_of(tmp_path, stored)
    with pytest.raises(OutputError) as e:
        prepare_output_folder(folder, asked, overwrite=False)
    prepare_output_folder(folder, asked, overwrite=True)  # `overwrite` still replaces it
    return str(e.value).removeprefix(f"{folder} holds the manifest of a different run (")


def changed(**paths):
    """RUN_KEY with settings replaced, paths spelled with "__" (sampler__steps=20); a value of ... removes one."""
    key = copy.deepcopy(RUN_KEY)
    for path, value in paths.items():
        *parents, leaf = path.split("__")
        node = key
        for name in parents:
            node = node[name]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return key


def test_the_same_run_is_accepted(tmp_path):
    folder = folder_of(tmp_path, RUN_KEY)
    prepare_output_folder(folder, copy.deepcopy(RUN_KEY), overwrite=False)
    # a tuple where the manifest holds a list is the same setting once written
    prepare_output_folder(folder, changed(sampler__guidance__ig_interval=(0.0, 1.0)), overwrite=False)


@pytest.mark.parametrize("asked, expect", [
    (changed(seed=5), "seed: 0 in the folder, 5 asked)"),
    (changed(sampler__steps=20), "sampler.steps: 50 in the folder, 20 asked)"),
    (changed(sampler__guidance__cfg_scale=1.0), "sampler.guidance.cfg_scale: 1.35 in the folder, 1.0 asked)"),
    (changed(checkpoint_sha256=SHA_B), f"checkpoint_sha256: {SHA_A[:12]} in the folder, {SHA_B[:12]} asked)"),
    (changed(backend="onnxruntime"), "backend: torch in the folder, onnxruntime asked)"),
    (changed(labels={"mode": "classes", "spec": "0-9"}),
     "labels.mode: random in the folder, classes asked; labels.spec: absent in the folder, 0-9 asked)"),
    (changed(chunk_size=...), "chunk_size: 1000 in the folder, absent asked)"),
    (changed(vae={"kind": "sd", "sha256": SHA_B, "scaling_factor": 0.18215}),
     'vae: null in the folder, {"kind": "sd", "scaling_factor": 0.18... asked)'),
])
def test_a_different_run_is_refused_naming_what_differs(tmp_path, asked, expect):
    assert refusal(tmp_path, RUN_KEY, asked) == expect + TAIL


def test_a_key_only_the_folder_has_is_named(tmp_path):
    stored = {**RUN_KEY, "kernels": "fused"}  # e.g. written by another igengine version
    assert refusal(tmp_path, stored, RUN_KEY) == "kernels: fused in the folder, absent asked)" + TAIL


def test_more_than_three_differences_are_counted(tmp_path):
    asked = changed(checkpoint_sha256=SHA_B, sampler__steps=20, sampler__guidance__cfg_scale=4.0, seed=7,
                    chunk_size=100)
    assert refusal(tmp_path, RUN_KEY, asked) == (
        f"checkpoint_sha256: {SHA_A[:12]} in the folder, {SHA_B[:12]} asked; "
        "sampler.steps: 50 in the folder, 20 asked; sampler.guidance.cfg_scale: 1.35 in the folder, 4.0 asked; "
        "+2 more)" + TAIL)


def test_long_and_multiline_values_stay_on_one_short_line(tmp_path):
    path = "/data/" + "very-long-folder-name/" * 10 + "labels.txt"
    asked = changed(labels={"mode": "file", "file": path}, model__name="line one\nline two")
    message = refusal(tmp_path, RUN_KEY, asked)
    assert message == ("model.name: SiT-digits in the folder, \"line one\\nline two\" asked; "
                       "labels.mode: random in the folder, file asked; "
                       "labels.file: absent in the folder, /data/very-long-folder-name/very-long... asked)" + TAIL)


def test_a_manifest_without_a_run_key_is_refused_saying_so(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"status": "complete"}))
    with pytest.raises(OutputError) as e:
        prepare_output_folder(folder, RUN_KEY, overwrite=False)
    assert str(e.value) == f"{folder} holds the manifest of a different run (its manifest records no run_key)" + TAIL


# ----------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 1, the flags spelled as flags
# ----------------------------------------------------------------------------------------------

needs_embedded = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")


def sample(capsys, *args):
    code = main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_embedded
def test_cli_refusal_names_the_seed_and_the_steps_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert sample(capsys, "--n", 2, "--steps", 4, "--out", out)[0] == 0
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, why in [(["--seed", 5], "seed: 0 in the folder, 5 asked"),
                      (["--steps", 5], "sampler.steps: 4 in the folder, 5 asked"),
                      (["--steps", 5, "--seed", 5, "--chunk-size", 10, "--backend", "compiled"],
                       "sampler.steps: 4 in the folder, 5 asked; seed: 0 in the folder, 5 asked; "
                       "backend: torch in the folder, compiled asked; +1 more")]:
        code, stdout, err = sample(capsys, "--n", 2, "--steps", 4, *args, "--out", out)
        assert code == 1 and stdout == ""
        assert err.splitlines() == [f"igengine: error: {out} holds the manifest of a different run ({why}); "
                                    "choose another --out or pass --overwrite"]
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
