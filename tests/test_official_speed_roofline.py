"""benchmarks/official_speed.py's roofline: rows per evaluation, FLOPs of the full run, MFU and ceiling.

The roofline arithmetic is checked on fixed peaks; ``measure_peaks`` on a small product (the real
measurements themselves are ``matmul_peak``'s, tests/test_peak.py).
"""

import pytest
import torch

from benchmarks import official_speed
from igengine.bench.flops import forward_flops
from igengine.models import preset

PEAK = 1.0e11


def test_rows_per_evaluation_follow_each_implementation():
    # The official LightningDiT runs forward_with_cfg (2N rows) everywhere; the rest run N outside CFG.
    assert official_speed.evaluation_rows("official", "lightningdit", 3) == {"in": 6, "out": 6}
    assert official_speed.evaluation_rows("official", "sit", 3) == {"in": 6, "out": 3}
    assert official_speed.evaluation_rows("igengine:compiled", "lightningdit", 3) == {"in": 6, "out": 3}


def test_peak_dtype_per_implementation():
    assert official_speed.peak_dtype("official", "cuda") == ("float32", True)
    assert official_speed.peak_dtype("official", "cpu") == ("float32", False)
    assert official_speed.peak_dtype("igengine:compiled-bf16", "cuda") == ("bfloat16", False)
    assert official_speed.peak_dtype("igengine:fp16", "cuda") == ("float16", False)
    assert official_speed.peak_dtype("igengine:onnxruntime", "cuda") == ("float32", False)


def test_network_gemm_is_the_mlp_input_product_at_cfg_rows():
    assert official_speed.network_gemm("SiT-B/2", 2) == (4 * 256, 768, 3072)
    # LightningDiT's SwiGLU: both gates of width int(2/3 * 3072) = 2048 in one product.
    assert official_speed.network_gemm("LightningDiT-B/1", 2) == (4 * 256, 768, 4096)


def test_roofline_flops_mfu_and_ceiling_use_the_highest_peak_of_the_run():
    model, batch, n_in, n_out = "LightningDiT-B/1", 2, 139, 109
    report = {"implementations": {
        "official": {"full_run_s": {"median": 600.0}},
        "igengine:fp32": {"full_run_s": {"median": 400.0}},
        "igengine:bf16": {"full_run_s": {"median": 300.0}},
        "igengine:onnxruntime": {"error": "failed"},  # no time: FLOPs and ceiling only
    }}
    peaks = [{"float32": {"flop_per_s": 0.8 * PEAK}, "bfloat16": {"flop_per_s": 2 * PEAK}},
             {"float32": {"flop_per_s": PEAK}, "bfloat16": {"flop_per_s": 1.5 * PEAK}}]
    out = official_speed.roofline(report, "lightningdit", model, "cpu", batch, n_in, n_out, peaks)
    assert out["peaks"]["float32"]["flop_per_s"] == PEAK and out["peaks"]["bfloat16"]["flop_per_s"] == 2 * PEAK
    cfg = preset(model)
    impl = out["implementations"]
    official_flop = (n_in + n_out) * forward_flops(cfg, 4)
    ours_flop = n_in * forward_flops(cfg, 4) + n_out * forward_flops(cfg, 2)
    assert impl["official"]["full_run_flop"] == official_flop
    assert impl["igengine:fp32"]["full_run_flop"] == ours_flop
    assert impl["official"]["mfu"] == pytest.approx(official_flop / 600.0 / PEAK, abs=1e-4)
    assert impl["igengine:fp32"]["mfu"] == pytest.approx(ours_flop / 400.0 / PEAK, abs=1e-4)
    assert impl["igengine:fp32"]["ceiling_ratio_vs_official"] == pytest.approx(600.0 / (ours_flop / PEAK), abs=1e-3)
    # bf16 rows are bounded by the bf16 peak (twice the fp32 one here): twice the ceiling.
    assert impl["igengine:bf16"]["ceiling_ratio_vs_official"] == pytest.approx(
        2 * impl["igengine:fp32"]["ceiling_ratio_vs_official"], rel=1e-3)
    assert "mfu" not in impl["igengine:onnxruntime"] and "ceiling_ratio_vs_official" in impl["igengine:onnxruntime"]
    assert "ceiling_ratio_vs_official" not in impl["official"]


def test_measure_peaks_takes_the_fastest_kernel(monkeypatch):
    monkeypatch.setattr(official_speed, "network_gemm", lambda model, batch: (64, 32, 48))
    got = official_speed.measure_peaks(["official", "igengine:fp32"], "SiT-B/2", "cpu", 2)
    assert set(got) == {"float32"}  # both run fp32 on a CPU: one measurement
    entry = got["float32"]
    assert any(k.startswith("square 1024") for k in entry["kernels"])
    assert any(k.startswith("64x32x48") for k in entry["kernels"])
    try:
        import onnxruntime  # noqa: F401
        assert "64x32x48 onnxruntime MatMul" in entry["kernels"]
    except ImportError:
        pass
    assert entry["kernel"] == max(entry["kernels"], key=entry["kernels"].get)
    assert entry["flop_per_s"] == pytest.approx(entry["kernels"][entry["kernel"]], rel=1e-6, abs=1)
