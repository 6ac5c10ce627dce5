"""What a new user met on a fresh clone (issue 19, items 4, 6, 8 and 10): choices that ran without a word,
messages that named the wrong problem, commands that needed a checkpoint `sample` does without.

Each test failed before its fix: a warning that was missing, a refusal that blamed a file or a setting
nobody gave, `--overwrite` ignoring the folder's chunk size, `export`/`bench` insisting on `--ckpt`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

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
