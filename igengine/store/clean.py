"""Removing a finished run's chunks once ``samples.npz`` is verified, and rebuilding them from it.

A finished 50,000-sample run at 256x256 holds its pixels twice: 9.8 GB of chunks and a 9.8 GB
``samples.npz``. ``igengine sample --no-keep-chunks`` (or ``igengine pack --clean``) removes the chunk
files, and only after all of this has held:

  1. ``samples.npz`` (and the latents ``.npy``, when the chunks hold latents) was written to a temporary
     name, fsynced, renamed and its folder fsynced (``igengine.store.atomic``);
  2. while it was packed, the sha256 of every member's data was taken from the bytes read out of the
     chunks (each chunk member read to its end, so zipfile checked its CRC-32);
  3. the file was read back from the disk (its cached pages dropped first, where the OS allows) and the
     sha256 of every member (again CRC- and length-checked), its shape and dtype equal those of step 2;
  4. the chunk folder holds no chunk that ``samples.npz`` lacks (a longer last chunk kept from an earlier,
     larger ``n`` keeps every chunk, with a note);
  5. ``removed.json`` was written into the chunk folder (atomically) saying what was removed and what
     now holds it: ``n``, and for each packed file its path, size, mtime and member sha256s.

Only then are the chunk data files (``<start>-<last>.npz``) deleted; their small ``.how.json`` and
``.png-done`` records stay, so the manifest's ``computed_by`` and the PNG bookkeeping still work.

The run stays resumable and growable (``n`` may grow later):
  * the same ``n`` again: nothing to compute; ``samples.npz`` is the run's record (``covers``);
  * a larger ``n``: each rank first rebuilds, from ``samples.npz`` (and the latents file), the chunk files
    of the earlier run that its block needs (``restore_chunks``: rows read at their offsets in the
    stored, uncompressed members), then the run goes on as if the chunks had been kept: the short last
    chunk is completed, the new chunks are computed, ``samples.npz`` is packed again;
  * a smaller ``n`` is refused: packing the first n would replace the only copy of the others.
A rebuild uses the packed files only while they are those ``removed.json`` describes: the same size and
mtime, or, where the mtime changed (a copy), the same member sha256s (read in full once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import time
import zipfile
from pathlib import Path

import numpy as np

from igengine.errors import OutputError, PackError
from igengine.store.atomic import atomic_write_json
from igengine.store.chunks import Chunk, ChunkPlan, ChunkStore
from igengine.store.manifest import MANIFEST, SAMPLES
from igengine.store.npzstream import PIECE, NpzFormatError, copy_member

REMOVED = "removed.json"
_CHUNK_NAME = re.compile(r"^\d{8}-\d{8}\.npz$")


class _Digest:
    """A sink for ``copy_member`` that only hashes (sha256) the member's data bytes."""

    def __init__(self):
        self.hash = hashlib.sha256()

    def write_bytes(self, data) -> None:
        self.hash.update(data)


def _drop_cached_pages(path: Path) -> None:
    """Ask the OS to forget the file's cached pages, so that the next read comes from the disk (best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def npz_digests(path: Path, members: list[str]) -> dict[str, dict]:
    """For each member: sha256 of its data, shape and dtype, read to its end (length and CRC-32 checked)."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in members:
            digest = _Digest()
            shape, dtype = copy_member(zf, name, digest)
            out[name] = {"sha256": digest.hash.hexdigest(), "shape": list(shape), "dtype": dtype.str}
    return out


