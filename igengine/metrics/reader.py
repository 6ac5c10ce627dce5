"""Images for the FID network, read in batches, never all at once: from an ``.npz`` member or a folder.

``NpzImages``: the ``arr_0`` member (uint8 [N, H, W, 3]) of an ``.npz``. A 50,000 x 256 x 256 x 3
``samples.npz`` holds 9.8 GB of pixels; ``np.load(...)["arr_0"]`` would read all of it. The member's
``.npy`` header (a few hundred bytes) is checked first, then ``batch_size`` rows at a time are read
from the zip member (stored or deflated; reading it to its end makes ``zipfile`` check the CRC-32).

``FolderImages``: the PNG and JPEG files under a folder (``.png``, ``.jpg``, ``.jpeg``, any case),
searched recursively (hidden files and folders, whose names start with ".", left out), in the order
of their relative paths sorted component by component: ``igengine sample --png``'s
``png/000000/000000.png`` ... comes back in sample order. Every file's header is read up front (size
and mode, not the pixels), so an unreadable file or a second resolution is reported before any
image goes through the network. Each image is decoded with Pillow and ``Image.convert("RGB")``, as
clean-fid and torch-fidelity do (grayscale replicated, palette looked up, alpha dropped without
compositing); 16- and 32-bit integer and float images are refused, since that conversion would
clip them at 255. EXIF orientation is not applied (nor by those tools).

Both have ``n``, ``height``, ``width``, ``resolution``, ``path`` and ``batches()`` (the ``Images``
protocol that ``igengine.metrics.features.extract`` consumes). A background thread reads the next
batch while the current one is on the device; at most ``prefetch`` batches wait in memory.
"""

from __future__ import annotations

import os
import queue
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from igengine.metrics.errors import MetricsError

IMAGES = "arr_0"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared lower-cased
LOSSY_SUFFIXES = (".jpg", ".jpeg")
# Pillow modes whose samples exceed 8 bits: convert("RGB") clips them at 255.
WIDE_MODES = ("I", "F")


class ImageFormatError(MetricsError):
    """The images member is missing or is not uint8 [N, H, W, 3]; an image file is unreadable or out of line."""


class Images(Protocol):
    """What the feature extractor reads: ``n`` images of ``height`` x ``width``, in uint8 RGB batches."""

    path: Path
    n: int
    height: int
    width: int

    @property
    def resolution(self) -> tuple[int, int]: ...

    def batches(self, batch_size: int, limit: int | None = None, prefetch: int = 2) -> Iterator[np.ndarray]: ...


def prefetched(produce: Callable[[], Iterator[np.ndarray]], prefetch: int, name: str) -> Iterator[np.ndarray]:
    """The items of ``produce()``, made by a background thread that holds at most ``prefetch`` of them.

    An exception in the thread is raised to the consumer; a consumer that stops early (or fails)
    stops the thread. ``prefetch`` <= 0: no thread, ``produce()`` itself.
    """
    if prefetch <= 0:
        yield from produce()
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in produce():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=work, name=name, daemon=True)
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
        return prefetched(lambda: self._read(batch_size, total), prefetch, "npz-images")

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


