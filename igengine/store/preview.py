"""What a person looks at first: ``grid.png`` (the first samples in one image) and the ``png/`` folder layout.

grid.png (``compose_grid``): tiles in index order, row by row -- tile (r, c) is sample ``r * cols + c`` --
with ``PAD`` pixels of background around every tile. Tiles smaller than ``MIN_TILE`` pixels are
enlarged by an integer factor (nearest neighbour: every pixel becomes an s x s block), so the
8 x 8 digits are visible. With labels, a strip under each tile shows its class id in a built-in
3 x 5 pixel font (no font files, the same pixels everywhere). ``grid_shape`` picks the columns:
with labels that repeat with a period p (balanced labels, a class list), a multiple of p, so each
column holds one class.

png/ (``png_path``): EDM2's ``--subdirs`` layout, never more than 1,000 files in one folder:
sample i is ``png/<i // 1000:06d>/<i:06d>.png`` (png/000000/000000.png ... png/000000/000999.png,
png/000001/001000.png, ...). ``migrate_flat_pngs`` moves the files of the older flat layout
(``png/<i:06d>.png``) into it.

May import: igengine.errors (and numpy), as the rest of igengine.store.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from igengine.errors import OutputError
from igengine.store.atomic import atomic_write_bytes, png_bytes
from igengine.store.npzstream import NpzFormatError, member_header, read_rows

GRID = "grid.png"
GRID_MAX = 64  # samples shown at most
PAD = 2  # pixels around every tile
MIN_TILE = 32  # tiles smaller than this (the larger side) are enlarged by an integer factor
BACKGROUND = 96  # grey: neither the black nor the white of a sample
INK = 255  # the class ids

PNG_DIR = "png"
PNGS_PER_FOLDER = 1000

# 3 x 5 pixel digits, one string of 15 '0'/'1' per digit, row by row.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111",
}
GLYPH_W, GLYPH_H = 3, 5


def glyph(ch: str) -> np.ndarray:
    """The bool [5, 3] bitmap of a digit."""
    return np.array([c == "1" for c in _FONT[ch]], dtype=bool).reshape(GLYPH_H, GLYPH_W)


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """A bool [5 * scale, (4 * len - 1) * scale] mask of a string of digits (one blank column between digits)."""
    cols = []
    for k, ch in enumerate(text):
        if k:
            cols.append(np.zeros((GLYPH_H, 1), dtype=bool))
        cols.append(glyph(ch))
    mask = np.concatenate(cols, axis=1) if cols else np.zeros((GLYPH_H, 0), dtype=bool)
    return np.kron(mask, np.ones((scale, scale), dtype=bool))


def grid_shape(n: int, period: int | None = None, limit: int = GRID_MAX) -> tuple[int, int]:
    """(samples shown, columns) for a run of ``n`` samples.

    Without a period: min(n, limit) samples on ceil(sqrt(count)) columns. With labels repeating
    every ``period`` samples: a multiple of the period near 8 columns (so column c always shows
    class ``c mod period``) and as many full rows as fit in ``limit``.
    """
    if n < 1:
        raise ValueError("a grid needs at least one sample")
    if period is None or period < 1 or period > limit:
        count = min(n, limit)
        return count, math.ceil(math.sqrt(count))
    cols = period * max(1, round(math.sqrt(limit) / period))
    if cols > limit:
        cols = period
    count = min(n, cols * max(1, limit // cols))
    return count, min(cols, count)


def tile_scale(height: int, width: int) -> int:
    """The integer enlargement of a tile: 1 from ``MIN_TILE`` pixels up, else the factor that reaches it."""
    return max(1, math.ceil(MIN_TILE / max(height, width)))


def label_scale(tile_width: int) -> int:
    """Pixels per font pixel for a (possibly enlarged) tile of this width."""
    return max(1, tile_width // 64)


def grid_geometry(count: int, cols: int, height: int, width: int, labelled: bool) -> dict:
    """Where everything goes: the tile size, the label strip, the pitch and the image size."""
    s = tile_scale(height, width)
    th, tw = height * s, width * s
    ls = label_scale(tw)
    strip = GLYPH_H * ls + 2 * ls if labelled else 0  # font height plus a margin above and below
    rows = math.ceil(count / cols)
    pitch_y, pitch_x = th + strip + PAD, tw + PAD
    return {"scale": s, "tile": (th, tw), "label_scale": ls, "strip": strip, "rows": rows, "cols": cols,
            "pitch": (pitch_y, pitch_x), "size": (PAD + rows * pitch_y, PAD + cols * pitch_x)}


def tile_origin(geometry: dict, r: int, c: int) -> tuple[int, int]:
    """The top-left pixel (y, x) of tile (r, c)'s image."""
    py, px = geometry["pitch"]
    return PAD + r * py, PAD + c * px


