"""`--no-keep-chunks` and `igengine pack --clean` (issue 19, item 9): a finished run need not keep its pixels twice.

The chunks go only after samples.npz (and the latents file) is written, fsynced, read back and found equal
to them; the manifest and the chunk folder's removed.json say so; the same --n later finds the run complete,
a larger --n rebuilds the chunks from samples.npz first (its samples equal those of the same history with
the chunks kept), a smaller --n is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from igengine.cli import main
from igengine.jobs.sample import DEFAULT_CHECKPOINT
from igengine.store.chunks import Chunk, ChunkPlan, ChunkSpec, ChunkStore

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")
REMOVED = "removed.json"  # igengine.store.REMOVED, the chunk folder's record of a removal


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample(capsys, out, n, *extra):
    return cli(capsys, "sample", "--n", n, "--steps", 2, "--chunk-size", 2, "--batch-size", 3, "--out", out, *extra)


def chunk_folder(out):
    (folder,) = (out / "chunks").iterdir()
    return folder


def chunk_files(out):
    return sorted(p.name for p in chunk_folder(out).glob("*.npz"))


def arrays(path):
    with np.load(path) as d:
        return {k: d[k].copy() for k in d.files}


def test_no_keep_chunks_removes_them_only_after_samples_npz_reads_back_equal(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = sample(capsys, out, 5, "--no-keep-chunks")
    assert code == 0, err
    assert chunk_files(out) == []  # the three chunk files (0-1, 2-3, 4) are gone ...
    assert sorted(p.name for p in chunk_folder(out).glob("*.how.json")) == [  # ... their records stay
        "00000000-00000001.how.json", "00000002-00000003.how.json", "00000004-00000004.how.json"]
    kept = tmp_path / "kept"
    assert sample(capsys, kept, 5)[0] == 0
    assert len(chunk_files(kept)) == 3  # the default keeps them, as before
    ours, theirs = arrays(out / "samples.npz"), arrays(kept / "samples.npz")
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    manifest = json.loads((out / "manifest.json").read_text())
    removed = manifest["chunks_removed"]
    assert removed["n"] == 5 and removed["removed"]["chunks"] == 3 and removed["removed"]["bytes"] > 0
    members = removed["files"]["samples"]["members"]
    assert members["arr_0"]["sha256"] == hashlib.sha256(ours["arr_0"].tobytes()).hexdigest()  # computed apart
    assert members["labels"]["sha256"] == hashlib.sha256(ours["labels"].tobytes()).hexdigest()
    assert members["arr_0"]["shape"] == [5, 8, 8, 3] and manifest["outputs"]["sha256"]["samples"] == members
    assert json.loads((chunk_folder(out) / REMOVED).read_text())["files"] == removed["files"]
    assert "chunks_removed" not in json.loads((kept / "manifest.json").read_text())
    assert "removed 3 chunk file(s)" in err and "--n" in err


def test_the_same_n_again_is_complete_without_computing_or_rewriting(tmp_path, capsys):
    out = tmp_path / "run"
    assert sample(capsys, out, 5, "--no-keep-chunks")[0] == 0
    before = (out / "samples.npz").read_bytes()
    stamp = (out / "samples.npz").stat().st_mtime_ns
    for extra in (("--no-keep-chunks",), ()):  # with the chunks kept by default, too: nothing to rebuild
        code, stdout, err = sample(capsys, out, 5, *extra)
        assert code == 0, err
        assert json.loads(stdout)["already_complete"] == 5
        assert "all 5 samples are complete in samples.npz" in err
        assert chunk_files(out) == [] and (out / "samples.npz").stat().st_mtime_ns == stamp
    assert (out / "samples.npz").read_bytes() == before
    # A chunk file that a removal stopped half-way left (removed.json is written before the first goes) is
    # taken as covered by samples.npz: kept by default, removed by the next --no-keep-chunks.
    kept = tmp_path / "kept"
    assert sample(capsys, kept, 5)[0] == 0
    shutil.copy(chunk_folder(kept) / "00000002-00000003.npz", chunk_folder(out))
    code, stdout, err = sample(capsys, out, 5)
    assert code == 0 and json.loads(stdout)["already_complete"] == 5 and chunk_files(out) == ["00000002-00000003.npz"]
    assert sample(capsys, out, 5, "--no-keep-chunks")[0] == 0 and chunk_files(out) == []
    code, stdout, err = cli(capsys, "pack", out)  # nothing to pack from, and nothing wrong
    assert code == 0 and "nothing to pack" in err and json.loads(stdout)["chunks_removed"] is True


@pytest.mark.parametrize("keep", [True, False])
def test_a_larger_n_rebuilds_the_chunks_from_samples_npz_and_equals_the_kept_history(keep, tmp_path, capsys):
    out, ref = tmp_path / "run", tmp_path / "ref"
    assert sample(capsys, out, 5, "--no-keep-chunks", "--save-latents", out / "lat.npy")[0] == 0
    assert sample(capsys, ref, 5, "--save-latents", ref / "lat.npy")[0] == 0  # the same history, chunks kept
    code, stdout, err = sample(capsys, out, 9, "--save-latents", out / "lat.npy",
                               *(() if keep else ("--no-keep-chunks",)))
    assert code == 0, err
    assert "rebuilt 3 chunk file(s) of the earlier 5-sample run" in err
    assert json.loads(stdout)["already_complete"] == 5  # 0..4 from samples.npz; 5..8 computed (4 completes chunk 4)
    assert sample(capsys, ref, 9, "--save-latents", ref / "lat.npy")[0] == 0
    ours, theirs = arrays(out / "samples.npz"), arrays(ref / "samples.npz")
    assert all(np.array_equal(ours[k], theirs[k]) for k in ("arr_0", "labels"))
    assert np.array_equal(np.load(out / "lat.npy"), np.load(ref / "lat.npy"))
    manifest = json.loads((out / "manifest.json").read_text())
    if keep:  # the chunks are the record again
        assert chunk_files(out) == chunk_files(ref) and not (chunk_folder(out) / REMOVED).exists()
        assert "chunks_removed" not in manifest
        for name in chunk_files(out):
            a, b = arrays(chunk_folder(out) / name), arrays(chunk_folder(ref) / name)
            assert all(np.array_equal(a[k], b[k]) for k in a)
    else:
        assert chunk_files(out) == [] and manifest["chunks_removed"]["n"] == 9
        assert set(manifest["chunks_removed"]["files"]) == {"samples", "latents"}


def test_a_smaller_n_is_refused_when_samples_npz_is_the_only_copy(tmp_path, capsys):
    out = tmp_path / "run"
    assert sample(capsys, out, 5, "--no-keep-chunks")[0] == 0
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts}
    code, stdout, err = sample(capsys, out, 3)
    lines = err.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1, err
    assert lines[0].startswith(f"igengine: error: {out} holds a run of 5 samples whose chunks were removed after "
                               "packing (--keep-chunks off): --n 3 would replace its samples.npz")
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts} == before


def test_a_changed_samples_npz_cannot_be_grown_from_but_a_copied_one_can(tmp_path, capsys):
    out = tmp_path / "run"
    assert sample(capsys, out, 5, "--no-keep-chunks")[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.copy(out / "samples.npz", tmp_path / "run_before.npz")
    st = (copy / "samples.npz").stat()
    os.utime(copy / "samples.npz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a copy: same bytes, new mtime
    data = arrays(out / "samples.npz")
    data["arr_0"][0, 0, 0, 0] ^= 1
    with open(out / "samples.npz", "wb") as f:  # same size, other pixels
        np.savez(f, **data)
    code, _, err = sample(capsys, out, 7)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "cannot be rebuilt" in lines[0] and "has changed since" in lines[0], err
    assert lines[0].startswith("igengine: error: the chunks of the run in")
    # The copy (another folder, a new mtime, the same bytes) is checked by its data's sha256 and grows.
    assert json.loads((chunk_folder(copy) / REMOVED).read_text())["files"]["samples"]["path"] == "samples.npz"
    code, _, err = sample(capsys, copy, 7)
    assert code == 0 and "rebuilt 3 chunk file(s)" in err, err
    assert np.array_equal(arrays(copy / "samples.npz")["arr_0"][:5], arrays(tmp_path / "run_before.npz")["arr_0"])


def test_pack_clean_removes_and_a_read_back_that_differs_keeps_everything(tmp_path, capsys, monkeypatch):
    from igengine.store import clean

    out = tmp_path / "run"
    assert sample(capsys, out, 5)[0] == 0
    names = chunk_files(out)
    real = clean.npz_digests

    def flipped(path, members):  # the file as the disk gives it back: one member differs
        found = real(path, members)
        found["arr_0"] = {**found["arr_0"], "sha256": "0" * 64}
        return found

    monkeypatch.setattr(clean, "npz_digests", flipped)
    code, stdout, err = cli(capsys, "pack", out, "--clean")
    lines = err.strip().splitlines()
    assert code == 1 and stdout == "" and len(lines) == 1 and "does not read back as it was written" in lines[0]
    assert chunk_files(out) == names and not (chunk_folder(out) / REMOVED).exists()
    monkeypatch.setattr(clean, "npz_digests", real)
    code, stdout, err = cli(capsys, "pack", out, "--clean")
    assert code == 0, err
    assert chunk_files(out) == [] and json.loads(stdout)["chunks_removed"] is True
    assert json.loads((out / "manifest.json").read_text())["chunks_removed"]["n"] == 5


def test_chunks_that_hold_more_than_samples_npz_are_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert sample(capsys, out, 5)[0] == 0
    code, _, err = sample(capsys, out, 3, "--no-keep-chunks")  # packs 0..2; 2-3 and 4 hold samples beyond it
    assert code == 0, err
    assert "chunks kept: 00000002-00000003.npz, 00000004-00000004.npz" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert "chunks_removed" not in manifest and manifest["chunks_kept"].startswith("chunks kept:")
    assert "00000004-00000004.npz" in chunk_files(out) and not (chunk_folder(out) / REMOVED).exists()


def test_a_rank_rebuilds_only_its_block_and_the_bytes_are_the_chunks(tmp_path):
    """restore_chunks for one rank of two: the chunks of its block, read at their offsets in samples.npz."""
    from igengine.store import clean
    from igengine.store.pack import pack

    spec = ChunkSpec((4, 4, 3), (2, 2, 2))
    store = ChunkStore(tmp_path / "chunks", spec)
    store.folder.mkdir()
    plan = ChunkPlan(7, 3)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 7).astype(np.int64)
    saved = {}
    for c in plan.chunks:
        pix = rng.integers(0, 256, (c.size, 4, 4, 3), dtype=np.uint8)
        lat = rng.standard_normal((c.size, 2, 2, 2)).astype(np.float32)
        store.write(c, labels[c.start:c.stop], pix, lat)
        saved[c] = (pix, lat)
    facts = pack(store, plan, tmp_path / "samples.npz", tmp_path / "lat.npy", digest=True)
    record = {"n": 7, "chunk_size": 3, "files": {
        kind: {"path": str(path), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
               "members": facts["sha256"][kind]} for kind, path in (("samples", tmp_path / "samples.npz"),
                                                                    ("latents", tmp_path / "lat.npy"))}}
    for c in plan.chunks:
        store.path(c).unlink()
    grown = ChunkPlan(10, 3)  # a larger n: blocks of two ranks over 4 chunks
    block = grown.for_rank(1, 2)
    assert block == (Chunk(6, 9), Chunk(9, 10))
    written = clean.restore_chunks(store, block, record, np.concatenate([labels, [1, 2, 3]]).astype(np.int64))
    assert written == [Chunk(6, 7)]  # the earlier run's short last chunk; chunk 9 is new
    assert sorted(p.name for p in store.folder.glob("*.npz")) == ["00000006-00000006.npz"]
    got = store.read(Chunk(6, 7))
    assert np.array_equal(got["arr_0"], saved[Chunk(6, 7)][0]) and np.array_equal(got["latents"], saved[Chunk(6, 7)][1])
    first = clean.restore_chunks(store, grown.for_rank(0, 2), record, np.concatenate([labels, [1, 2, 3]]))
    assert first == [Chunk(0, 3), Chunk(3, 6)]
    for c in first:
        got = store.read(c)
        assert np.array_equal(got["arr_0"], saved[c][0]) and np.array_equal(got["latents"], saved[c][1])
        assert np.array_equal(got["labels"], labels[c.start:c.stop])
    assert clean.restore_chunks(store, grown.for_rank(0, 2), record, labels) == []  # present: left alone
    other = labels.copy()
    other[1] += 1
    store.path(Chunk(0, 3)).unlink()
    with pytest.raises(Exception, match="holds other labels for samples 0..2"):
        clean.restore_chunks(store, grown.for_rank(0, 2), record, other)


def test_two_processes_each_rebuild_their_block_and_give_the_kept_historys_samples(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, ref = tmp_path / "run", tmp_path / "ref"
    one_thread = ("--threads", 1)  # torchrun's workers run one thread each: the same reductions everywhere
    assert sample(capsys, out, 5, "--no-keep-chunks", *one_thread)[0] == 0
    assert sample(capsys, ref, 5, *one_thread)[0] == 0
    assert sample(capsys, ref, 9, *one_thread)[0] == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "igengine",
           "sample", "--num-samples", "9", "--steps", "2", "--chunk-size", "2", "--batch-size", "3", "--threads", "1",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0's block (chunks 0-1, 2-3) and rank 1's (4-5, 6-7, 8): each rebuilt what it needs of the earlier run.
    assert "rank 0/2: rebuilt 2 chunk file(s) of the earlier 5-sample run" in proc.stderr, proc.stderr[-3000:]
    assert "rank 1/2: rebuilt 1 chunk file(s) of the earlier 5-sample run" in proc.stderr, proc.stderr[-3000:]
    ours, theirs = arrays(out / "samples.npz"), arrays(ref / "samples.npz")
    assert all(np.array_equal(ours[k], theirs[k]) for k in ("arr_0", "labels"))
    assert chunk_files(out) == chunk_files(ref) and not (chunk_folder(out) / REMOVED).exists()


def test_a_grown_run_that_keeps_more_than_was_packed_computes_the_rest_again(tmp_path, capsys):
    """The latents were not packed (no --save-latents): chunks that must hold them cannot be rebuilt from
    samples.npz, so they are computed again, as chunks without latents would be when kept."""
    out = tmp_path / "run"
    assert sample(capsys, out, 5, "--no-keep-chunks")[0] == 0
    before = arrays(out / "samples.npz")
    code, stdout, err = sample(capsys, out, 7, "--save-latents", out / "lat.npy")
    assert code == 0, err
    assert "rebuilt" not in err and json.loads(stdout)["already_complete"] == 0
    after = arrays(out / "samples.npz")
    assert np.array_equal(after["arr_0"][:5], before["arr_0"]) and np.load(out / "lat.npy").shape == (7, 1, 8, 8)
