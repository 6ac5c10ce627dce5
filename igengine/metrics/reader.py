"""Images from an ``.npz`` member (``arr_0``, uint8 [N, H, W, 3]), read in batches, never all at once.

A 50,000 x 256 x 256 x 3 ``samples.npz`` holds 9.8 GB of pixels; ``np.load(...)["arr_0"]`` would
read all of it. ``NpzImages`` reads the member's ``.npy`` header (a few hundred bytes) to check the
array, then reads ``batch_size`` rows at a time from the zip member (stored or deflated; reading it
to its end makes ``zipfile`` check the CRC-32). A background thread reads the next batch while the
current one is on the device; at most ``prefetch`` batches wait in memory.
"""

from __future__ import annotations

import queue
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from igengine.metrics.errors import MetricsError

IMAGES = "arr_0"


class ImageFormatError(MetricsError):
    """The images member is missing or is not uint8 [N, H, W, 3]."""


def npz_members(path: Path) -> set[str]:
    """Names of the arrays in an ``.npz`` (without ``.npy``); MetricsError if it is not a zip archive."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile:
        raise MetricsError(f"{path} is not an .npz archive (np.savez writes one)") from None


def _read_header(stream, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ImageFormatError(f"{where}: unsupported .npy format version {version}")
    except ValueError as e:
        if isinstance(e, MetricsError):
            raise
        raise ImageFormatError(f"{where}: not a readable .npy member ({e})") from None
    if fortran:
        raise ImageFormatError(f"{where}: stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    return tuple(int(s) for s in shape), np.dtype(dtype)


def check_images(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """uint8, rank 4, 3 channels last; ImageFormatError naming what is wrong otherwise."""
    if len(shape) != 4:
        raise ImageFormatError(f"{where}: images must be uint8 [N, H, W, 3] (NHWC), got rank {len(shape)} "
                               f"shape {shape}")
    if shape[3] != 3:
        hint = "; it looks channels-first (NCHW): transpose to NHWC" if shape[1] == 3 else ""
        raise ImageFormatError(f"{where}: images must have 3 channels last (RGB, NHWC), got shape {shape}{hint}")
    if dtype != np.uint8:
        raise ImageFormatError(f"{where}: images must be uint8 (0..255), got {dtype}; "
                               "convert with np.clip(x, 0, 255).round().astype(np.uint8) from the right range")
    if shape[1] < 1 or shape[2] < 1:
        raise ImageFormatError(f"{where}: empty images, shape {shape}")


class NpzImages:
    """The images of one ``.npz`` member, checked from the header: ``n``, ``height``, ``width``, ``batches()``."""

    def __init__(self, path: Path, member: str = IMAGES):
        self.path = Path(path)
        self.member = member
        where = f"{self.path}:{member}"
        if member not in npz_members(self.path):
            raise ImageFormatError(f"{self.path} has no {member!r} array (images uint8 [N, H, W, 3])")
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{member}.npy") as stream:
            shape, dtype = _read_header(stream, where)
        check_images(shape, dtype, where)
        self.shape = shape
        self.n, self.height, self.width = shape[0], shape[1], shape[2]

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)

    def batches(self, batch_size: int, limit: int | None = None, prefetch: int = 2) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches in index order (b = batch_size, the last one shorter).

        ``limit`` stops after that many images (the member is then not read to its end, so its CRC
        is not checked). With ``prefetch`` > 0 a thread reads ahead, holding at most that many batches.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        total = self.n if limit is None else min(self.n, int(limit))
        if prefetch <= 0:
            yield from self._read(batch_size, total)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for batch in self._read(batch_size, total):
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        thread = threading.Thread(target=work, name="npz-images", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _read(self, batch_size: int, total: int) -> Iterator[np.ndarray]:
        row = self.height * self.width * 3
        where = f"{self.path}:{self.member}"
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.member}.npy") as stream:
                _read_header(stream, where)
                done = 0
                while done < total:
                    b = min(batch_size, total - done)
                    data = _read_exact(stream, b * row)
                    if data is None:
                        raise ImageFormatError(f"{where}: the data ends after {done} images, its header says "
                                               f"{self.n}; the file is truncated")
                    yield np.frombuffer(data, dtype=np.uint8).reshape(b, self.height, self.width, 3)
                    done += b
                if total == self.n and stream.read(1):
                    raise ImageFormatError(f"{where}: more data than its header's {self.n} images")
        except zipfile.BadZipFile as e:
            raise ImageFormatError(f"{where}: damaged archive ({e})") from None


def _read_exact(stream, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            return None
        got += n
    return buf


__all__ = ["IMAGES", "ImageFormatError", "NpzImages", "check_images", "npz_members"]
