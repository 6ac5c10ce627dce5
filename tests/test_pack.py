"""The streaming .npz writer and the pack: np.load- and ADM-evaluator-readable, piecewise, checked."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from igengine.store import npzstream
from igengine.store.chunks import ChunkPlan, ChunkSpec, ChunkStore
from igengine.store.npzstream import NpzFormatError, NpzWriter
from igengine.store.pack import PackError, pack


def evaluator_read(path, name, batch):
    """How guided-diffusion's evaluations/evaluator.py reads arr_0: zipfile + numpy.lib.format, in batches."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)(f)
        assert not fortran
        per_row = int(np.prod(shape[1:])) * dtype.itemsize
        rows = []
        for _ in range(0, shape[0], batch):
            buf = f.read(per_row * batch)
            rows.append(np.frombuffer(buf, dtype=dtype).reshape(-1, *shape[1:]))
    return np.concatenate(rows)


def chunk_data(plan, seed=0):
    rng = np.random.default_rng(seed)
    return {c: (rng.integers(0, 256, (c.size, 6, 5, 3), dtype=np.uint8), rng.integers(0, 1000, c.size),
                rng.standard_normal((c.size, 2, 3, 3), dtype=np.float32)) for c in plan.chunks}


@pytest.fixture
def filled(tmp_path):
    plan = ChunkPlan(n=23, chunk_size=5)
    store = ChunkStore(tmp_path / "chunks", ChunkSpec(pixels=(6, 5, 3), latents=(2, 3, 3)))
    store.folder.mkdir()
    data = chunk_data(plan)
    for c, (pix, lab, lat) in data.items():
        store.write(c, lab, pix, lat)
    return plan, store, data


def test_packed_npz_equals_the_concatenation_and_reads_like_savez(filled, tmp_path, monkeypatch):
    plan, store, data = filled
    monkeypatch.setattr(npzstream, "PIECE", 64)  # many pieces per member: the copy is really piecewise
    pack(store, plan, tmp_path / "samples.npz", tmp_path / "lat" / "latents.npy")
    pixels = np.concatenate([d[0] for d in data.values()])
    labels = np.concatenate([d[1] for d in data.values()])
    latents = np.concatenate([d[2] for d in data.values()])
    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "labels"]
        assert np.array_equal(z["arr_0"], pixels) and z["labels"].dtype == np.int64 and np.array_equal(z["labels"], labels)
    assert np.array_equal(evaluator_read(tmp_path / "samples.npz", "arr_0", batch=4), pixels)
    assert np.array_equal(np.load(tmp_path / "lat" / "latents.npy"), latents)
    with zipfile.ZipFile(tmp_path / "samples.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "lat").glob(".*.tmp"))


def test_writer_refuses_rows_that_do_not_fill_the_declared_shape(tmp_path):
    with open(tmp_path / "x.npz", "wb") as f, NpzWriter(f) as w:
        with pytest.raises(NpzFormatError, match="bytes written"):
            with w.member("arr_0", np.uint8, (3, 2)) as sink:
                sink.write(np.zeros((2, 2), np.uint8))
        with pytest.raises(NpzFormatError, match="do not fit"):
            with w.member("labels", np.int64, (3,)) as sink:
                sink.write(np.zeros(3, np.int32))


def test_pack_names_missing_ranges_and_damaged_chunks(filled, tmp_path, monkeypatch):
    plan, store, _ = filled
    chunks = plan.chunks
    store.path(chunks[1]).unlink()
    store.path(chunks[2]).unlink()
    store.path(chunks[4]).unlink()
    with pytest.raises(PackError, match=r"13 of 23 indices are missing \(5\.\.14, 20\.\.22\)"):
        pack(store, plan, tmp_path / "s.npz", None)
    assert not (tmp_path / "s.npz").exists()

    plan = ChunkPlan(n=5, chunk_size=5)
    raw = bytearray(store.path(chunks[0]).read_bytes())
    raw[raw.find(b"arr_0.npy") + 300] ^= 1  # in arr_0's pixel data: only the CRC-32 sees it
    store.path(chunks[0]).write_bytes(bytes(raw))
    # Found by the header check (this small member is read whole) ...
    with pytest.raises(PackError, match=r"chunk 00000000-00000004.npz is damaged: unreadable \(Bad CRC-32"):
        pack(store, plan, tmp_path / "s.npz", None)
    # ... or, in a large member, only while its data is copied.
    monkeypatch.setattr("igengine.store.pack.check_complete", lambda store, plan: None)
    with pytest.raises(PackError, match=r"00000000-00000004.npz is damaged \(Bad CRC-32.*rerun the same"):
        pack(store, plan, tmp_path / "s.npz", None)
    assert not (tmp_path / "s.npz").exists() and not list(tmp_path.glob(".s.npz*"))


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    import os

    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_atomic_writes_get_the_mode_open_would_give_them(tmp_path, umask, mask):
    import os

    from igengine.store.atomic import atomic_write_bytes, atomic_write_json, current_umask

    umask(mask)
    assert current_umask() == mask
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    with open(tmp_path / "plain", "w"):
        pass
    want = 0o666 & ~mask
    for name in ("a.bin", "m.json", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
    assert current_umask() == mask  # reading it did not change it
