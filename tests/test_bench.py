"""`igengine bench`: the window arithmetic, the report's contract, bad input."""

import json
import re

import pytest
import torch

from igengine.cli import main
from igengine.config import Family, GuidanceConfig, SamplerConfig, Solver
from igengine.models.checkpoint import save_safetensors
from igengine.sampling import build_plan
from tests.conftest import tiny_model

REQUIRED = ["precision", "backend", "batch_size", "samples_per_s", "ms_per_nfe", "ms_per_step", "outside_network_share",
            "first_sample_s", "peak_memory_bytes", "mfu", "max_abs_vs_reference", "rel_l2_vs_reference", "recompiles"]


def test_step_classes_cover_the_full_plan_exactly():
    from igengine.bench.job import step_classes

    g = GuidanceConfig(ig_scale=1.4, cfg_scale=1.35, cfg_interval=(0.0, 0.7))
    plan = build_plan(Family.SIT, SamplerConfig(solver=Solver.SDE, steps=250, guidance=g))
    classes = step_classes(plan, 4)
    assert sum(c.count for c in classes) == 250
    by_rows = {c.rows: c for c in classes}
    cfg_steps = sum(1 for s in plan.steps if s.evals[0].cfg)
    assert by_rows[(2,)].count == cfg_steps and by_rows[(1,)].count == 250 - cfg_steps
    assert 0 < cfg_steps < 250
    for c in classes:  # each window is consecutive steps of its class, at most K of them
        assert 1 <= len(c.window.steps) <= 4
        assert all(tuple(2 if ev.cfg else 1 for ev in s.evals) == c.rows for s in c.window.steps)
        idx = [s.index for s in c.window.steps]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
    # Heun on LightningDiT: the corrector can sit on the other side of the interval from its predictor.
    ld = build_plan(Family.LIGHTNINGDIT, SamplerConfig(solver=Solver.HEUN2, steps=125, timestep_shift=0.3,
                                                       guidance=GuidanceConfig(cfg_scale=1.45, cfg_interval=(0.19, 1.0))))
    assert sum(c.count for c in step_classes(ld, 3)) == 124