def npy_digest(path: Path) -> dict:
    """sha256 of a ``.npy`` file's data, its shape and dtype (the data read in full)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        seen = 0
        while piece := f.read(PIECE):
            digest.update(piece)
            seen += len(piece)
    if seen != need:
        raise NpzFormatError(f"{path} holds {seen} bytes of data, its shape {tuple(shape)} needs {need}")
    return {"sha256": digest.hexdigest(), "shape": list(shape), "dtype": dtype.str}


def _packed_files(folder: Path, layout) -> dict[str, Path]:
    """The files a pack wrote for this run (``layout``: its ``igengine.store.pack.BulkLayout``):
    {"samples": samples.npz, "latents": the .npy}, those it has."""
    files = {}
    if layout.pixels:
        files["samples"] = folder / SAMPLES
    if layout.latents and layout.latents_path:
        latents = Path(layout.latents_path)
        files["latents"] = latents if latents.is_absolute() else folder / latents
    return files


def _describe(path: Path, folder: Path, digests) -> dict:
    """A packed file for ``removed.json``: its path (relative to the output folder when inside it, so the
    folder can be moved or copied), size, mtime and member digests."""
    st = path.stat()
    try:
        shown = str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        shown = str(path.resolve())
    return {"path": shown, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "members": digests}


def _read_back(kind: str, path: Path) -> dict:
    _drop_cached_pages(path)
    return npz_digests(path, ["arr_0", "labels"]) if kind == "samples" else npy_digest(path)


def remove_chunks(folder: Path, manifest: dict, layout, log=lambda line: None) -> dict:
    """Remove the chunk files of the packed run in ``folder`` once its packed files are verified (module
    docstring). ``manifest``: the one ``pack_folder(..., digest=True)`` returned (its ``outputs.sha256`` are
    the digests taken from the chunks); ``layout``: the run's ``BulkLayout``. Returns the manifest with
    ``chunks_removed`` (written to disk); with the chunks kept instead (they hold samples the packed files
    lack), ``chunks_kept`` says why. Raises PackError, removing nothing, when a packed file does not read
    back as it was written."""
    folder = Path(folder)
    store = layout.store(folder)
    written = (manifest.get("outputs") or {}).get("sha256")
    if not written:
        raise PackError(f"{folder / MANIFEST} records no sha256 of the packed files: pack with digests first")
    plan = set(layout.plan.chunks)
    names = [p.name for p in store.folder.iterdir() if _CHUNK_NAME.match(p.name)]
    extra = sorted(n for n in names if Chunk.from_name(n) not in plan)
    manifest = dict(manifest)
    files = _packed_files(folder, layout)
    if extra:
        packed = " and ".join(p.name for p in files.values())
        why = (f"chunks kept: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} in {store.folder} "
               f"hold{'s' if len(extra) == 1 else ''} samples that the packed {packed} lack (kept for a later, "
               "larger `n`)")
        manifest["chunks_kept"] = why
        manifest.pop("chunks_removed", None)
        atomic_write_json(folder / MANIFEST, manifest)
        log(why)
        return manifest
    t0 = time.perf_counter()
    record_files = {}
    for kind, path in files.items():
        read = _read_back(kind, path)
        expected = written[kind]
        if read != expected:
            raise PackError(f"{path} does not read back as it was written (sha256 of its data differs from the "
                            "chunks'); the chunks are kept: run `igengine pack` again")
        record_files[kind] = _describe(path, folder, read)
    sizes = [store.path(c).stat().st_size for c in layout.plan.chunks if store.path(c).exists()]
    record = {"n": layout.n, "chunk_size": layout.chunk_size, "files": record_files,
              "removed": {"chunks": len(sizes), "bytes": int(sum(sizes))},
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "verified": "each packed file read back from the disk: the sha256 of every member's data equals "
                          "that of the bytes read out of the chunks (CRC-32 checked), shapes and dtypes too",
              "rebuild": "a run of the same `n` finds them complete; a larger `n` rebuilds the chunks from these "
                         "files first; a smaller `n` is refused"}
    atomic_write_json(store.folder / REMOVED, record)  # before any chunk goes: the record of where they are
    for c in layout.plan.chunks:
        store.path(c).unlink(missing_ok=True)
    record["verify_s"] = round(time.perf_counter() - t0, 3)
    manifest["chunks_removed"] = record
    manifest.pop("chunks_kept", None)
    atomic_write_json(folder / MANIFEST, manifest)
    log(f"removed {len(sizes)} chunk file(s) ({sum(sizes) / 1e9:.2f} GB) from {store.folder} after reading "
        f"{', '.join(p.name for p in files.values())} back from the disk and checking it against them (sha256); "
        "the same `n` later finds the run complete, a larger `n` rebuilds them first")
    return manifest


def read_removed(store: ChunkStore) -> dict | None:
    """The ``removed.json`` record of a chunk folder, None where there is none (chunks kept); the packed files'
    paths resolved against the output folder (``store.folder`` is ``OUT/chunks/<run>``)."""
    path = store.folder / REMOVED
    if not path.is_file():
        return None
    out = store.folder.parent.parent
    try:
        record = json.loads(path.read_text())
        int(record["n"]), int(record["chunk_size"])
        record["files"] = {kind: {**f, "path": str(out / f["path"])} for kind, f in dict(record["files"]).items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{path} cannot be read ({e}): it records where the removed chunks of this run are; "
                          "restore it, or start the run again in another folder") from None
    return record


def packed_files_match(record: dict) -> str | None:
    """Why the files ``removed.json`` names are not the ones it describes (None: they are): missing, another
    size, or, where only the mtime changed, other contents (their member sha256s, read in full)."""
    for kind, want in record["files"].items():
        path = Path(want["path"])
        try:
            st = path.stat()
        except OSError:
            return f"{path} is missing"
        if st.st_size != want["size"]:
            return f"{path} has changed since (size {st.st_size}, was {want['size']})"
        if st.st_mtime_ns != want["mtime_ns"] and _read_back(kind, path) != want["members"]:
            return f"{path} has changed since (its data's sha256 differs)"
    return None


def _stored_member_offset(f, zf: zipfile.ZipFile, name: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(offset of the first data byte in the file, shape, dtype) of an uncompressed ``.npy`` member."""
    info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise NpzFormatError(f"member {name!r} is compressed; igengine's samples.npz never is")
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise NpzFormatError(f"member {name!r}: no local file header at {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
    if fortran:
        raise NpzFormatError(f"member {name!r} is stored in Fortran order")
    return f.tell(), tuple(shape), np.dtype(dtype)


def _rows(f, offset: int, shape: tuple[int, ...], dtype: np.dtype, start: int, stop: int) -> np.ndarray:
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    f.seek(offset + start * row)
    data = f.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise NpzFormatError(f"rows {start}..{stop - 1} run past the end of the data")
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]).copy()


