"""Streaming ``.npz`` files: write and read ``.npy`` members piece by piece, never a whole array.

An ``.npz`` is a zip archive of ``.npy`` members, stored uncompressed (what ``np.savez`` writes and
what the ADM evaluator opens with ``zipfile`` + ``numpy.lib.format``). ``NpzWriter`` writes each
member's header from the final shape, then its rows as they arrive, so a 50,000 x 256 x 256 x 3
``samples.npz`` (9.8 GB) is assembled in constant memory. Members are zip64 (``force_zip64``) since
their size may exceed 4 GiB; ``np.load`` reads the result like any ``np.savez`` file.

Reading (``scan_member`` / ``copy_member``) goes through the member's bytes in ``PIECE``-sized
pieces; reading a member to its end makes ``zipfile`` check its CRC-32, so a flipped bit raises
``zipfile.BadZipFile`` instead of passing unnoticed.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

PIECE = 8 << 20  # bytes per read/write piece: bounds the memory of scanning and copying


class NpzFormatError(ValueError):
    """A member is missing or its header does not describe the expected array."""


class MemberSink:
    """The open data section of one ``.npy`` member: accepts rows (``write``) or raw bytes (``write_bytes``)."""

    def __init__(self, stream, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self._stream = stream
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.written = 0

    def write(self, rows: np.ndarray) -> None:
        """Append rows: an array of dtype ``self.dtype`` and shape (k, *self.shape[1:])."""
        if rows.dtype != self.dtype or tuple(rows.shape[1:]) != tuple(self.shape[1:]):
            raise NpzFormatError(
                f"{self.name}: rows of {rows.dtype} {tuple(rows.shape)} do not fit {self.dtype} {self.shape}"
            )
        self.write_bytes(memoryview(np.ascontiguousarray(rows)).cast("B"))

    def write_bytes(self, data) -> None:
        n = memoryview(data).nbytes
        if self.written + n > self.expected_bytes:
            raise NpzFormatError(f"{self.name}: more data than its shape {self.shape} holds")
        self._stream.write(data)
        self.written += n

    def check_complete(self) -> None:
        if self.written != self.expected_bytes:
            raise NpzFormatError(f"{self.name}: {self.written} bytes written, its shape {self.shape} "
                                 f"needs {self.expected_bytes}")


def start_npy(stream, name: str, dtype, shape: tuple[int, ...]) -> MemberSink:
    """Write a ``.npy`` header (version 1.0, C order) to ``stream``; returns the sink for its data."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)
    return MemberSink(stream, name, dtype, shape)


class NpzWriter:
    """Writes an ``.npz`` into an open binary file, one streamed member after another."""

    def __init__(self, f: BinaryIO):
        self._zip = zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)

    @contextlib.contextmanager
    def member(self, name: str, dtype, shape: tuple[int, ...]) -> Iterator[MemberSink]:
        """Open member ``name.npy`` for an array of ``dtype`` and ``shape`` (C order).

        The block must write exactly ``prod(shape)`` elements, else NpzFormatError.
        """
        with self._zip.open(f"{name}.npy", mode="w", force_zip64=True) as stream:
            sink = start_npy(stream, name, dtype, shape)
            yield sink
            sink.check_complete()

    def write_array(self, name: str, array: np.ndarray) -> None:
        with self.member(name, array.dtype, array.shape) as sink:
            sink.write(array)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_member(zf: zipfile.ZipFile, name: str):
    try:
        stream = zf.open(f"{name}.npy")
    except KeyError:
        raise NpzFormatError(f"member {name!r} is missing") from None
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise NpzFormatError(f"member {name!r} has .npy format version {version}")
    if fortran:
        raise NpzFormatError(f"member {name!r} is stored in Fortran order")
    return stream, tuple(shape), np.dtype(dtype)


def _data_bytes(name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    if dtype.hasobject:
        raise NpzFormatError(f"member {name!r} holds Python objects")
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def member_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of member ``name`` from its header alone (reads a few hundred bytes)."""
    stream, shape, dtype = _open_member(zf, name)
    stream.close()
    return shape, dtype


def scan_member(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of member ``name`` after reading all its data (checks length and CRC-32)."""
    return copy_member(zf, name, None)


def read_rows(zf: zipfile.ZipFile, name: str, count: int) -> np.ndarray:
    """The first ``count`` rows of member ``name`` (all of them if it has fewer), reading only those bytes.

    The member is not read to its end, so its CRC-32 is not checked: for previews of a file just
    written (``grid.png`` from ``samples.npz``), never for verification.
    """
    stream, shape, dtype = _open_member(zf, name)
    with stream:
        _data_bytes(name, shape, dtype)  # refuses object arrays
        if not shape:
            raise NpzFormatError(f"member {name!r} is a scalar, not an array of rows")
        count = max(0, min(int(count), shape[0]))
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        data = stream.read(count * row)
    if len(data) != count * row:
        raise NpzFormatError(f"member {name!r} ends after {len(data)} bytes, its first {count} rows need {count * row}")
    return np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:]).copy()


def copy_member(zf: zipfile.ZipFile, name: str, sink: MemberSink | None) -> tuple[tuple[int, ...], np.dtype]:
    """Stream the data of member ``name`` into ``sink`` (or nowhere), ``PIECE`` bytes at a time.

    Raises NpzFormatError if the data length does not match the header and zipfile.BadZipFile if
    the CRC-32 does not match. Returns the member's (shape, dtype).
    """
    stream, shape, dtype = _open_member(zf, name)
    with stream:
        need = _data_bytes(name, shape, dtype)
        seen = 0
        while piece := stream.read(PIECE):
            seen += len(piece)
            if seen > need:
                raise NpzFormatError(f"member {name!r} holds more data than its shape {shape}")
            if sink is not None:
                sink.write_bytes(piece)
        if seen != need:
            raise NpzFormatError(f"member {name!r} holds {seen} bytes of data, its shape {shape} needs {need}")
    return shape, dtype


__all__ = ["NpzFormatError", "NpzWriter", "MemberSink", "PIECE", "copy_member", "member_header", "read_rows",
           "scan_member", "start_npy"]