# ----------------------------------------------------------------------------------------------
# A folder of PNG / JPEG files


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(folder: Path) -> list[str]:
    """Relative POSIX paths of the PNG and JPEG files under ``folder`` (recursive, hidden entries left out),
    sorted component by component ("a/b.png" before "a0.png" before "b.png")."""
    folder = Path(folder)

    def fail(e: OSError) -> None:
        raise ImageFormatError(f"{e.filename}: cannot list the folder ({e.strerror or e})")

    found: list[tuple[str, ...]] = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        rel = Path(root).relative_to(folder).parts
        found += [rel + (f,) for f in files
                  if not _hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    found.sort()
    return ["/".join(parts) for parts in found]


def _other_files(folder: Path) -> tuple[int, str | None]:
    """How many non-hidden files under ``folder`` are not PNG/JPEG, and one of them (for the error)."""
    count, example = 0, None
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for f in sorted(files):
            if not _hidden(f) and os.path.splitext(f)[1].lower() not in IMAGE_SUFFIXES:
                count += 1
                example = example or os.path.relpath(os.path.join(root, f), folder)
    return count, example


def _unreadable(path: Path, e: BaseException) -> ImageFormatError:
    return ImageFormatError(f"{path}: not a readable image ({str(e) or type(e).__name__})")


def _check_mode(path: Path, mode: str) -> None:
    if mode.split(";")[0] in WIDE_MODES:
        raise ImageFormatError(f"{path}: Pillow mode {mode} (more than 8 bits per sample), which "
                               "Image.convert('RGB') would clip at 255; save it as an 8-bit RGB or grayscale image")


def _probe(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header (no pixels decoded); ImageFormatError if unreadable or wide."""
    try:
        with Image.open(path) as im:
            (width, height), mode = im.size, im.mode
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        raise _unreadable(path, e) from None
    _check_mode(path, mode)
    return height, width


def default_workers() -> int:
    """Decoding threads: the usable cores, at most 8 (Pillow's decoders release the GIL)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class FolderImages:
    """The PNG / JPEG images under a folder, checked from their headers: ``n``, ``height``, ``width``, ``batches()``.

    ``files``: their paths relative to the folder, in reading order. ``lossy``: how many are JPEG.
    """

    def __init__(self, path: Path, workers: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ImageFormatError(f"{self.path}: not a folder")
        self.workers = int(workers) if workers else default_workers()
        self.files = find_images(self.path)
        if not self.files:
            count, example = _other_files(self.path)
            others = f" (it has {count} other file(s), e.g. {example})" if count else ""
            raise ImageFormatError(f"{self.path}: no PNG or JPEG images (.png, .jpg, .jpeg, searched in subfolders "
                                   f"too){others}")
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="image-probe")
        try:
            sizes = pool.map(_probe, [self.path / f for f in self.files])
            first = None
            for rel, size in zip(self.files, sizes):
                if first is None:
                    first = (rel, size)
                elif size != first[1]:
                    raise ImageFormatError(
                        f"{self.path}: images of different sizes: {first[0]} is {first[1][0]}x{first[1][1]}, "
                        f"{rel} is {size[0]}x{size[1]}; the images of one set must share one resolution")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self.n = len(self.files)
        self.height, self.width = first[1]
        self.shape = (self.n, self.height, self.width, 3)
        self.lossy = sum(os.path.splitext(f)[1].lower() in LOSSY_SUFFIXES for f in self.files)
        self._file_set: frozenset[str] | None = None

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is one of the images read (to refuse writing an output over one)."""
        try:
            rel = Path(path).resolve().relative_to(self.path.resolve())
        except ValueError:
            return False
        if self._file_set is None:
            self._file_set = frozenset(self.files)
        return rel.as_posix() in self._file_set

    def batches(self, batch_size: int, limit: int | None = None, prefetch: int = 2) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches in ``files`` order (b = batch_size, the last one shorter).

        ``limit`` stops after that many images. Each batch is decoded by ``workers`` threads; with
        ``prefetch`` > 0 a thread makes the batches ahead, holding at most that many.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        total = self.n if limit is None else min(self.n, int(limit))
        return prefetched(lambda: self._read(batch_size, total), prefetch, "folder-images")

    def _read(self, batch_size: int, total: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="image-decode") as pool:
            for start in range(0, total, batch_size):
                names = self.files[start:min(start + batch_size, total)]
                batch = np.empty((len(names), self.height, self.width, 3), dtype=np.uint8)
                for k, pixels in enumerate(pool.map(self._decode, names)):
                    batch[k] = pixels
                yield batch

    def _decode(self, rel: str) -> np.ndarray:
        """uint8 [H, W, 3] of one file: Pillow's ``convert("RGB")``."""
        path = self.path / rel
        try:
            with Image.open(path) as im:
                _check_mode(path, im.mode)
                pixels = np.asarray(im.convert("RGB"))
        except (MemoryError, ImageFormatError):
            raise
        except Exception as e:  # truncated or damaged data shows only now, when the pixels are decoded
            raise _unreadable(path, e) from None
        if pixels.shape != (self.height, self.width, 3):
            raise ImageFormatError(f"{path}: decoded as {pixels.shape[0]}x{pixels.shape[1]}, the folder's images are "
                                   f"{self.height}x{self.width} (was it replaced while being read?)")
        return pixels


__all__ = ["IMAGES", "IMAGE_SUFFIXES", "FolderImages", "ImageFormatError", "Images", "NpzImages", "check_images",
           "default_workers", "find_images", "npz_members", "prefetched"]
