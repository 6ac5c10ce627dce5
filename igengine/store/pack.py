"""Assemble the final outputs of a chunked run by streaming its chunks in index order.

``samples.npz`` (``arr_0`` uint8 [n, H, W, 3], ``labels`` int64 [n]: the ADM evaluator's format)
and, when the run keeps latents, a ``.npy`` of float32 [n, C, h, w] are written member by member
(``igengine.store.npzstream``): memory stays at a few pieces of ``npzstream.PIECE`` bytes whatever n is.
Both go to temporary names and are renamed when complete.

Before anything is written, every chunk of the plan must be present with the expected members and
shapes: every index 0..n-1 is then covered exactly once. A chunk whose data fails its CRC-32 check
while being copied stops the pack with its name; rerunning the sampling command recomputes it
(its resume check reads every chunk in full).
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igengine.store.chunks import Chunk, ChunkPlan, ChunkSpec, ChunkStore, coalesce
from igengine.store.npzstream import NpzFormatError, NpzWriter, copy_member, start_npy
from igengine.errors import PackError
from igengine.store.atomic import atomic_write_json, atomic_writer
from igengine.store.manifest import MANIFEST, SAMPLES, read_manifest


@dataclass(frozen=True)
class BulkLayout:
    """Where a chunked run keeps its chunks and what it assembles: the manifest's ``bulk`` record."""

    n: int
    chunk_size: int
    chunks_dir: str  # relative to the output folder
    pixels: tuple[int, int, int] | None  # (H, W, 3): samples.npz is written
    latents: tuple[int, int, int] | None  # (C, h, w): the latents are kept in the chunks
    latents_path: str | None  # where the assembled latents go (.npy), when kept

    @property
    def plan(self) -> ChunkPlan:
        return ChunkPlan(self.n, self.chunk_size)

    def store(self, folder: Path) -> ChunkStore:
        return ChunkStore(Path(folder) / self.chunks_dir, ChunkSpec(self.pixels, self.latents))

    def to_dict(self) -> dict:
        return {"n": self.n, "chunk_size": self.chunk_size, "chunks_dir": self.chunks_dir,
                "pixels": list(self.pixels) if self.pixels else None,
                "latents": list(self.latents) if self.latents else None, "latents_path": self.latents_path}

    @classmethod
    def from_dict(cls, d: dict) -> "BulkLayout":
        return cls(n=int(d["n"]), chunk_size=int(d["chunk_size"]), chunks_dir=str(d["chunks_dir"]),
                   pixels=tuple(d["pixels"]) if d.get("pixels") else None,
                   latents=tuple(d["latents"]) if d.get("latents") else None, latents_path=d.get("latents_path"))


def check_complete(store: ChunkStore, plan: ChunkPlan) -> None:
    """Raise PackError listing the missing index ranges and the malformed chunks, if any."""
    problems = {c: store.problem(c, full=False) for c in plan.chunks}
    missing = [c for c, p in problems.items() if p == "missing"]
    bad = [(c, p) for c, p in problems.items() if p not in (None, "missing")]
    if not missing and not bad:
        return
    parts = []
    if missing:
        ranges = coalesce(missing)
        shown = ", ".join(f"{a}..{b - 1}" for a, b in ranges[:8]) + (" ..." if len(ranges) > 8 else "")
        parts.append(f"{sum(c.size for c in missing)} of {plan.n} indices are missing ({shown})")
    for c, p in bad[:4]:
        parts.append(f"chunk {c.name} is damaged: {p}")
    raise PackError(f"cannot pack {store.folder}: " + "; ".join(parts) +
                    " -- rerun the same `igengine sample` command to compute them")


class _Hashed:
    """A member's sink that also takes the sha256 of the data written through it (``pack(..., digest=True)``)."""

    def __init__(self, sink, digests: dict | None, name: str):
        self.sink, self.digests, self.name = sink, digests, name
        self.hash = hashlib.sha256()

    def write_bytes(self, data) -> None:
        self.sink.write_bytes(data)
        self.hash.update(data)

    def record(self) -> None:
        if self.digests is not None:
            self.digests[self.name] = {"sha256": self.hash.hexdigest(), "shape": list(self.sink.shape),
                                       "dtype": self.sink.dtype.str}


def _copy_all(store: ChunkStore, chunks: tuple[Chunk, ...], member: str, sink) -> None:
    for c in chunks:
        path = store.path(c)
        try:
            with zipfile.ZipFile(path) as zf:
                copy_member(zf, member, sink)
        except (zipfile.BadZipFile, NpzFormatError, EOFError) as e:
            raise PackError(f"chunk {path} is damaged ({e}): rerun the same `igengine sample` command, which "
                            "checks every chunk and recomputes damaged ones, then pack again") from None