@pytest.fixture
def tiny_ckpt(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_safetensors(tiny_model("sit", in_channels=1, input_size=8), path,
                     sampler_defaults={"solver": "sde", "steps": 6, "cfg_scale": 1.5, "cfg_interval": [0.0, 0.6]})
    return path


@pytest.mark.slow
def test_bench_report_has_the_documented_rows_and_the_anchor_agrees_with_itself(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", "--ckpt", str(tiny_ckpt), "--precision", "fp32,bf16", "--batch-size", "1,3", "--steps", "2",
                 "--repeats", "2", "--device", "cpu", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["partial"] is False and report["stage"] == "done" and "error" not in report
    assert {"commit", "machine", "device", "torch", "date"} <= set(report["provenance"])
    rows = report["rows"]
    assert {(r["precision"], r["batch_size"]) for r in rows} == {(p, n) for p in ("reference", "fp32", "bf16")
                                                                   for n in (1, 3)}
    for r in rows:
        assert all(k in r for k in REQUIRED), set(REQUIRED) - set(r)
        assert r["samples_per_s"] > 0 and r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
        assert 0 < r["mfu"] <= 1 and 0 <= r["outside_network_share"] <= 1 and r["recompiles"] == 0
        assert r["repeats_done"] == 2 and r["peak_memory_bytes"] > 0
    anchor = [r for r in rows if r["anchor"]]
    assert len(anchor) == 2 and all(r["max_abs_vs_reference"] == 0 for r in anchor)
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    bf16 = [r for r in rows if r["precision"] == "bf16"]
    # fp32 differs from the float64-state reference by rounding only; bf16 by far more (and not zero).
    assert all(0 < r["max_abs_vs_reference"] < 1e-4 for r in fp32)
    assert all(r["max_abs_vs_reference"] > 10 * max(f["max_abs_vs_reference"] for f in fp32) for r in bf16)
    # The full run's throughput comes from the plan: 6 SDE steps, CFG below t = 0.6.
    w = report["workload"]
    assert w["plan_steps"] == 6 and sum(c["steps_in_full_run"] for c in w["classes"]) == 6


@pytest.mark.parametrize("args, expect", [
    (["--model", "SiT-S/2", "--precision", "fp8"], "'fp8' is not one of"),
    (["--model", "SiT-S/2", "--backend", "jax"], "'jax' is not one of"),
    (["--model", "SiT-S/2", "--batch-size", "0"], "batch sizes must be integers >= 1"),
    (["--model", "SiT-S/2", "--batch-size", "a,b"], "not a comma-separated list of integers"),
    (["--model", "Nope/2"], "unknown model 'Nope/2'"),
    (["--model", "SiT-S/2", "--ckpt", "x.pt"], "give --ckpt (a checkpoint) or --model (a preset with random weights), "
                                                "not both"),
    (["--model", "SiT-S/2", "--steps", "0"], "--steps must be >= 1"),
    (["--model", "SiT-S/2", "--configs", "bf16"], "'bf16' is not PRECISION/BACKEND"),
    (["--model", "SiT-S/2", "--configs", "bf16/jax"], "'jax' is not one of"),
    (["--model", "SiT-S/2", "--configs", "bf16/torch", "--precision", "fp32"], "not both"),
    (["--model", "SiT-S/2", "--json", "/no-such-folder-igengine/b.json"], "folder /no-such-folder-igengine does not exist"),
    (["--model", "SiT-S/2", "--json", "/"], "cannot write /: it is a folder"),
])
def test_bad_bench_input_is_one_line_and_exit_2(args, expect, capsys):
    code = main(["bench", *args, "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("igengine: error:"), err
    assert expect in lines[0], lines[0]


def test_a_pair_the_runtime_cannot_run_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys):
    """ONNX Runtime's CPU provider has no bf16 MatMul: the bf16 row is refused at once, before the
    reference and fp32 rows are built or any graph is exported into the cache."""
    pytest.importorskip("onnxruntime", reason="needs ONNX Runtime (the onnx extra)")
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "cache"))
    code = main(["bench", "--model", "SiT-S/2", "--backend", "torch,onnxruntime", "--batch-size", "1",
                 "--steps", "1", "--device", "cpu"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("igengine:")]
    assert code == 2 and len(err) == 1, err
    assert "bf16/onnxruntime: ONNX Runtime's CPU provider cannot run a bf16 graph" in err[0], err[0]
    assert not (tmp_path / "cache").exists()


def test_configs_pairs_replace_the_cross_product_and_keep_the_anchor():
    from igengine.bench.job import BenchJob, _configs
    from igengine.config import BackendName, Precision

    pairs = ((Precision.BF16, BackendName.TORCH), (Precision.BF16, BackendName.COMPILED))
    job = BenchJob(model="SiT-S/2", batch_sizes=(1, 4), pairs=pairs)
    got = [(c.precision, c.backend, c.batch_size, c.anchor) for c in _configs(job)]
    assert got == [(Precision.REFERENCE, BackendName.TORCH, n, True) for n in (1,)] + [
        (Precision.BF16, BackendName.TORCH, 1, False), (Precision.BF16, BackendName.COMPILED, 1, False),
        (Precision.REFERENCE, BackendName.TORCH, 4, True),
        (Precision.BF16, BackendName.TORCH, 4, False), (Precision.BF16, BackendName.COMPILED, 4, False)]
    # Without pairs: every precision with every backend (here 2 x 2, reference/torch among them).
    cross = BenchJob(model="SiT-S/2", batch_sizes=(2,), precisions=(Precision.REFERENCE, Precision.BF16),
                     backends=(BackendName.TORCH, BackendName.COMPILED))
    assert [(c.precision, c.backend) for c in _configs(cross)] == [
        (Precision.REFERENCE, BackendName.TORCH), (Precision.REFERENCE, BackendName.COMPILED),
        (Precision.BF16, BackendName.TORCH), (Precision.BF16, BackendName.COMPILED)]


def test_bench_json_is_rewritten_row_by_row_and_a_stopped_run_keeps_its_finished_rows(tiny_ckpt, tmp_path):
    """``--json`` is rewritten (atomically) after every warm-up and repeat, flagged partial; a run stopped
    in the middle leaves a valid report of what it had finished, with the reason."""
    from igengine.bench.job import BenchJob, run_bench
    from igengine.bench.report import write_json
    from igengine.config import Precision

    out = tmp_path / "b.json"
    seen = []

    def progress(report):
        write_json(report, out)
        seen.append(json.loads(out.read_text()))
        if len(seen) == 4:  # stop during the third repeat, as a timeout would
            raise KeyboardInterrupt

    job = BenchJob(ckpt=tiny_ckpt, precisions=(Precision.FP32,), batch_sizes=(2,), steps=1, repeats=3, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_bench(job, progress=progress)
    assert [r["stage"] for r in seen] == ["warm-up 1/2", "warm-up 2/2", "repeat 1/3", "repeat 2/3", "stopped"]
    assert all(r["partial"] for r in seen)
    first, both, rep1, rep2, stopped = seen
    # After the anchor's warm-up: its row alone, untimed, exact against itself.
    assert [(r["precision"], r["repeats_done"]) for r in first["rows"]] == [("reference", 0)]
    assert first["rows"][0]["samples_per_s"] is None and first["rows"][0]["max_abs_vs_reference"] == 0
    # After both warm-ups: the fp32 row's accuracy is known, its speed not yet.
    fp32 = both["rows"][1]
    assert fp32["precision"] == "fp32" and 0 < fp32["max_abs_vs_reference"] < 1e-4 and fp32["samples_per_s"] is None
    # After each repeat: throughput from the repeats so far; the network's own time and MFU come at the end.
    for report, k in ((rep1, 1), (rep2, 2)):
        for r in report["rows"]:
            assert r["repeats_done"] == k and r["samples_per_s"] > 0
            assert r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
            assert r["mfu"] is None and r["outside_network_share"] is None and r["peak_memory_bytes"] is None
    # What the file holds after the stop: the two finished repeats, and why it stopped.
    assert json.loads(out.read_text()) == stopped
    assert stopped["error"].startswith("KeyboardInterrupt")
    assert [r["samples_per_s"] for r in stopped["rows"]] == [r["samples_per_s"] for r in rep2["rows"]]


@pytest.fixture(scope="module")
def busy_bf16_bench(tmp_path_factory):
    """One bench of the tiny checkpoint (fp32 and bf16, N = 1, 2, two step classes, 2 repeats) that records the
    order of what it times, and whose bf16 peak products are timed as if the machine were busy: their times are
    multiplied by 1e6 (a peak far below any row's rate). Returns (report, events)."""
    from igengine.bench import job as bench_job
    from igengine.bench.job import BenchJob, run_bench
    from igengine.bench.peak import MatmulPeaks
    from igengine.config import Precision

    path = tmp_path_factory.mktemp("busy") / "tiny.safetensors"
    save_safetensors(tiny_model("sit", in_channels=1, input_size=8), path,
                     sampler_defaults={"solver": "sde", "steps": 6, "cfg_scale": 1.5, "cfg_interval": [0.0, 0.6]})
    events = []
    real_timed, real_pass = bench_job._timed, MatmulPeaks.run_pass

    def timed(fn, device):
        events.append(("timed",))
        return real_timed(fn, device)

    def run_pass(self):
        events.append(("peak", str(self.dtype).replace("torch.", "")))
        real_pass(self)
        if self.dtype == torch.bfloat16:
            for seconds in self.times.values():
                seconds[-self.calls:] = [1e6 * s for s in seconds[-self.calls:]]

    job = BenchJob(ckpt=path, precisions=(Precision.FP32, Precision.BF16), batch_sizes=(1, 2), steps=1, repeats=2,
                   device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_job, "_timed", timed)
        mp.setattr(MatmulPeaks, "run_pass", run_pass)
        report = run_bench(job, log=lambda line: events.append(("log", line)),
                           progress=lambda r: events.append(("snapshot", r["stage"],
                                                             [row["repeats_done"] for row in r["rows"]])))
    return report, events


def test_the_peak_is_timed_after_the_rows_of_every_repeat(busy_bf16_bench):
    report, events = busy_bf16_bench
    n_windows = len(report["rows"]) * len(report["workload"]["classes"])  # 6 rows x 2 step classes
    assert n_windows == 12
    peaks = [e for e in events if e[0] == "peak"]
    assert len(peaks) == 2 * 2  # two dtypes, one pass each per repeat, and none outside the repeats
    for r in (1, 2):  # repeat r: the rows' windows (each timed by one or more clocked calls), then the peaks
        start = next(i for i, e in enumerate(events) if e[0] == "log" and e[1].startswith(f"repeat {r}/2 (ETA "))
        first_peak = events.index(("peak", "bfloat16"), start)
        rows = events[start + 1:first_peak]
        assert len(rows) >= n_windows and set(rows) == {("timed",)}
        assert events[first_peak:first_peak + 3] == [("peak", "bfloat16"), ("peak", "float32"),
                                                     ("snapshot", f"repeat {r}/2", [r] * 6)]
    for peak in report["peaks"].values():
        assert peak["passes"] == 2 and all(p["calls"] == 2 * peak["calls_per_pass"] for p in peak["products"])
        assert peak["threads"] == torch.get_num_threads()


def test_the_peak_is_timed_on_the_models_own_gemm_shapes_and_is_their_best_median(busy_bf16_bench):
    report, _ = busy_bf16_bench
    # SiT-tiny at 8 px, patch 2: 16 tokens, width 64, MLP 256. Rows per forward: N and 2N for N = 1, 2.
    expected = {(rows * 16, k, n) for rows in (1, 2, 4) for k, n in ((64, 256), (256, 64), (64, 192))}
    for name, peak in report["peaks"].items():
        timed = {tuple(p["mkn"]) for p in peak["products"]}
        squares = {s for s in timed if s[0] == s[1] == s[2] and s[0] >= 256}
        assert timed == expected | squares and len(squares) == 1, name
        best = max(peak["products"], key=lambda p: p["median_flops"])
        assert peak["flop_per_s"] == best["median_flops"] and peak["kernel"] == best["kernel"]
    fp32 = [r for r in report["rows"] if r["precision"] in ("reference", "fp32")]
    for r in fp32:  # an honest peak: MFU is the row's rate over it
        assert r["mfu_fault"] is None and r["mfu_peak_flops"] == report["peaks"]["float32"]["flop_per_s"]
        assert 0 < r["mfu"] <= 1 and r["mfu"] == pytest.approx(r["network_flops_per_s"] / r["mfu_peak_flops"])


def test_a_row_faster_than_its_peak_is_a_measurement_fault_never_an_mfu(busy_bf16_bench):
    from rich.console import Console

    from igengine.bench.report import COLUMNS, table

    report, _ = busy_bf16_bench
    bf16 = [r for r in report["rows"] if r["precision"] == "bf16"]
    assert len(bf16) == 2
    for r in bf16:
        assert r["mfu"] is None and r["network_flops_per_s"] > r["mfu_peak_flops"] > 0  # the JSON keeps both rates
        assert r["mfu_fault"].startswith("network rate ") and "exceeds the measured peak" in r["mfu_fault"]
        assert "the peak measurement is wrong" in r["mfu_fault"]
    console = Console(record=True, width=300)
    console.print(table(report))
    text = console.export_text()
    column = [head for _, head, _ in COLUMNS].index("MFU")
    cells = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("│")[1:-1]]
        if len(parts) == len(COLUMNS) and parts[2].isdigit():
            cells[(parts[0].rstrip("*"), int(parts[2]))] = parts[column]
    assert len(cells) == len(report["rows"]) == 6
    for (precision, _), cell in cells.items():
        if precision == "bf16":
            assert cell == "fault"
        else:  # a tiny model's MFU may print as 0.0% on a busy machine: its value is checked in the JSON
            assert cell.endswith("%") and 0 <= float(cell[:-1]) <= 100
    assert all(0 < r["mfu"] <= 1 for r in report["rows"] if r["precision"] != "bf16")
    assert "fault: the row ran faster than the measured peak" in " ".join(text.split())


def test_the_table_never_shows_an_mfu_above_100_percent():
    """A report written before the fault field existed (or by hand) with an MFU above 1 shows the marker too."""
    from igengine.bench.report import _cell

    assert _cell({"mfu": 1.2}, "mfu", "{:.1%}") == "fault"
    assert _cell({"mfu": None, "mfu_fault": "network rate ..."}, "mfu", "{:.1%}") == "fault"
    assert _cell({"mfu": 0.999}, "mfu", "{:.1%}") == "99.9%" and _cell({"mfu": None}, "mfu", "{:.1%}") == "-"


@pytest.mark.gpu
def test_cuda_bench_times_the_peak_with_cuda_events_on_the_models_shapes_every_repeat(tiny_ckpt):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the peak's CUDA path: cuBLAS products between CUDA events)")
    from igengine.bench.job import BenchJob, run_bench
    from igengine.config import Precision

    job = BenchJob(ckpt=tiny_ckpt, precisions=(Precision.BF16, Precision.TF32), batch_sizes=(2,), steps=1, repeats=3,
                   device="cuda")
    report = run_bench(job)
    # SiT-tiny at 8 px, patch 2: 16 tokens, width 64, MLP 256; rows 2 and 4 (N = 2 and 2N).
    expected = {(rows * 16, k, n) for rows in (2, 4) for k, n in ((64, 256), (256, 64), (64, 192))}
    assert set(report["peaks"]) == {"bfloat16", "float32", "float32+tf32"}
    for name, peak in report["peaks"].items():
        assert peak["timer"] == "cuda events" and peak["passes"] == 3 and peak["tf32"] == name.endswith("+tf32")
        timed = {tuple(p["mkn"]) for p in peak["products"]}
        assert timed == expected | {(8192, 8192, 8192)}, name
        assert all(p["kernel"] == "torch.mm" and p["calls"] == 3 * peak["calls_per_pass"] for p in peak["products"])
    for r in report["rows"]:
        assert (r["mfu"] is None) == (r["mfu_fault"] is not None)
        assert r["mfu"] is None or 0 < r["mfu"] <= 1


def test_bench_clock_estimates_the_time_left_from_each_rows_own_speed():
    from igengine.bench.job import BenchClock

    clock = BenchClock({0: 100, 1: 200}, units=6)
    assert clock.eta() is None and clock.eta_text() == ""
    clock.tick(0, 10, 1.0)  # row 0's first unit (may compile): 0.1 s per network row, row 1 unmeasured takes it too
    assert clock.eta() == pytest.approx(90 * 0.1 + 200 * 0.1) and clock.eta_text() == " (ETA 0:00:29)"
    clock.tick(0, 10, 0.5)  # a later unit replaces the first one's rate
    assert clock.eta() == pytest.approx(80 * 0.05 + 200 * 0.05)
    clock.tick(1, 20, 4.0)  # row 1's first unit
    assert clock.eta() == pytest.approx(80 * 0.05 + 180 * 0.2)
    clock.tick(1, 180, 18.0)
    clock.tick(0, 80, 4.0)
    assert clock.eta() == 0 and clock.done == 5
    passes = BenchClock({0: 10}, units=1, passes=2)  # the matmul peak passes of 2 repeats
    passes.tick(0, 5, 1.0)
    assert passes.eta() == pytest.approx(5 * 0.2)  # a pass not yet timed counts nothing
    passes.tick_pass(3.0)
    assert passes.eta() == pytest.approx(5 * 0.2 + 3.0) and passes.done == 2 and passes.units == 3


def test_bench_shows_its_progress_with_an_eta(tiny_ckpt, capsys):
    """Without a terminal: one log line per repeat with the time left; the clock callback (the terminal's
    bar) is called after every unit of work and ends at its total with nothing left."""
    from igengine.bench.job import BenchJob, run_bench
    from igengine.config import Precision

    lines, ticks = [], []
    job = BenchJob(ckpt=tiny_ckpt, precisions=(Precision.FP32,), batch_sizes=(1, 2), steps=1, repeats=2, device="cpu")
    run_bench(job, log=lines.append, clock=lambda done, total, eta: ticks.append((done, total, eta)))
    repeats = [line for line in lines if line.startswith("repeat ")]
    assert [line.split(" (")[0] for line in repeats] == ["repeat 1/2", "repeat 2/2"]
    assert all(re.fullmatch(r"repeat \d/2 \(ETA \d+:\d\d:\d\d\)", line) for line in repeats), repeats
    total = ticks[0][1]  # 4 rows x (2 window classes x (1 warm-up + 2 repeats) + 1 peak-memory run + 2 timed
    # alone), and a pass of the matmul peaks per repeat
    assert total == 4 * (2 * 3 + 1 + 2) + 2 and [t[0] for t in ticks] == list(range(1, total + 1))
    assert ticks[0][2] is not None and ticks[-1][2] == 0
    code = main(["bench", "--ckpt", str(tiny_ckpt), "--precision", "fp32", "--batch-size", "1", "--steps", "1",
                 "--repeats", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and re.search(r"bench: repeat 2/2 \(ETA \d+:\d\d:\d\d\)", err), err
