"""grid.png and the png/ layout (issue 11, item 10): exact pixel layout, defaults, resume, EDM2 subfolders."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igengine.cli import main
from igengine.jobs.bulk import write_pngs
from igengine.jobs.preview import label_period
from igengine.jobs.sample import DEFAULT_CHECKPOINT
from igengine.store.chunks import Chunk, ChunkSpec, ChunkStore
from igengine.store.npzstream import NpzWriter, read_rows
from igengine.store.preview import (BACKGROUND, INK, PAD, compose_grid, grid_geometry, grid_shape, migrate_flat_pngs,
                                    png_path, text_mask, tile_origin)

needs_model = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")


def run(capsys, *args):
    code = main(["sample", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def grid_tiles(grid: np.ndarray, k: int, cols: int, h: int, w: int, labelled: bool) -> list[np.ndarray]:
    """Cut a grid back into its k tiles (at the enlarged size) by the documented geometry."""
    g = grid_geometry(k, cols, h, w, labelled)
    th, tw = g["tile"]
    assert grid.shape == (*g["size"], 3)
    out = []
    for i in range(k):
        y, x = tile_origin(g, i // cols, i % cols)
        out.append(grid[y:y + th, x:x + tw])
    return out


def enlarge(img: np.ndarray, s: int) -> np.ndarray:
    return img.repeat(s, axis=0).repeat(s, axis=1)


# -- composition ---------------------------------------------------------------------------------


def test_tile_r_c_is_sample_r_times_cols_plus_c_and_the_rest_is_background_and_labels():
    rng = np.random.default_rng(0)
    k, h, w, cols = 7, 40, 36, 3  # >= 32 px: no enlargement; 3 rows, the last one partial
    images = rng.integers(0, 256, size=(k, h, w, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 10, 207, 5, 999])
    grid = compose_grid(images, cols, labels)
    g = grid_geometry(k, cols, h, w, True)
    assert g["scale"] == 1 and g["rows"] == 3
    painted = np.zeros(grid.shape[:2], dtype=bool)
    for r in range(3):
        for c in range(cols):
            i = r * cols + c
            y, x = tile_origin(g, r, c)
            if i < k:
                assert np.array_equal(grid[y:y + h, x:x + w], images[i]), (r, c)
                painted[y:y + h, x:x + w] = True
                mask = text_mask(str(labels[i]), g["label_scale"])
                ty = y + h + g["label_scale"]
                strip = grid[ty:ty + mask.shape[0], x:x + mask.shape[1]]
                assert np.array_equal(strip[mask], np.full((mask.sum(), 3), INK, np.uint8))
                assert (strip[~mask] == BACKGROUND).all()
                painted[ty:ty + mask.shape[0], x:x + mask.shape[1]][mask] = True
    assert (grid[~painted] == BACKGROUND).all()  # padding, label strips, the empty tiles of the last row
    assert grid[:PAD].max() == BACKGROUND and grid[:, :PAD].max() == BACKGROUND


def test_small_tiles_are_enlarged_by_an_integer_factor_and_unlabelled_grids_have_no_strip():
    images = np.arange(4 * 8 * 8 * 3, dtype=np.int64).reshape(4, 8, 8, 3).astype(np.uint8)
    grid = compose_grid(images, 2)
    g = grid_geometry(4, 2, 8, 8, False)
    assert g["scale"] == 4 and g["strip"] == 0 and grid.shape == (PAD + 2 * (32 + PAD), PAD + 2 * (32 + PAD), 3)
    for i, tile in enumerate(grid_tiles(grid, 4, 2, 8, 8, False)):
        assert np.array_equal(tile, enlarge(images[i], 4))


def test_the_font_draws_every_digit_distinctly():
    masks = [text_mask(str(d)) for d in range(10)]
    assert all(m.shape == (5, 3) for m in masks)
    assert len({m.tobytes() for m in masks}) == 10
    assert text_mask("207", 2).shape == (10, 22)  # 3 glyphs and 2 blank columns, doubled


@pytest.mark.parametrize("n, period, expect", [
    (64, None, (64, 8)), (16, None, (16, 4)), (10, None, (10, 4)), (1, None, (1, 1)), (50_000, None, (64, 8)),
    (1000, 10, (60, 10)), (16, 10, (16, 10)), (7, 10, (7, 7)), (64, 1, (64, 8)), (100, 3, (63, 9)), (100, 16, (64, 16)),
])
def test_grid_shape(n, period, expect):
    count, cols = grid_shape(n, period)
    assert (count, cols) == expect
    if period is not None and count > cols:
        assert cols % period == 0  # each column one class


def test_label_period_only_for_short_repeating_labels():
    assert label_period({"mode": "balanced"}, 10) == 10
    assert label_period({"mode": "balanced"}, 1000) is None
    assert label_period({"mode": "classes", "num_given": 3}, 1000) == 3
    assert label_period({"mode": "classes", "num_given": 40}, 1000) is None
    assert label_period({"mode": "random"}, 10) is None
    assert label_period({"mode": "file"}, 10) is None


def test_read_rows_reads_the_first_rows_only(tmp_path):
    a = np.arange(5 * 4 * 4 * 3, dtype=np.int64).reshape(5, 4, 4, 3).astype(np.uint8)
    with open(tmp_path / "s.npz", "wb") as f, NpzWriter(f) as npz:
        npz.write_array("arr_0", a)
    with zipfile.ZipFile(tmp_path / "s.npz") as zf:
        assert np.array_equal(read_rows(zf, "arr_0", 2), a[:2])
        assert np.array_equal(read_rows(zf, "arr_0", 99), a)


# -- png/ layout -----------------------------------------------------------------------------------


def test_png_paths_follow_edm2_subdirs(tmp_path):
    assert png_path(tmp_path, 0) == tmp_path / "000000" / "000000.png"
    assert png_path(tmp_path, 999) == tmp_path / "000000" / "000999.png"
    assert png_path(tmp_path, 1000) == tmp_path / "000001" / "001000.png"
    assert png_path(tmp_path, 49_999) == tmp_path / "000049" / "049999.png"
    assert png_path(tmp_path, 1_234_567) == tmp_path / "001234" / "1234567.png"


def test_a_chunk_across_a_thousand_boundary_writes_into_two_subfolders(tmp_path):
    store = ChunkStore(tmp_path / "chunks", ChunkSpec((2, 2, 3), None))
    store.folder.mkdir()
    chunk = Chunk(998, 1002)
    pixels = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    write_pngs(tmp_path / "png", store, chunk, pixels)
    found = sorted(p.relative_to(tmp_path / "png").as_posix() for p in (tmp_path / "png").rglob("*.png"))
    assert found == ["000000/000998.png", "000000/000999.png", "000001/001000.png", "000001/001001.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000001" / "001001.png")), pixels[3])
    assert (store.folder / f"{chunk.name}.png-done").exists()


def test_flat_pngs_are_moved_into_subfolders(tmp_path):
    png = tmp_path / "png"
    png.mkdir()
    for i in (0, 5, 1003):
        (png / f"{i:06d}.png").write_bytes(f"img{i}".encode())
    (png / "notes.txt").write_text("mine")
    assert migrate_flat_pngs(png) == 3
    assert (png / "000001" / "001003.png").read_bytes() == b"img1003"
    assert sorted(p.name for p in png.iterdir()) == ["000000", "000001", "notes.txt"]
    assert migrate_flat_pngs(png) == 0


# -- end to end on the embedded model --------------------------------------------------------------


@needs_model
def test_grid_png_is_written_by_default_and_shows_the_first_samples(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "--n", 12, "--steps", 4, "--labels", "balanced", "--out", out)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["outputs"]["grid"] == "grid.png"
    assert m["grid"] == {"file": "grid.png", "samples": [0, 12], "columns": 10, "labelled": True}
    data = np.load(out / "samples.npz")
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    tiles = grid_tiles(grid, 12, 10, 8, 8, True)
    for i, tile in enumerate(tiles):  # tile (r, c) = sample r * 10 + c, each pixel a 4 x 4 block
        assert np.array_equal(tile, enlarge(data["arr_0"][i], 4)), i
    assert list(data["labels"][:12]) == [i % 10 for i in range(12)]  # so column c shows digit c


@needs_model
def test_no_grid_and_no_decode_write_no_grid(tmp_path, capsys):
    code, _, err = run(capsys, "--n", 2, "--steps", 2, "--no-grid", "--out", tmp_path / "a")
    assert code == 0, err
    assert not (tmp_path / "a" / "grid.png").exists() and (tmp_path / "a" / "samples.npz").exists()
    assert "grid" not in json.loads((tmp_path / "a" / "manifest.json").read_text())["outputs"]
    code, _, err = run(capsys, "--n", 2, "--steps", 2, "--no-decode", "--out", tmp_path / "b")
    assert code == 0, err
    assert not (tmp_path / "b" / "grid.png").exists() and (tmp_path / "b" / "latents.npy").exists()


@needs_model
def test_an_extended_run_rewrites_the_grid(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", 3, "--chunk-size", 4, "--out", out]
    assert run(capsys, "--n", 3, *args)[0] == 0
    before = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert run(capsys, "--n", 9, *args)[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["grid"]["samples"] == [0, 9] and m["grid"]["columns"] == 3
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape != before.shape
    data = np.load(out / "samples.npz")["arr_0"]
    for i, tile in enumerate(grid_tiles(grid, 9, 3, 8, 8, True)):
        assert np.array_equal(tile, enlarge(data[i], 4)), i


@needs_model
def test_png_resume_and_migration_of_the_flat_layout(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--n", 4, "--steps", 2, "--chunk-size", 2, "--png", "--out", out]
    assert run(capsys, *args)[0] == 0
    png = out / "png"
    expect = [f"000000/{i:06d}.png" for i in range(4)]
    assert sorted(p.relative_to(png).as_posix() for p in png.rglob("*.png")) == expect
    first = {i: (png / "000000" / f"{i:06d}.png").read_bytes() for i in range(4)}
    # A chunk whose PNGs were not finished (marker missing) gets them again on resume.
    marker = next(Path(out / "chunks").rglob("00000002-00000003.npz.png-done"))
    marker.unlink()
    (png / "000000" / "000003.png").unlink()
    # An older igengine's flat layout: moved into the subfolders, with a note.
    for i in (0, 1):
        (png / "000000" / f"{i:06d}.png").rename(png / f"{i:06d}.png")
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert sorted(p.relative_to(png).as_posix() for p in png.rglob("*.png")) == expect
    assert {i: (png / "000000" / f"{i:06d}.png").read_bytes() for i in range(4)} == first
    assert marker.exists()
    notes = json.loads((out / "manifest.json").read_text())["notes"]
    assert any("moved 2 PNG(s) of the older flat layout" in n for n in notes), notes
