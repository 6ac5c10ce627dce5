"""What `igengine bench` shows and writes: a table on the terminal, JSON for scripts, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from igengine.errors import JobError
from igengine.store.atomic import atomic_write_bytes, atomic_write_json

COLUMNS = [
    ("precision", "precision", "{}"), ("backend", "backend", "{}"), ("batch_size", "N", "{}"),
    ("samples_per_s", "samples/s", "{:.3g}"), ("ms_per_nfe", "ms/NFE", "{:.3g}"), ("ms_per_step", "ms/step", "{:.3g}"),
    ("outside_network_share", "outside net", "{:.0%}"), ("first_sample_s", "first (s)", "{:.1f}"),
    ("peak_memory_bytes", "peak MB", "{}"), ("mfu", "MFU", "{:.1%}"), ("max_abs_vs_reference", "max|d|", "{:.1e}"),
    ("rel_l2_vs_reference", "rel L2", "{:.1e}"), ("recompiles", "recomp.", "{}"),
]


MFU_FAULT = "fault"  # the MFU cell of a row that ran faster than the measured peak (``mfu_fault``)


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if key == "mfu" and (row.get("mfu_fault") or (v is not None and v > 1)):
        return MFU_FAULT  # never a percentage above 100: the peak, not the row, is wrong
    if v is None:
        return "-"
    if key == "peak_memory_bytes":
        return f"{v / 2**20:.0f}"
    return fmt.format(v)


def table(report: dict):
    """A rich Table of the rows, the anchor marked."""
    from rich.table import Table

    w = report["workload"]
    t = Table(title=f"igengine bench: {w['model']} ({w['weights']} weights), {w['sampler']['solver']} "
                    f"{w['sampler']['steps']} steps on {w['device']}; throughput of the full run")
    for _, head, _ in COLUMNS:
        t.add_column(head, justify="right")
    for r in report["rows"]:
        cells = [_cell(r, k, f) for k, _, f in COLUMNS]
        if r.get("anchor"):
            cells[0] += "*"
        t.add_row(*cells)
    t.caption = ("* anchor of the accuracy columns. " + w["throughput_basis"] + ". MFU against the matmul peak "
                 "of the row's dtype measured in this run after the rows of every repeat (the best median over a "
                 "square and the model's own GEMM shapes, and the kernels).")
    if any(_cell(r, "mfu", "") == MFU_FAULT for r in report["rows"]):
        t.caption += (f" {MFU_FAULT}: the row ran faster than the measured peak, so the peak measurement is wrong "
                      "(e.g. the machine was busy while it was timed); no MFU is shown (mfu_fault in --json).")
    return t


def write_json(report: dict, path: Path) -> None:
    atomic_write_json(Path(path), report)


def write_plot(report: dict, path: Path) -> None:
    """Throughput and MFU against batch size, one line per (precision, backend). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise JobError("`plot` needs matplotlib, which is not installed: pip install matplotlib "
                       "(or pip install 'igengine[plot]')") from None
    import io

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict]] = {}
    for r in report["rows"]:
        series.setdefault(f"{r['precision']}/{r['backend']}", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        xs = [r["batch_size"] for r in rows]
        ax1.plot(xs, [r["samples_per_s"] for r in rows], marker="o", label=name)
        ax2.plot(xs, [100 * r["mfu"] if r.get("mfu") is not None else float("nan") for r in rows], marker="o",
                 label=name)  # a row without MFU (mfu_fault) is a gap
    for ax, label in ((ax1, "samples/s (full run)"), (ax2, "MFU (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size N")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    w = report["workload"]
    fig.suptitle(f"{w['model']}, {w['sampler']['solver']} {w['sampler']['steps']} steps, {w['device']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def summary_line(report: dict) -> str:
    return json.dumps({"rows": len(report["rows"]), "best_samples_per_s": max(r["samples_per_s"] for r in report["rows"]),
                       "error": report.get("error")})