def pack(store: ChunkStore, plan: ChunkPlan, samples: Path | None, latents: Path | None,
         digest: bool = False) -> dict:
    """Write ``samples`` (.npz) and/or ``latents`` (.npy) from the chunks; returns timing facts and, with
    ``digest``, under "sha256" the sha256, shape and dtype of each member's data as copied out of the chunks
    ({"samples": {"arr_0": ..., "labels": ...}, "latents": ...}; what ``igengine.store.clean`` verifies)."""
    check_complete(store, plan)
    chunks = plan.chunks
    t0 = time.perf_counter()
    digests: dict = {}
    if samples is not None:
        h, w, c = store.spec.pixels
        found: dict | None = {} if digest else None
        with atomic_writer(samples) as f, NpzWriter(f) as npz:
            for name, dtype, shape in (("arr_0", np.uint8, (plan.n, h, w, c)), ("labels", np.int64, (plan.n,))):
                with npz.member(name, dtype, shape) as sink:
                    hashed = _Hashed(sink, found, name)
                    _copy_all(store, chunks, name, hashed)
                hashed.record()
        if found is not None:
            digests["samples"] = found
    if latents is not None:
        latents.parent.mkdir(parents=True, exist_ok=True)
        found = {} if digest else None
        with atomic_writer(latents) as f:
            sink = start_npy(f, "latents", np.float32, (plan.n, *store.spec.latents))
            hashed = _Hashed(sink, found, "latents")
            _copy_all(store, chunks, "latents", hashed)
            sink.check_complete()
        hashed.record()
        if found is not None:
            digests["latents"] = found["latents"]
    return {"pack_s": round(time.perf_counter() - t0, 3), **({"sha256": digests} if digest else {})}


def pack_folder(folder: Path, manifest: dict | None = None, digest: bool = False) -> dict:
    """Pack the chunked run in ``folder`` (its manifest says how) and write the final manifest.

    ``digest``: also record the sha256 of each packed member's data in ``outputs.sha256`` (``pack``), which
    ``igengine.store.clean.remove_chunks`` checks the files against before it removes the chunks.

    The caller holds the folder's rank-0 lock (``igengine.store.locks.rank_lock``): no other process writes these
    outputs, so temporary files found beside them are leftovers of a killed pack and are removed.
    Returns the updated manifest: ``complete`` [[0, n]], ``status`` "complete".
    """
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
        if manifest is None:
            raise PackError(f"{folder} has no {MANIFEST}: it is not the output folder of `igengine sample`")
    if "bulk" not in manifest:
        raise PackError(f"{folder / MANIFEST} has no 'bulk' record: written by an igengine without chunked output")
    layout = BulkLayout.from_dict(manifest["bulk"])
    samples = folder / SAMPLES if layout.pixels else None
    latents = Path(layout.latents_path) if layout.latents_path else None
    if latents is not None and not latents.is_absolute():
        latents = folder / latents
    for target in (samples, latents):  # what a pack killed half-way left behind
        if target is not None:
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                tmp.unlink(missing_ok=True)
    timing = pack(layout.store(folder), layout.plan, samples, latents, digest=digest)
    manifest = dict(manifest)
    manifest["status"] = "complete"
    manifest["complete"] = [[0, layout.n]]
    outputs = {k: v for k, v in manifest.get("outputs", {}).items() if k != "sha256"}  # none of an earlier pack
    manifest["outputs"] = {**outputs, **({"sha256": timing.pop("sha256")} if "sha256" in timing else {})}
    manifest["timing"] = {**manifest.get("timing", {}), **timing}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def pack_command(folder: Path, clean: bool = False, log=lambda line: None) -> dict:
    """`igengine pack DIR [--clean]`: take the folder's rank-0 lock (as a sampling run's rank 0 does), then
    pack; with ``clean``, remove the chunks once the packed files are verified (``igengine.store.clean``).
    A folder whose chunks were removed already is left as it is: its packed files are the record."""
    from igengine.store.clean import packed_files_match, read_removed, remove_chunks
    from igengine.store.locks import rank_lock

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise PackError(f"{folder} has no {MANIFEST}: it is not the output folder of `igengine sample`")
    with rank_lock(folder):
        manifest = read_manifest(folder)
        if "bulk" in manifest:
            layout = BulkLayout.from_dict(manifest["bulk"])
            store = layout.store(folder)
            removed = read_removed(store) if store.folder.is_dir() else None
            if removed is not None and int(removed["n"]) == layout.n:
                if (why := packed_files_match(removed)) is not None:
                    raise PackError(f"the chunks of {folder} were removed after packing and {why}: "
                                    "nothing to pack from")
                if clean:  # chunk files a removal stopped half-way left: the packed files hold them, verified
                    for c in layout.plan.chunks:
                        store.path(c).unlink(missing_ok=True)
                names = ", ".join(Path(f["path"]).name for f in removed["files"].values())
                log(f"nothing to pack: the chunks were removed after {names} was verified against them; it is "
                    "the run's record")
                return manifest
        manifest = pack_folder(folder, digest=clean)
        return remove_chunks(folder, manifest, BulkLayout.from_dict(manifest["bulk"]), log=log) if clean else manifest


__all__ = ["BulkLayout", "PackError", "check_complete", "pack", "pack_command", "pack_folder"]
