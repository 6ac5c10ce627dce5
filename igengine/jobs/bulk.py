"""Bulk sampling: compute this rank's chunks (resuming), then, on rank 0, wait for the rest and pack.

Data flows one way: sampler (``igengine.sampling.Sampler``) -> decoder (``igengine.vae``) -> uint8 pixels
(``igengine.vae.pixels``) -> chunk files (``igengine.store.chunks``) -> ``samples.npz`` (``igengine.store.pack``).

Per rank:
  1. For each chunk of its block (``ChunkPlan.for_rank``): a chunk file that passes the full check
     (members, shapes, CRC-32, labels) is kept; a missing one is computed; a damaged one is computed
     again, with a note. Batches never straddle chunks, so a chunk's numbers do not depend on which
     rank computes it or on the world size.
  2. Rank 0 then polls the chunk folder until every chunk of the plan is there (no collective, no
     timeout: a rank waiting on files cannot make another rank's NCCL call expire), packs the
     outputs and writes the final manifest. The other ranks exit when their block is done.

How each chunk was computed (the sampler's loop, noise generator and network, and the fallbacks that
put the sampler there: ``igengine.sampling.Sampler``'s ladder) is written beside it, in
``<chunk>.how.json``, before the chunk itself, whichever rank computes it and in whichever session;
rank 0 gathers them into the manifest's ``computed_by`` (``BulkSampler.computed_by``).
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igengine.config import Family
from igengine.errors import OutputError
from igengine.jobs.launch import RankInfo
from igengine.sampling import Sampler
from igengine.store.atomic import atomic_write_bytes, atomic_write_json, png_bytes
from igengine.store.chunks import Chunk, ChunkPlan, ChunkStore, coalesce
from igengine.store.preview import png_path
from igengine.vae import LatentDecoder
from igengine.vae.pixels import to_uint8

WAIT_LOG_EVERY_S = 60.0


@dataclass
class Progress:
    """Callbacks for the CLI's display. ``advance`` gets the number of samples of the whole run
    that are complete (rank 0) or of this rank's block (other ranks); ``log`` gets one line per chunk."""

    start: Callable[[int, int], None] = lambda total, initial: None
    advance: Callable[[int], None] = lambda done: None
    finish: Callable[[], None] = lambda: None
    log: Callable[[str], None] = lambda line: None


@dataclass
class RankReport:
    computed: int = 0  # samples computed by this process
    reused: int = 0  # samples of this rank's block already complete at start
    initial_done: int = 0  # samples of the whole run complete at start (rank 0's view)
    notes: list[str] = field(default_factory=list)


class SampleMaker:
    """Sample indices -> (latents float32 [m, C, h, w], pixels uint8 [m, H, W, 3] or None), as numpy.

    Labels come from the run's full label vector (int64 [n]); pixels are made only when ``pixels``
    is set: through ``decoder`` for latent models, directly for pixel-space models.
    """

    def __init__(self, sampler: Sampler, seed: int, labels: torch.Tensor, decoder: LatentDecoder | None,
                 family: Family, pixels: bool):
        self.sampler, self.seed, self.labels = sampler, seed, labels
        self.decoder, self.family, self.pixels = decoder, family, pixels
        self.last: dict | None = None  # how the last batch was computed (``how``)

    def how(self) -> dict:
        """How the sampler computes now: its loop ('step'), noise generator, network and, once it has
        fallen back, why (every fallback so far, in order)."""
        s = self.sampler
        record = {"step": s.path, "noise_generator": s.generator, "network": getattr(s.net, "name", None)}
        if s.fallbacks:
            record["why"] = [f.message for f in s.fallbacks]
        return record

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        idx = torch.from_numpy(indices)
        x = self.sampler(self.seed, idx, self.labels[idx])  # (m, C, h, w) float32
        self.last = self.how()
        pixels = None
        if self.pixels:
            images = self.decoder.decode(x) if self.decoder is not None else x
            pixels = to_uint8(images, self.family)
        return x.cpu().numpy(), pixels


