"""Bulk sampling: the same samples whatever the batch size, process count or interruption; resume,
locking, --n changes and the faults of issue 5.

All runs use LightningDiT-tiny (8x4x4 latents) with a tiny VA-VAE (8x8 images), 4 solver steps and
chunks of 6, so that n = 20 has a short last chunk and batches of 7 straddle nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from igengine.store.chunks import ChunkPlan, ChunkSpec, ChunkStore
from igengine.cli import main
from igengine.jobs.launch import RankInfo
from igengine.store.locks import rank_lock
from tests.bulk_fixtures import run_torchrun, save_ldit, save_stats, save_vavae

ROOT = Path(__file__).resolve().parents[1]
N = 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bulk-inputs")
    return {"ckpt": save_ldit(d / "ldit.safetensors"), "vae": save_vavae(d / "vavae.pt"),
            "stats": save_stats(d / "latents_stats.pt")}


def sample_args(files, out, n=N, batch=64, extra=()):
    return ["sample", "--ckpt", files["ckpt"], "--vae", files["vae"], "--latent-stats", files["stats"],
            "--num-samples", n, "--steps", 4, "--chunk-size", 6, "--batch-size", batch,
            "--save-latents", Path(out) / "lat.npy", "--out", out, *extra]


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def load(out):
    d = np.load(Path(out) / "samples.npz")
    return d["arr_0"], d["labels"], np.load(Path(out) / "lat.npy")


def assert_same_samples(out, ref):
    pixels, labels, latents = load(out)
    ref_pixels, ref_labels, ref_latents = ref
    assert pixels.dtype == np.uint8 and pixels.shape == ref_pixels.shape
    assert np.array_equal(labels, ref_labels)
    assert np.abs(latents - ref_latents).max() <= 1e-5
    assert np.array_equal(pixels, ref_pixels)


def store_of(out):
    m = json.loads((Path(out) / "manifest.json").read_text())
    b = m["bulk"]
    return ChunkStore(Path(out) / b["chunks_dir"], ChunkSpec(tuple(b["pixels"]), tuple(b["latents"]))), m


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """One uninterrupted single-process run with batch 64 (everything in one batch per chunk)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([str(a) for a in sample_args(files, out)]) == 0
    return out, load(out)


def test_chunk_boundaries_depend_on_chunk_size_only():
    plan = ChunkPlan(n=25, chunk_size=6)
    assert [(c.start, c.stop) for c in plan.chunks] == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 25)]
    for world in range(1, 8):
        blocks = [plan.for_rank(r, world) for r in range(world)]
        assert [c for b in blocks for c in b] == list(plan.chunks)  # disjoint, contiguous, in order
    assert ChunkPlan(n=30, chunk_size=6).chunks[:4] == plan.chunks[:4]  # extending n keeps full chunks


def test_reference_run_layout(reference):
    out, (pixels, labels, latents) = reference
    assert pixels.shape == (N, 8, 8, 3) and labels.dtype == np.int64 and latents.shape == (N, 8, 4, 4)
    store, m = store_of(out)
    assert m["status"] == "complete" and m["complete"] == [[0, N]] and m["n"] == N
    assert sorted(p.name for p in store.folder.glob("*.npz")) == [
        "00000000-00000005.npz", "00000006-00000011.npz", "00000012-00000017.npz", "00000018-00000019.npz"]
    assert m["vae"]["kind"] == "vavae" and "loss.*" in m["vae"]["dropped_keys"]
    assert m["outputs"]["pixel_conversion"].startswith("uint8(clamp(127.5 * x + 128")


def test_batch_size_does_not_change_the_samples(files, reference, tmp_path, capsys):
    # Noise and labels are bitwise batch-independent (noise contract). The network is not bitwise
    # batch-invariant on every backend: for other batch sizes (e.g. 1 vs 64) latents differ by
    # ~2e-7 and a uint8 value on a rounding boundary can flip; batch 7 vs 64 is exact here.
    code, _, err = run(capsys, *sample_args(files, tmp_path / "b7", batch=7))
    assert code == 0, err
    assert_same_samples(tmp_path / "b7", reference[1])