def restore_chunks(store: ChunkStore, chunks, record: dict, labels: np.ndarray, checked: bool = False) -> list[Chunk]:
    """Rebuild, from the packed files ``record`` (``removed.json``) names, the chunk files of the earlier run
    (``record["n"]`` samples) that start where ``chunks`` (a rank's block of the new plan) start and are not
    there; returns those written. The packed files must be those the record describes (``packed_files_match``;
    ``checked``: the caller has just made sure), and each chunk's labels must equal ``labels`` (this run's,
    int64 [n]) on their common indices; else OutputError says which, and that chunk is not written."""
    old = {c.start: c for c in ChunkPlan(int(record["n"]), int(record["chunk_size"])).chunks}
    # An earlier chunk of the same start, where neither it nor the new chunk is there (one already rebuilt,
    # completed or computed is left alone).
    wanted = [old[c.start] for c in chunks
              if c.start in old and not store.path(old[c.start]).exists() and not store.path(c).exists()]
    if not wanted:
        return []
    if not checked and (why := packed_files_match(record)) is not None:
        raise OutputError(f"the chunks of this run were removed after packing (`keep_chunks` off) and cannot be "
                          f"rebuilt: {why}; put the packed file back, or start the run again in another `out`")
    files = record["files"]
    needs = store.spec.members()
    if ("arr_0" in needs and "samples" not in files) or ("latents" in needs and "latents" not in files):
        return []  # this run keeps what the earlier one did not pack (e.g. latents): computed again, as kept chunks are
    written = []
    with open(files["samples"]["path"], "rb") if "samples" in files else contextlib.nullcontext() as fs, \
            open(files["latents"]["path"], "rb") if "latents" in files else contextlib.nullcontext() as fl:
        pix = lab = lat = None
        if fs is not None:
            with zipfile.ZipFile(fs) as zf:
                pix, lab = _stored_member_offset(fs, zf, "arr_0"), _stored_member_offset(fs, zf, "labels")
        if fl is not None:
            fl.seek(0)
            version = np.lib.format.read_magic(fl)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(fl) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(fl))
            lat = (fl.tell(), tuple(shape), np.dtype(dtype))
        for c in wanted:
            pixels = _rows(fs, *pix, c.start, c.stop) if pix else None
            stored = _rows(fs, *lab, c.start, c.stop) if lab else labels[c.start:c.stop]
            latents = _rows(fl, *lat, c.start, c.stop) if lat else None
            common = min(c.stop, len(labels))
            if not np.array_equal(stored[:common - c.start], labels[c.start:common]):
                raise OutputError(f"{files['samples']['path']} holds other labels for samples {c.start}..{common - 1} "
                                  "than this run's: it is not this run's packed file; the chunks cannot be rebuilt")
            store.write(c, stored.astype(np.int64), pixels, latents)
            written.append(c)
    return written


def clear_removed(store: ChunkStore) -> bool:
    """Delete ``removed.json`` once the chunks are the record again (a grown run packed with them kept)."""
    path = store.folder / REMOVED
    if path.exists():
        path.unlink()
        return True
    return False


__all__ = ["REMOVED", "clear_removed", "npy_digest", "npz_digests", "packed_files_match", "read_removed",
           "remove_chunks", "restore_chunks"]