def compute_chunk(chunk: Chunk, make: SampleMaker, batch_size: int, on_batch: Callable[[int], None],
                  how: list[dict] | None = None):
    """(latents, pixels) of one chunk, computed in batches that start at the chunk's first index.

    how: if given, gets one entry per batch, {"indices": [start, stop], **make.last} (see ``merge_how``).
    """
    lat_parts, pix_parts = [], []
    for s in range(chunk.start, chunk.stop, batch_size):
        stop = min(chunk.stop, s + batch_size)
        lat, pix = make(np.arange(s, stop, dtype=np.int64))
        if how is not None and getattr(make, "last", None) is not None:
            how.append({"indices": [s, stop], **make.last})
        lat_parts.append(lat)
        if pix is not None:
            pix_parts.append(pix)
        on_batch(lat.shape[0])
    return np.concatenate(lat_parts), (np.concatenate(pix_parts) if pix_parts else None)


def merge_how(entries: list[dict]) -> list[dict]:
    """Entries {"indices": [start, stop], ...} sorted, with neighbours that say the same merged."""
    out: list[dict] = []
    for e in sorted(entries, key=lambda e: e["indices"][0]):
        rest = {k: v for k, v in e.items() if k != "indices"}
        if out and out[-1]["indices"][1] == e["indices"][0] and {k: v for k, v in out[-1].items()
                                                                 if k != "indices"} == rest:
            out[-1] = {**out[-1], "indices": [out[-1]["indices"][0], e["indices"][1]]}
        else:
            out.append({"indices": list(e["indices"]), **rest})
    return out


def write_pngs(png_dir: Path, store: ChunkStore, chunk: Chunk, pixels: np.ndarray) -> None:
    """PNGs of a chunk's samples (``png/<index // 1000:06d>/<index:06d>.png``, ``igengine.store.preview``),
    then the chunk's ``.png-done`` marker.

    The marker lives in the run's chunk folder, so PNGs left by a different run (``--overwrite``)
    are never taken for this run's.
    """
    for i, img in zip(chunk.indices(), pixels):
        path = png_path(png_dir, int(i))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, png_bytes(img))
    _png_marker(store, chunk).touch()


def _png_marker(store: ChunkStore, chunk: Chunk) -> Path:
    return store.folder / f"{chunk.name}.png-done"


def how_path(store: ChunkStore, chunk: Chunk) -> Path:
    """``<start>-<last>.how.json``: how a chunk's samples were computed (``merge_how`` entries)."""
    return store.folder / f"{chunk.name.removesuffix('.npz')}.how.json"