def compose_grid(images: np.ndarray, cols: int, labels: np.ndarray | None = None) -> np.ndarray:
    """uint8 [K, H, W, 3] samples -> one uint8 [Y, X, 3] image: tile (r, c) is sample r * cols + c."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[0] < 1:
        raise ValueError(f"compose_grid needs uint8 [K, H, W, 3] with K >= 1, got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(f"{len(labels)} labels for {images.shape[0]} images")
    k, h, w, _ = images.shape
    cols = max(1, min(int(cols), k))
    g = grid_geometry(k, cols, h, w, labels is not None)
    s, (th, tw), ls = g["scale"], g["tile"], g["label_scale"]
    out = np.full((*g["size"], 3), BACKGROUND, dtype=np.uint8)
    for i in range(k):
        y, x = tile_origin(g, i // cols, i % cols)
        tile = images[i].repeat(s, axis=0).repeat(s, axis=1) if s > 1 else images[i]
        out[y:y + th, x:x + tw] = tile
        if labels is not None:
            mask = text_mask(str(int(labels[i])), ls)[:, :tw]  # a label wider than its tile is cut
            ty = y + th + ls
            out[ty:ty + mask.shape[0], x:x + mask.shape[1]][mask] = INK
    return out


def read_first_samples(samples: Path, count: int | None = None,
                       period: int | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The first images (and labels, when the file has them) of a samples.npz, reading only those rows,
    and the grid's columns. ``count`` None: as many as ``grid_shape`` shows for the file's n and ``period``."""
    try:
        with zipfile.ZipFile(samples) as zf:
            n = int(member_header(zf, "arr_0")[0][0])
            shown, cols = grid_shape(n, period)
            count = shown if count is None else count
            images = read_rows(zf, "arr_0", count)
            names = set(zf.namelist())
            labels = read_rows(zf, "labels", count) if "labels.npy" in names else None
    except (OSError, zipfile.BadZipFile, NpzFormatError, IndexError, ValueError) as e:
        raise OutputError(f"cannot read the first samples of {samples} for {GRID}: {e}") from None
    return images, labels, cols


def write_grid(folder: Path, samples: Path, period: int | None = None, labelled: bool = True) -> dict:
    """Write ``folder/grid.png`` (atomically) from the first samples of ``samples``; returns what it shows."""
    folder = Path(folder)
    images, labels, cols = read_first_samples(samples, period=period)
    count = images.shape[0]
    grid = compose_grid(images, cols, labels if labelled else None)
    try:
        atomic_write_bytes(folder / GRID, png_bytes(grid))
    except OSError as e:
        raise OutputError(f"cannot write {folder / GRID}: {e.strerror or e}") from None
    return {"file": GRID, "samples": [0, count], "columns": cols, "labelled": labels is not None and labelled}


# ----------------------------------------------------------------------------------------------
# png/: EDM2's --subdirs layout
# ----------------------------------------------------------------------------------------------


def png_path(png_dir: Path, index: int) -> Path:
    """``png/<index // 1000:06d>/<index:06d>.png``: at most 1,000 files per folder."""
    return Path(png_dir) / f"{index // PNGS_PER_FOLDER:06d}" / f"{index:06d}.png"


_FLAT_PNG = re.compile(r"^(\d{6,})\.png$")


def migrate_flat_pngs(png_dir: Path) -> int:
    """Move PNGs of the older flat layout (``png/<i:06d>.png``) to ``png_path``; returns how many moved.

    A rename within one folder tree: each file is in one place or the other at every moment, so an
    interrupted migration is finished by the next run. A file already present in the new place wins.
    """
    png_dir = Path(png_dir)
    moved = 0
    try:
        entries = list(os.scandir(png_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = _FLAT_PNG.match(entry.name)
        if not m or not entry.is_file():
            continue
        target = png_path(png_dir, int(m.group(1)))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            os.unlink(entry.path)
        else:
            os.replace(entry.path, target)
            moved += 1
    return moved


__all__ = ["GRID", "GRID_MAX", "PAD", "PNGS_PER_FOLDER", "PNG_DIR", "compose_grid", "grid_geometry", "grid_shape",
           "migrate_flat_pngs", "png_path", "read_first_samples", "text_mask", "tile_origin", "write_grid"]
