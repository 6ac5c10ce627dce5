"""An exported graph's files must be those it was exported with (issue 11, item 7a).

Fault injection: a folder whose model.onnx.data comes from the export of another checkpoint ran
without complaint and gave other samples. Now every file of the graph is checked against the size
and sha256 its export.json records before a backend is built, the sha256 read in full at first use
only (a memo keyed by the file's stat skips it while the file is unchanged).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

pytest.importorskip("onnx", reason="onnx is the optional 'onnx' extra (in 'test')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter) is the optional 'onnx' extra")
pytest.importorskip("onnxruntime", reason="onnxruntime is the optional 'onnx' extra")

import onnx  # noqa: E402

from igengine.cli import main  # noqa: E402
from igengine.errors import GraphMismatchError  # noqa: E402
from igengine.export import ExportConfig  # noqa: E402
from igengine.export.cache import graph_folder, locate_graph  # noqa: E402
from igengine.export.contract import DATA_FILE, GRAPH_FILE, SIDECAR  # noqa: E402
from igengine.export.onnx import export_onnx  # noqa: E402
from igengine.jobs.backend import build_backend  # noqa: E402
from igengine.models import IGDiT  # noqa: E402
from igengine.models.checkpoint import load_checkpoint, save_safetensors  # noqa: E402
from tests.conftest import TINY, randomize_  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two checkpoints of the same architecture (seeds 0 and 3), each exported once (fp32)."""
    root = tmp_path_factory.mktemp("integrity")
    out = {}
    for seed in (0, 3):
        ckpt = root / f"sit-{seed}.safetensors"
        save_safetensors(randomize_(IGDiT(TINY["sit"]), seed, scale=0.2), ckpt)
        folder = root / f"export-{seed}"
        export_onnx(load_checkpoint(ckpt), ExportConfig(), folder)
        out[seed] = (ckpt, folder)
    assert (out[0][1] / DATA_FILE).stat().st_size == (out[3][1] / DATA_FILE).stat().st_size  # a swap keeps sizes
    return out


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files whose sha256 is read in full, in order."""
    from igengine.export import integrity

    seen = []
    real = integrity.file_sha256

    def counting(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(integrity, "file_sha256", counting)
    return seen


def copy_of(exports, seed, tmp_path, name="graph"):
    folder = tmp_path / name
    shutil.copytree(exports[seed][1], folder)
    return folder


def test_a_weights_file_from_another_checkpoint_is_refused_naming_file_and_expectation(exports, tmp_path):
    ckpt, _ = exports[0]
    folder = copy_of(exports, 0, tmp_path)
    shutil.copyfile(exports[3][1] / DATA_FILE, folder / DATA_FILE)
    loaded = load_checkpoint(ckpt)
    recorded = json.loads((folder / SIDECAR).read_text())["files"][DATA_FILE]["sha256"]
    with pytest.raises(GraphMismatchError) as e:
        build_backend("onnxruntime", loaded, "fp32", "cpu", onnx=folder, cache_root=tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(f"weights file {folder / DATA_FILE} has sha256 "), msg
    assert f"but {folder / SIDECAR} records {recorded[:16]}... for the export of checkpoint sha256 {loaded.sha256[:16]}" in msg
    assert str(ckpt) in msg and "export it again with `igengine export`" in msg and "\n" not in msg


def test_a_changed_graph_file_is_refused(exports, tmp_path):
    folder = copy_of(exports, 0, tmp_path)
    proto = onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
    proto.doc_string += " (edited)"  # same record and weights, other bytes
    onnx.save_model(proto, str(folder / GRAPH_FILE))
    with pytest.raises(GraphMismatchError, match=rf"^graph {folder / GRAPH_FILE} (is \d+ bytes|has sha256)"):
        locate_graph(load_checkpoint(exports[0][0]), "fp32", folder, root=tmp_path)


def test_a_truncated_or_missing_weights_file_is_refused_without_hashing(exports, tmp_path, hashed):
    folder = copy_of(exports, 0, tmp_path)
    size = (folder / DATA_FILE).stat().st_size
    with open(folder / DATA_FILE, "r+b") as f:
        f.truncate(size - 100)
    loaded = load_checkpoint(exports[0][0])
    with pytest.raises(GraphMismatchError, match=f"is {size - 100} bytes but .* records {size} for the export"):
        locate_graph(loaded, "fp32", folder, root=tmp_path)
    assert DATA_FILE not in hashed  # the size alone refuses it
    (folder / DATA_FILE).unlink()
    with pytest.raises(GraphMismatchError, match=f"keeps its weights in {folder / DATA_FILE}, which is missing"):
        locate_graph(loaded, "fp32", folder, root=tmp_path)


def test_hashed_at_first_use_then_remembered_until_the_file_changes(exports, tmp_path, hashed):
    folder = copy_of(exports, 0, tmp_path)
    loaded = load_checkpoint(exports[0][0])
    assert locate_graph(loaded, "fp32", folder, root=tmp_path)[0] == folder / GRAPH_FILE
    assert sorted(hashed) == sorted([GRAPH_FILE, DATA_FILE])  # first use: both read in full
    assert list((tmp_path / "verified").glob("*.json"))
    hashed.clear()
    locate_graph(loaded, "fp32", folder, root=tmp_path)
    assert hashed == []  # unchanged: no file read again
    st = (folder / DATA_FILE).stat()
    os.utime(folder / DATA_FILE, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    locate_graph(loaded, "fp32", folder, root=tmp_path)
    assert hashed == [DATA_FILE]  # hashed again, and accepted
    hashed.clear()
    # Same size, same mtime, other bytes (written in place, mtime put back): ctime/inode still differ.
    other = (exports[3][1] / DATA_FILE).read_bytes()
    st = (folder / DATA_FILE).stat()
    time.sleep(0.05)  # past the coarse clock tick that stamps ctime
    with open(folder / DATA_FILE, "r+b") as f:
        f.write(other)
    os.utime(folder / DATA_FILE, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(GraphMismatchError, match="has sha256"):
        locate_graph(loaded, "fp32", folder, root=tmp_path)
    assert hashed == [DATA_FILE]


def test_a_folder_without_export_json_is_used_with_a_warning(exports, tmp_path, hashed):
    folder = copy_of(exports, 0, tmp_path)
    (folder / SIDECAR).unlink()
    with pytest.warns(RuntimeWarning, match=f"the files of {folder / GRAPH_FILE} are not checked: there is no {SIDECAR}"):
        path, _ = locate_graph(load_checkpoint(exports[0][0]), "fp32", folder, root=tmp_path)
    assert path == folder / GRAPH_FILE and hashed == []


def test_a_tampered_export_cache_entry_is_refused_saying_to_delete_it(exports, tmp_path):
    ckpt, source = exports[0]
    loaded = load_checkpoint(ckpt)
    cached = graph_folder(loaded, ExportConfig(), tmp_path)
    cached.parent.mkdir(parents=True)
    shutil.copytree(source, cached)
    assert locate_graph(loaded, "fp32", root=tmp_path)[0] == cached / GRAPH_FILE
    shutil.copyfile(exports[3][1] / DATA_FILE, cached / DATA_FILE)
    with pytest.raises(GraphMismatchError, match=f"delete {cached} so that the next run exports it again"):
        locate_graph(loaded, "fp32", root=tmp_path)


def test_cli_sample_with_a_swapped_weights_file_is_one_line_exit_2(exports, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "cache"))
    ckpt, _ = exports[0]
    folder = copy_of(exports, 0, tmp_path)
    args = ["sample", "--ckpt", ckpt, "--n", 2, "--steps", 2, "--no-decode", "--device", "cpu",
            "--backend", "onnxruntime", "--onnx", folder]
    assert main([*map(str, args), "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    shutil.copyfile(exports[3][1] / DATA_FILE, folder / DATA_FILE)
    code = main([*map(str, args), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"igengine: error: weights file {folder / DATA_FILE} has sha256"), lines[0]
    assert not (tmp_path / "bad" / "latents.npy").exists()