def read_how(store: ChunkStore, chunk: Chunk) -> list[dict] | None:
    """A chunk's ``how`` entries, None where it has none (written by an earlier igengine) or it is unreadable."""
    try:
        entries = json.loads(how_path(store, chunk).read_text())["computed_by"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entries if isinstance(entries, list) else None


def _unrecorded(chunk: Chunk) -> list[dict]:
    return [{"indices": [chunk.start, chunk.stop], "step": None,
             "note": "computed by an igengine that did not record how"}]


def _eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class BulkSampler:
    """Runs one rank's share of a chunked run. ``run_rank`` then (rank 0) ``wait_for_all``."""

    def __init__(self, store: ChunkStore, plan: ChunkPlan, rank: RankInfo, labels: np.ndarray,
                 make: SampleMaker, batch_size: int, keep_latents: bool, png_dir: Path | None,
                 progress: Progress, poll_s: float = 1.0, started: float | None = None):
        self.store, self.plan, self.rank, self.labels = store, plan, rank, labels
        self.make, self.batch_size, self.keep_latents, self.png_dir = make, batch_size, keep_latents, png_dir
        self.progress = progress
        self.poll_s = poll_s
        self.mine = plan.for_rank(rank.rank, rank.world_size)
        self._mine_set = set(self.mine)
        self.report = RankReport()
        self._own_done = 0  # samples of this rank's block complete (kept + computed so far)
        self._t0 = time.perf_counter()
        # Other ranks' chunks written before this process started are "already complete".
        self._started = time.time() if started is None else started

    # -- progress -------------------------------------------------------------------------------
    def _others_present(self, before: float | None = None) -> int:
        """Samples in other ranks' chunk files that exist now (rank 0's whole-run count); with
        ``before`` (a time.time()), only files written before then. A chunk file exists only once it is
        complete (written under a temporary name, then renamed), so existing is being done."""
        count = 0
        for c in self.plan.chunks:
            if c in self._mine_set:
                continue
            try:
                written = self.store.path(c).stat().st_mtime
            except OSError:  # not written yet
                continue
            if before is None or written < before:
                count += c.size
        return count

    def _done(self) -> int:
        return self._own_done + (self._others_present() if self.rank.is_main else 0)

    def _total(self) -> int:
        return self.plan.n if self.rank.is_main else sum(c.size for c in self.mine)

    def _rate_eta(self, done: int) -> tuple[float, float]:
        dt = time.perf_counter() - self._t0
        rate = (done - self.report.initial_done) / dt if dt > 0 else 0.0
        eta = (self._total() - done) / rate if rate > 0 else float("inf")
        return rate, eta

    def _note(self, text: str) -> None:
        self.report.notes.append(text)
        self.progress.log(f"{self.rank}: {text}" if self.rank.world_size > 1 else text)

    # -- this rank's chunks ---------------------------------------------------------------------
    def run_rank(self) -> RankReport:
        removed = self.store.remove_temp_files(self.mine)
        if removed:
            self._note(f"removed {len(removed)} temporary file(s) left by an interrupted run")
        todo: list[tuple[Chunk, Chunk | None]] = []  # (chunk, the shorter file of an earlier n it completes)
        for chunk in self.mine:
            problem = self.store.problem(chunk, labels=self.labels[chunk.start:chunk.stop], full=True)
            if problem is None:
                self._own_done += chunk.size
                self.report.reused += chunk.size
                if self.png_dir is not None and not _png_marker(self.store, chunk).exists():
                    with np.load(self.store.path(chunk)) as data:
                        self._guard(chunk, lambda: write_pngs(self.png_dir, self.store, chunk, data["arr_0"]))
                continue
            if problem != "missing":
                self._note(f"chunk {chunk.name} is damaged ({problem}): computing it again")
            relative = self._relative(chunk) if problem == "missing" else None
            if relative is not None and relative.stop > chunk.stop:  # a larger n before: its first samples
                self._take_prefix(chunk, relative)
            else:
                if relative is not None:
                    self._own_done += relative.size
                    self.report.reused += relative.size
                todo.append((chunk, relative))
        self.report.initial_done = self._own_done + (self._others_present(self._started) if self.rank.is_main else 0)
        self.progress.start(self._total(), self.report.initial_done)
        for k, (chunk, shorter) in enumerate(todo):
            t_chunk = time.perf_counter()
            rest = Chunk(shorter.stop, chunk.stop) if shorter is not None else chunk
            how: list[dict] = []
            latents, pixels = compute_chunk(rest, self.make, self.batch_size, self._on_batch, how)
            if shorter is not None:  # the earlier, smaller run's samples, then the new ones
                kept = self.store.read(shorter)
                latents = np.concatenate([kept["latents"], latents]) if self.keep_latents else latents
                pixels = np.concatenate([kept["arr_0"], pixels]) if pixels is not None else None
                how = (read_how(self.store, shorter) or _unrecorded(shorter)) + how
            self._write_how(chunk, how)
            self._write(chunk, latents, pixels)
            if shorter is not None:
                self._remove_stale(shorter, chunk)
            self.report.computed += rest.size
            self._log_chunk(chunk, k + 1, len(todo), time.perf_counter() - t_chunk)
        return self.report

    # -- chunks of the same run with another n ----------------------------------------------------
    def _relative(self, chunk: Chunk) -> Chunk | None:
        """A valid chunk file of this run's configuration with another ``n`` that starts where ``chunk``
        does (its labels agree on their common indices), or None."""
        for other in self.store.relatives(chunk):
            common = min(other.stop, chunk.stop)
            if self.store.problem(other, labels=self.labels[other.start:common], full=True) is None:
                return other
        return None

    def _take_prefix(self, chunk: Chunk, longer: Chunk) -> None:
        """Write ``chunk`` from the first samples of ``longer`` (left by a run with a larger ``n``), which stays."""
        part = self.store.read(longer, rows=chunk.size)
        how = [{**e, "indices": [e["indices"][0], min(e["indices"][1], chunk.stop)]}
               for e in (read_how(self.store, longer) or _unrecorded(longer)) if e["indices"][0] < chunk.stop]
        self._write_how(chunk, how)
        self._write(chunk, part.get("latents"), part.get("arr_0"))
        self._own_done += chunk.size
        self.report.reused += chunk.size
        self._note(f"chunk {longer.name} of an earlier run with a larger n holds samples {chunk.start}..{chunk.stop - 1}: "
                   f"took its first {chunk.size} for {chunk.name} (the longer file is kept for a later, larger n)")

    def _remove_stale(self, shorter: Chunk, chunk: Chunk) -> None:
        """Delete the shorter files of earlier, smaller ``n`` (``shorter`` among them) once ``chunk`` holds
        their samples and more."""
        stale = [c for c in self.store.relatives(chunk) if c.stop < chunk.stop]
        for c in stale:
            for path in (self.store.path(c), _png_marker(self.store, c), how_path(self.store, c)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        others = f"; {len(stale) - 1} other shorter file(s) of the same start removed too" if len(stale) > 1 else ""
        self._note(f"chunk {shorter.name} of an earlier run with a smaller n was completed to {chunk.name} "
                   f"({chunk.stop - shorter.stop} new samples computed, {shorter.size} kept) and removed{others}")

    def _on_batch(self, m: int) -> None:
        self._own_done += m
        self.progress.advance(self._done())

    def _write(self, chunk: Chunk, latents: np.ndarray, pixels: np.ndarray | None) -> None:
        labels = self.labels[chunk.start:chunk.stop]
        self._guard(chunk, lambda: self.store.write(chunk, labels, pixels, latents if self.keep_latents else None))
        if self.png_dir is not None:
            self._guard(chunk, lambda: write_pngs(self.png_dir, self.store, chunk, pixels))

    def _write_how(self, chunk: Chunk, how: list[dict]) -> None:
        """The chunk's ``how.json``, written before the chunk: a chunk file never lacks the record of
        its computation (a stale one, left by a process killed before its chunk, is overwritten)."""
        if how:
            self._guard(chunk, lambda: atomic_write_json(how_path(self.store, chunk), {"computed_by": merge_how(how)}))

    def computed_by(self) -> list[dict]:
        """How every sample of the run was computed: the ``how.json`` of every chunk of the plan, merged
        into index ranges (``{"indices": [start, stop], "step": ..., "why": [...]}``); chunks without
        one (an earlier igengine's) say ``"step": null``. For rank 0, once every chunk is there."""
        entries = []
        for c in self.plan.chunks:
            entries += read_how(self.store, c) or _unrecorded(c)
        return merge_how(entries)

    def _guard(self, chunk: Chunk, write: Callable[[], None]) -> None:
        """Run a write; turn OSError (disk full, read-only, ...) into one clear OutputError."""
        try:
            write()
        except OSError as e:
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise OutputError(
                f"cannot write chunk {self.store.path(chunk)}: {why}; the chunks written so far are complete "
                "and kept: fix this and rerun the same command to resume"
            ) from None

    def _log_chunk(self, chunk: Chunk, k: int, of: int, dt: float) -> None:
        done = self._done()
        rate, eta = self._rate_eta(done)
        scope = "run" if self.rank.is_main else f"{self.rank}"
        self.progress.log(
            f"{self.rank}: chunk {chunk.name} written ({chunk.size} samples in {dt:.1f} s; {k}/{of} to compute "
            f"here); {scope}: {done}/{self._total()} samples, {rate:.2f} samples/s, ETA {_eta(eta)}"
        )

    # -- rank 0: the others' chunks -------------------------------------------------------------
    def wait_for_all(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll until every chunk of the plan is present and well-formed (headers; pack checks CRCs)."""
        if self.rank.world_size == 1:
            return
        seen: dict[str, tuple[int, int]] = {}
        pending = [c for c in self.plan.chunks if c not in self._mine_set]
        last_log = time.perf_counter()
        while pending:
            still = []
            for c in pending:
                try:
                    st = self.store.path(c).stat()
                except FileNotFoundError:
                    still.append(c)
                    continue
                stamp = (st.st_mtime_ns, st.st_size)
                if seen.get(c.name) != stamp:  # look again only when the file changed
                    seen[c.name] = stamp
                    if self.store.problem(c, full=False) is None:
                        continue
                still.append(c)
            pending = still
            self.progress.advance(self._done())
            if pending:
                if time.perf_counter() - last_log >= WAIT_LOG_EVERY_S:
                    ranges = ", ".join(f"{a}..{b - 1}" for a, b in coalesce(pending)[:6])
                    self.progress.log(f"{self.rank}: waiting for {len(pending)} chunk(s) of the other ranks: {ranges}")
                    last_log = time.perf_counter()
                sleep(self.poll_s)


__all__ = ["BulkSampler", "Progress", "RankReport", "SampleMaker", "compute_chunk", "how_path", "merge_how",
           "read_how"]
