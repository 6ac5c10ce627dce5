"""The preview outputs of a sampling run: ``grid.png`` after packing, and the ``png/`` layout before sampling.

``igengine.store.preview`` draws; this module decides from the run's labels how: with labels that
repeat with a short period (``balanced`` labels of a model with at most ``PERIOD_MAX`` classes, or a
class list of at most ``PERIOD_MAX`` entries), the grid's columns are a multiple of that period, so
each column shows one class. Every tile carries its class id.
"""

from __future__ import annotations

from pathlib import Path

from igengine.store.atomic import atomic_write_json
from igengine.store.manifest import MANIFEST, SAMPLES
from igengine.store.preview import GRID, migrate_flat_pngs, write_grid

PERIOD_MAX = 16  # label periods up to this many classes get one class per column


def label_period(label_info: dict, num_classes: int) -> int | None:
    """How often the run's labels repeat (None: they do not, or too rarely to help the grid)."""
    mode = label_info.get("mode")
    if mode == "balanced":
        period = num_classes
    elif mode == "classes":
        period = int(label_info.get("num_given", 0))
    else:
        return None
    return period if 1 <= period <= PERIOD_MAX else None


def write_run_grid(out: Path, manifest: dict, label_info: dict, num_classes: int) -> dict:
    """Write OUT/grid.png from the packed samples.npz and record it in the manifest (rewritten); returns it."""
    out = Path(out)
    shown = write_grid(out, out / SAMPLES, period=label_period(label_info, num_classes))
    manifest = dict(manifest)
    manifest["outputs"] = {**manifest.get("outputs", {}), "grid": GRID}
    manifest["grid"] = shown
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def prepare_png_dir(png_dir: Path) -> str | None:
    """Create OUT/png/ and move PNGs of the older flat layout into subfolders; a note when any moved."""
    png_dir = Path(png_dir)
    png_dir.mkdir(exist_ok=True)
    moved = migrate_flat_pngs(png_dir)
    if moved:
        return f"moved {moved} PNG(s) of the older flat layout into {png_dir}/<index // 1000>/ subfolders"
    return None


__all__ = ["PERIOD_MAX", "label_period", "prepare_png_dir", "write_run_grid"]
