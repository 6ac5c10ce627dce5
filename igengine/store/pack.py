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


def _copy_all(store: ChunkStore, chunks: tuple[Chunk, ...], member: str, sink) -> None:
    for c in chunks:
        path = store.path(c)
        try:
            with zipfile.ZipFile(path) as zf:
                copy_member(zf, member, sink)
        except (zipfile.BadZipFile, NpzFormatError, EOFError) as e:
            raise PackError(f"chunk {path} is damaged ({e}): rerun the same `igengine sample` command, which "
                            "checks every chunk and recomputes damaged ones, then pack again") from None


def pack(store: ChunkStore, plan: ChunkPlan, samples: Path | None, latents: Path | None) -> dict:
    """Write ``samples`` (.npz) and/or ``latents`` (.npy) from the chunks; returns timing facts."""
    check_complete(store, plan)
    chunks = plan.chunks
    t0 = time.perf_counter()
    if samples is not None:
        h, w, c = store.spec.pixels
        with atomic_writer(samples) as f, NpzWriter(f) as npz:
            with npz.member("arr_0", np.uint8, (plan.n, h, w, c)) as sink:
                _copy_all(store, chunks, "arr_0", sink)
            with npz.member("labels", np.int64, (plan.n,)) as sink:
                _copy_all(store, chunks, "labels", sink)
    if latents is not None:
        latents.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(latents) as f:
            sink = start_npy(f, "latents", np.float32, (plan.n, *store.spec.latents))
            _copy_all(store, chunks, "latents", sink)
            sink.check_complete()
    return {"pack_s": round(time.perf_counter() - t0, 3)}


def pack_folder(folder: Path, manifest: dict | None = None) -> dict:
    """Pack the chunked run in ``folder`` (its manifest says how) and write the final manifest.

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
    timing = pack(layout.store(folder), layout.plan, samples, latents)
    manifest = dict(manifest)
    manifest["status"] = "complete"
    manifest["complete"] = [[0, layout.n]]
    manifest["timing"] = {**manifest.get("timing", {}), **timing}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def pack_command(folder: Path) -> dict:
    """`igengine pack DIR`: take the folder's rank-0 lock (as a sampling run's rank 0 does), then pack."""
    from igengine.store.locks import rank_lock

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise PackError(f"{folder} has no {MANIFEST}: it is not the output folder of `igengine sample`")
    with rank_lock(folder):
        return pack_folder(folder)


__all__ = ["BulkLayout", "PackError", "check_complete", "pack", "pack_command", "pack_folder"]