def test_two_processes_under_torchrun_give_the_same_samples(files, reference, tmp_path, capsys):
    # Each torchrun worker runs with OMP_NUM_THREADS=1. The CPU's intra-op thread count changes the
    # order of float reductions (seen: latents 6e-8 apart, 1 of 3072 uint8 values flipped), so the
    # one-process run compared bit for bit uses one thread as well; the batches are the same by
    # construction (they never straddle chunks).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run(capsys, *sample_args(files, tmp_path / "one", batch=7))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    out = tmp_path / "tr"
    proc = run_torchrun(sample_args(files, out, batch=7), tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2  # one summary: rank 0's
    assert "rank 1/2: chunk 00000012-00000017.npz written" in proc.stderr  # rank 1 did the second half
    assert "rank 0/2: chunk 00000000-00000005.npz written" in proc.stderr
    one, two = load(tmp_path / "one"), load(out)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))  # pixels, labels and latents: bit for bit
    _, labels, latents = two
    assert np.array_equal(labels, reference[1][1]) and np.abs(latents - reference[1][2]).max() <= 1e-5


def test_sigkill_loses_at_most_the_chunk_in_flight_and_resume_matches(files, tmp_path, capsys):
    n = 48
    ref = tmp_path / "ref"
    assert run(capsys, *sample_args(files, ref, n=n))[0] == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "igengine", *map(str, sample_args(files, out, n=n))]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("chunks/*/*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    store, m = store_of(out)
    done = sorted(store.folder.glob("*.npz"))
    assert 1 <= len(done) < 8 and m["status"] == "running" and not (out / "samples.npz").exists()
    plan = ChunkPlan(n, 6)
    for c in plan.chunks:  # every file under a chunk name is a complete, valid chunk
        assert store.problem(c) in (None, "missing")
    code, _, err = run(capsys, *sample_args(files, out, n=n))
    assert code == 0, err
    assert_same_samples(out, load(ref))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_cleanly_say_where_the_run_stands_and_resume(files, reference, tmp_path, capsys, sig):
    """As Slurm / torchrun (SIGTERM) or Ctrl-C (SIGINT) stop a run: completed chunks are kept, the chunk
    in flight is discarded, the manifest says "interrupted", stderr says how to resume, exit 128 + signal."""
    n = 48
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "igengine", *map(str, sample_args(files, out, n=n))]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("chunks/*/*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    store, m = store_of(out)
    done = sorted(store.folder.glob("*.npz"))
    assert 1 <= len(done) < n // 6, "the run ended before it could be stopped"
    assert m["status"] == "interrupted" and m["interrupted"]["signal"] == signal.Signals(sig).name
    plan = ChunkPlan(n, 6)
    present = [c for c in plan.chunks if store.problem(c) is None]
    assert [p.name for p in done] == [c.name for c in present]  # every file under a chunk name is complete
    assert m["complete"] == [[0, present[-1].stop]] and m["interrupted"]["complete_samples"] == present[-1].stop
    assert not list(out.rglob("*.tmp")) and not (out / "samples.npz").exists()
    last = err.strip().splitlines()[-1]
    assert last == (f"igengine: interrupted by {signal.Signals(sig).name}: {present[-1].stop} of {n} samples are "
                    f"complete in {store.folder} (0..{present[-1].stop - 1}); the chunk in flight was discarded; "
                    "rerun the same command to resume"), err
    assert "Traceback" not in err
    code, _, err = run(capsys, *sample_args(files, out, n=n))
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    pixels, labels, latents = load(out)
    ref_pixels, ref_labels, ref_latents = reference[1]
    assert np.array_equal(labels[:N], ref_labels) and np.array_equal(pixels[:N], ref_pixels)
    assert np.abs(latents[:N] - ref_latents).max() <= 1e-5


def test_disk_full_while_writing_a_chunk_stops_cleanly_and_the_rerun_completes(files, reference, tmp_path, capsys,
                                                                               monkeypatch):
    from igengine.store import npzstream

    real = npzstream.MemberSink.write_bytes
    calls = {"n": 0}

    def filling_disk(self, data):
        calls["n"] += 1
        if calls["n"] == 7:  # in the third chunk file, after some of its bytes went out
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(npzstream.MemberSink, "write_bytes", filling_disk)
    out = tmp_path / "full"
    code, _, err = run(capsys, *sample_args(files, out))
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("igengine: error: cannot write chunk") and "00000012-00000017.npz" in last
    assert "the disk is full" in last and "rerun the same command" in last and "Traceback" not in err
    store, _ = store_of(out)
    names = sorted(p.name for p in store.folder.iterdir())  # chunk files, and the records of how they were computed
    assert [n for n in names if not n.endswith(".how.json")] == ["00000000-00000005.npz", "00000006-00000011.npz"]
    assert all(store.problem(c) is None for c in ChunkPlan(N, 6).chunks[:2])
    monkeypatch.undo()
    code, _, err = run(capsys, *sample_args(files, out))
    assert code == 0, err
    assert_same_samples(out, reference[1])


def test_damaged_chunks_are_recomputed_on_resume(files, reference, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(reference[0], out)
    store, _ = store_of(out)
    chunks = ChunkPlan(N, 6).chunks
    truncated, flipped = store.path(chunks[1]), store.path(chunks[2])
    truncated.write_bytes(truncated.read_bytes()[:500])
    raw = bytearray(flipped.read_bytes())
    raw[raw.find(b"arr_0.npy") + 300] ^= 0xFF  # inside arr_0's pixel data: only the CRC-32 can tell
    flipped.write_bytes(bytes(raw))
    (out / "samples.npz").unlink()
    code, stdout, err = run(capsys, *sample_args(files, out))
    assert code == 0, err
    notes = json.loads(stdout)["notes"]
    assert any(f"chunk {chunks[1].name} is damaged" in s for s in notes)
    assert any(f"chunk {chunks[2].name} is damaged (unreadable (Bad CRC-32" in s for s in notes)
    assert f"chunk {chunks[1].name} is damaged" in err
    assert_same_samples(out, reference[1])
    m = json.loads((out / "manifest.json").read_text())
    assert m["timing"]["already_complete"] == N - 12 and m["timing"]["computed_this_session"] == 12


def test_changing_n_extends_or_truncates_the_same_run(files, reference, tmp_path, capsys):
    out = tmp_path / "grow"
    assert run(capsys, *sample_args(files, out, n=8))[0] == 0
    first = load(out)
    assert np.array_equal(first[0], reference[1][0][:8])
    store, _ = store_of(out)
    short = store.folder / "00000006-00000007.npz"
    assert short.exists()
    code, stdout, err = run(capsys, *sample_args(files, out, n=N))
    assert code == 0, err
    # chunk 0-5 kept, and the short last chunk 6-7 completed to 6-11 (samples 8-11 computed), not redone
    assert json.loads(stdout)["already_complete"] == 8
    assert "00000006-00000007.npz of an earlier run with a smaller n was completed to 00000006-00000011.npz" in err
    assert not short.exists()
    pixels, labels, latents = load(out)
    ref_pixels, ref_labels, ref_latents = reference[1]
    assert np.array_equal(labels, ref_labels) and np.abs(latents - ref_latents).max() <= 1e-5
    assert np.array_equal(pixels[:8], first[0])  # the kept samples are the earlier run's bytes
    # samples 8-11 ran as a batch of 4 rather than inside one of 6: the same noise, latents equal to
    # rounding; a uint8 pixel on a quantisation boundary may round the other way (README, bulk)
    assert np.mean(pixels != ref_pixels) <= 1e-3
    code, _, err = run(capsys, *sample_args(files, out, n=5))
    assert code == 0
    assert "took its first 5 for 00000000-00000004.npz" in err
    assert f"holds a run of {N} samples; --n 5 packs its first 5" in err
    pixels, labels, _ = load(out)
    assert np.array_equal(pixels, reference[1][0][:5]) and np.array_equal(labels, reference[1][1][:5])
    assert (store.folder / "00000000-00000005.npz").exists()  # kept for a later, larger n


def test_without_chunk_size_a_rerun_takes_the_folders_and_a_new_run_the_default(files, reference, tmp_path, capsys):
    from igengine.store.chunks import DEFAULT_CHUNK_SIZE

    out = tmp_path / "cs"
    shutil.copytree(reference[0], out)  # a run with chunks of 6
    def without_chunk_size(args):
        i = args.index("--chunk-size")
        return args[:i] + args[i + 2:]

    code, stdout, err = run(capsys, *without_chunk_size(sample_args(files, out)))
    assert code == 0, err
    assert json.loads(stdout)["already_complete"] == N  # resumed: the folder's chunk size, nothing recomputed
    assert "chunk size 6, that of the run already in" in err
    fresh = tmp_path / "fresh"
    code, _, err = run(capsys, *without_chunk_size(sample_args(files, fresh)))
    assert code == 0, err
    assert json.loads((fresh / "manifest.json").read_text())["bulk"]["chunk_size"] == DEFAULT_CHUNK_SIZE


def test_a_second_run_into_a_locked_folder_is_refused(files, reference, tmp_path, capsys):
    out = tmp_path / "locked"
    shutil.copytree(reference[0], out)
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts}
    with rank_lock(out):  # a run in progress (rank 0 holds its lock)
        code, _, err = run(capsys, *sample_args(files, out))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another igengine run is writing into" in lines[0] and f"pid {os.getpid()}" in lines[0]
    after = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert after == before
    assert run(capsys, *sample_args(files, out))[0] == 0  # the lock went with its holder


def test_other_chunk_size_is_another_run_and_overwrite_discards_its_chunks(files, reference, tmp_path, capsys):
    out = tmp_path / "ow"
    shutil.copytree(reference[0], out)
    args = [a if a != 6 else 5 for a in sample_args(files, out)]
    code, _, err = run(capsys, *args)
    assert code == 1 and "different run" in err
    assert run(capsys, *args, "--overwrite")[0] == 0
    assert len(list((out / "chunks").iterdir())) == 1  # only this configuration's chunk folder is left
    # Chunks of 5 make network batches of 5 rows instead of 6: the noise and labels are the same
    # and the latents agree to rounding, but a uint8 pixel sitting on a quantisation boundary may
    # round the other way, so pixels are not compared here (see test_batch_size_does_not_change_the_samples).
    _, labels, latents = load(out)
    assert np.array_equal(labels, reference[1][1]) and np.abs(latents - reference[1][2]).max() <= 1e-5


def test_pack_command_checks_coverage(files, reference, tmp_path, capsys):
    out = tmp_path / "pack"
    shutil.copytree(reference[0], out)
    store, _ = store_of(out)
    store.path(ChunkPlan(N, 6).chunks[1]).unlink()
    code = main(["pack", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "6 of 20 indices are missing (6..11)" in err and "rerun the same `igengine sample` command" in err
    shutil.copy(reference[0] / store.folder.relative_to(out) / "00000006-00000011.npz", store.folder)
    (out / "samples.npz").unlink()
    (out / ".samples.npz.killed.tmp").write_bytes(b"half a pack")  # left by a pack killed half-way
    with rank_lock(out):  # a sampling run's rank 0 is alive: pack must not write beside it
        assert main(["pack", str(out)]) == 1
    assert "another igengine run is writing into" in capsys.readouterr().err
    assert main(["pack", str(out)]) == 0
    assert not list(out.glob(".samples.npz.*.tmp"))
    assert_same_samples(out, reference[1])


def test_rank_0_counts_the_chunks_of_other_ranks_only_once_they_exist(tmp_path):
    """Under torchrun rank 0 shows the whole run's progress: its own samples plus the other ranks' chunk
    files that exist (complete, by atomic rename) -- not the chunks the other ranks have yet to write."""
    from igengine.jobs.bulk import BulkSampler, Progress

    plan = ChunkPlan(400, 50)  # rank 0: 0..199, rank 1: 200..399, in chunks of 50
    store = ChunkStore(tmp_path / "chunks", ChunkSpec(None, (1, 2, 2)))
    store.folder.mkdir()
    labels = np.zeros(400, dtype=np.int64)
    theirs = plan.for_rank(1, 2)

    def write_theirs(chunk):
        store.write(chunk, labels[chunk.start:chunk.stop], None, np.zeros((chunk.size, 1, 2, 2), np.float32))

    write_theirs(theirs[0])  # rank 1 had finished one chunk before rank 0 started
    calls = []

    def make(indices):  # rank 0's samples; rank 1 finishes one more chunk while rank 0 computes its second
        calls.append(indices)
        if len(calls) == 2:
            write_theirs(theirs[1])
        return np.zeros((len(indices), 1, 2, 2), np.float32), None

    lines = []
    bulk = BulkSampler(store, plan, RankInfo(0, 2), labels, make, 50, True, None, Progress(log=lines.append))
    report = bulk.run_rank()
    assert report.initial_done == 50 and report.computed == 200
    runs = [line.split("run: ")[1].split(" samples")[0] for line in lines]
    # Rank 0's 50, 100, 150, 200 plus rank 1's chunks that exist (50, then 100); its last two never came.
    assert runs == ["100/400", "200/400", "250/400", "300/400"], lines
    assert bulk._others_present() == 100 and bulk._others_present(before=0.0) == 0
