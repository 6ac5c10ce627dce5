"""benchmarks/device_check.sh, the one-call GPU check, planned and packed on the CPU.

The script runs as one call of the device tool: at most 8 minutes (15 minutes of device time include
the machine's start), whose results come back only as at most 8 files of at most 16 MiB under $OUT.
A dry run (DEVICE_CHECK_DRY_RUN=1) runs no section: it advances a virtual clock by each section's
expected seconds on an H100, applies the same budget rules a real run applies, and writes the same
files. These tests check that plan: the order, what is skipped and why, the files, and that the
expected seconds are not below what was measured (CPU compile timings scaled, an earlier H100 run).
The Python steps it calls (record, compare) are tested on synthetic inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import device_check_steps as steps

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
RESULTS = ROOT / "benchmarks" / "results"

ORDER = ["env", "kernels-nvrtc", "kernels-cmake", "selftest", "sample-digits", "e2e-ckpt", "e2e-sample",
         "e2e-compare", "bulk", "pytest-gpu", "bench-sit-64", "official-speed-sit", "kernel-bench",
         "bench-ldit-64", "official-speed-ldit", "bench-sit-1-16", "bench-sit-256"]
# What a check is for: these must start within the budget at their expected times.
MUST_RUN = ORDER[:ORDER.index("bench-sit-64") + 1]
BUDGET, RESERVE, GRACE = 480, 15, 10  # the script's defaults (8 minutes; the final record; timeout's grace)


def dry_run(tmp_path: Path, **env) -> tuple[dict, Path, str]:
    out = tmp_path / "out"
    full = {**os.environ, "DEVICE_CHECK_DRY_RUN": "1", "OUT": str(out), "DEVICE_CHECK_CACHE": str(tmp_path / "cache"),
            "OFFICIAL_REPO": str(tmp_path / "no-official"), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "device_check.json").read_text()), out, proc.stdout


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("dry"))


def test_dry_run_plans_the_sections_in_order_and_the_essential_ones_fit_the_budget(plan):
    summary, _, stdout = plan
    sections = summary["sections"]
    assert [s["name"] for s in sections] == ORDER
    assert summary["dry_run"] is True and summary["final"] is True and summary["budget_s"] == BUDGET
    by = {s["name"]: s for s in sections}
    end = BUDGET - RESERVE - GRACE
    for name in MUST_RUN:
        s = by[name]
        assert s["status"] == "planned", (name, s)
        assert s["start"] + s["est"] <= end, (name, s)
    # The timeline: each planned section starts where the one before it ended (virtual clock).
    planned = [s for s in sections if s["status"] == "planned"]
    for a, b in zip(planned, planned[1:]):
        assert b["start"] == a["start"] + a["est"]
    assert planned[-1]["start"] + planned[-1]["est"] <= end
    # Every other section is either planned or skipped with its reason, never silently dropped.
    for s in sections:
        assert s["status"] in ("planned", "skipped"), s
        if s["status"] == "skipped":
            assert s["reason"], s
    assert by["official-speed-sit"]["reason"].startswith("no official files at")
    assert by["bench-sit-1-16"]["reason"].startswith("needs 100s to be worth starting")
    for s in sections:  # a section is never expected to outlast its cap, nor to need more than it
        if s["cap"] != "":
            assert s["need"] <= s["cap"] and s["est"] <= s["cap"], s
    assert "=== [summary]" in stdout


def test_dry_run_leaves_at_most_8_files_of_at_most_16_mib_and_an_archive_of_every_section(plan):
    summary, out, _ = plan
    files = list(out.iterdir())
    assert sorted(p.name for p in files) == sorted(steps.OUT_FILES)
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files)
    with tarfile.open(out / "device_check.tar.gz") as tar:
        names = tar.getnames()
    planned = [s["name"] for s in summary["sections"] if s["status"] == "planned"]
    for i, name in enumerate(ORDER, start=1):  # every section has its folder; the planned ones their command
        if name in planned:
            assert f"sections/{i:02d}-{name}/dry-run.txt" in names
    assert summary["archive"]["left_out"] == []
    log = (out / "device_check.log").read_text()
    assert "=== [env]" in log and "OUT: 3 files (at most 8), none over 16 MiB: yes" in log


def _cpu_compile_s(model: str) -> float:
    """Seconds to first call per row count of a cold compile with block regions, measured on 2 CPU threads."""
    data = json.loads((RESULTS / "compile_start_cpu_20261202-072101.json").read_text())
    (r,) = [r for r in data["results"] if r["model"] == model and r["regions"] == "on"]
    first = r["cold"]["first_call_s"]
    return sum(first.values()) / len(first)


# A cold Inductor compile on the GPU does the same Python work (Dynamo's trace, Inductor's lowering) as
# on the CPU; its kernels are Triton (compiled in parallel workers on the GPU host's 16 cores) instead of
# C++ (on 2 cores here). So the CPU's seconds per compiled graph are taken as they are (scale 1).
GPU_COMPILE_SCALE = 1.0
# Graphs a section compiles cold: bench at one batch size compiles N and 2N rows; pytest -m gpu has
# four (test_cuda_compiled_matches_eager_and_does_not_recompile: 2 row counts x fp32, bf16, a tiny
# LightningDiT, taken at LightningDiT-B/1's cost: with regions the cost does not grow with depth).
COMPILES = {"bench-sit-64": ("SiT-XL/2", 2), "bench-ldit-64": ("LightningDiT-B/1", 2),
            "bench-sit-1-16": ("SiT-XL/2", 4), "bench-sit-256": ("SiT-XL/2", 2), "pytest-gpu": ("LightningDiT-B/1", 4)}
# The same work timed on an H100 by the earlier device check (sections of device_check_20261127-081649.json).
H100 = {"env": "environment", "kernels-cmake": "build", "bulk": "bulk", "kernel-bench": "benchmark",
        "pytest-gpu": "pytest-gpu"}


def test_expected_seconds_are_not_below_what_was_measured(plan):
    summary, _, _ = plan
    est = {s["name"]: s["est"] for s in summary["sections"] if s["est"] != ""}
    earlier = {s["name"]: int(s["seconds"]) for s in
               json.loads((RESULTS / "device_check_20261127-081649.json").read_text())["sections"]}
    for name, (model, graphs) in COMPILES.items():
        compile_s = graphs * _cpu_compile_s(model) * GPU_COMPILE_SCALE
        before = earlier.get(H100.get(name), 0)  # pytest: the tests that ran then, plus the compiles since
        assert est[name] >= before + compile_s, (name, est[name], before, compile_s)
    for name, old in H100.items():
        assert est[name] >= earlier[old], (name, est[name], earlier[old])


def test_a_small_budget_skips_sections_with_their_reason_and_keeps_the_files(tmp_path):
    summary, out, _ = dry_run(tmp_path, DEVICE_CHECK_BUDGET="150")
    by = {s["name"]: s for s in summary["sections"]}
    assert [s["name"] for s in summary["sections"]] == ORDER
    assert by["env"]["status"] == "planned"
    skipped = [s for s in summary["sections"] if s["status"] == "skipped"]
    assert by["pytest-gpu"] in skipped and by["bench-sit-64"] in skipped
    for s in skipped:
        assert "s to be worth starting" in s["reason"] or s["reason"].startswith("no official files"), s
    assert sorted(p.name for p in out.iterdir()) == sorted(steps.OUT_FILES)


def test_only_runs_the_sections_named(tmp_path):
    summary, _, _ = dry_run(tmp_path, DEVICE_CHECK_ONLY="e2e-sample,e2e-compare")
    status = {s["name"]: (s["status"], s["reason"]) for s in summary["sections"]}
    assert status["e2e-sample"] == ("planned", "") and status["e2e-compare"] == ("planned", "")
    assert status["env"] == ("skipped", "not in DEVICE_CHECK_ONLY")


# ------------------------------------------------------------------------------------------ record


def _record(work: Path, out: Path, log: Path, final: bool = True) -> dict:
    args = ["record", "--work", str(work), "--out", str(out), "--log", str(log), "--budget", "480"]
    assert steps.main(args + (["--final"] if final else [])) == 0
    return json.loads((out / "device_check.json").read_text())


def test_record_leaves_out_what_the_tool_cannot_return_and_says_so(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    sec = work / "sections" / "11-bench-sit-64"
    sec.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (sec / "big.bin").write_bytes(rng.bytes(5 * 2**20))  # incompressible, over the 4 MiB member limit
    (sec / "small.bin").write_bytes(rng.bytes(2**20))
    partial = {"partial": True, "stage": "repeat 1/2", "workload": {"model": "SiT-XL/2"},
               "rows": [{"precision": "bf16", "backend": "compiled", "batch_size": 64, "repeats_done": 1,
                         "samples_per_s": 12.5}]}
    (sec / "bench.json").write_text(json.dumps(partial))
    (work / "sections.tsv").write_text("bench-sit-64\ttimed-out\t124\t145\t170\t80\t95\t310\t\n")
    log = out / "device_check.log"
    out.mkdir()
    log.write_bytes(b"x" * (20 * 2**20))  # a runaway log
    summary = _record(work, out, log)
    assert [(d["path"], d["why"]) for d in summary["archive"]["left_out"]] == [("11-bench-sit-64/big.bin", "over 4 MiB")]
    with tarfile.open(out / "device_check.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["sections/11-bench-sit-64/bench.json", "sections/11-bench-sit-64/small.bin"]
    assert summary["log_trimmed"] and log.stat().st_size <= 16 * 2**20
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir()) and len(list(out.iterdir())) <= 8
    # A bench cut off by its timeout still reports the rows it had finished.
    bench = summary["results"]["bench-sit-64"]["bench"]
    assert bench["partial"] is True and bench["rows"][0]["samples_per_s"] == 12.5
    assert summary["sections"][0] == {"name": "bench-sit-64", "status": "timed-out", "rc": 124, "seconds": 145,
                                      "cap": 170, "need": 80, "est": 95, "start": 310, "reason": ""}


def test_record_reads_the_pytest_junit_report(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    sec = work / "sections" / "10-pytest-gpu"
    sec.mkdir(parents=True)
    (sec / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_kernels_gpu" name="test_a"/>'
        '<testcase classname="tests.test_kernels_gpu" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_kernels_gpu" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    (work / "sections.tsv").write_text("")
    summary = _record(work, out, out / "device_check.log", final=False)
    assert summary["results"]["pytest-gpu"]["pytest"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1,
                                                          "failed": ["tests.test_kernels_gpu::test_b"]}


# ----------------------------------------------------------------------------------------- compare


def _run(folder: Path, latents: np.ndarray, step: str, precision: str) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "latents.npy", latents)
    (folder / "manifest.json").write_text(json.dumps({"backend": {"step": step}, "sampler": {"precision": precision}}))
    return folder


def _bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (round to nearest even on the upper 16 bits), back in float32."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32)


@pytest.fixture
def latents():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((8, 4, 32, 32)).astype(np.float32)
    eager = _bf16(ref * 1.001) / np.float32(1.001)  # bf16-sized rounding error
    captured = eager.copy()
    captured.reshape(-1)[::97] = _bf16(ref.reshape(-1)[::97] * np.float32(0.999)) / np.float32(0.999)  # flips
    return ref, eager, captured


def test_compare_accepts_rounding_level_differences(tmp_path, latents):
    ref, eager, captured = latents
    _run(tmp_path / "captured", captured, "cuda-graph", "bf16")
    _run(tmp_path / "eager", eager, "cuda", "bf16")
    _run(tmp_path / "reference", ref, "reference", "reference")
    got = steps.compare_runs(tmp_path / "captured", tmp_path / "eager", tmp_path / "reference")
    assert got["ok"], got["checks"]
    assert 0 < got["eager_vs_reference"]["max_abs"] < 0.05 and got["captured_vs_eager"]["max_abs"] > 0


@pytest.mark.parametrize("fault, check", [
    ("captured is 10x off", "captured_within_twice_eager_error"),
    ("captured did not capture", "paths"),
    ("eager is far from the reference", "bf16_rel_l2_below_sanity_bound"),
    ("a NaN", "finite"),
])
def test_compare_names_the_bound_that_fails(tmp_path, latents, fault, check):
    ref, eager, captured = latents
    step = "cuda-graph"
    if fault == "captured is 10x off":
        captured = ref + 10 * (eager - ref)
    elif fault == "captured did not capture":
        step = "cuda"
    elif fault == "eager is far from the reference":
        eager = ref * np.float32(1.1)
        captured = eager.copy()
    elif fault == "a NaN":
        captured = captured.copy()
        captured[0, 0, 0, 0] = np.nan
    _run(tmp_path / "captured", captured, step, "bf16")
    _run(tmp_path / "eager", eager, "cuda", "bf16")
    _run(tmp_path / "reference", ref, "reference", "reference")
    got = steps.compare_runs(tmp_path / "captured", tmp_path / "eager", tmp_path / "reference")
    assert not got["ok"] and not got["checks"][check], got["checks"]


def test_compare_says_which_run_left_no_latents(tmp_path, latents):
    ref, eager, _ = latents
    (tmp_path / "captured").mkdir()
    _run(tmp_path / "eager", eager, "cuda", "bf16")
    _run(tmp_path / "reference", ref, "reference", "reference")
    out = tmp_path / "c.json"
    assert steps.main(["compare", "--dir", str(tmp_path), "--out", str(out)]) == 1
    assert json.loads(out.read_text())["error"] == "no latents.npy from captured"
