"""benchmarks/official_speed.py's roofline: rows per evaluation, FLOPs of the full run, MFU and ceiling.

The peak is replaced by a fixed number so that the arithmetic can be checked exactly; the real
measurement is ``matmul_peak`` (tests/test_peak.py).
"""

import pytest
import torch

from benchmarks import official_speed
from igengine.bench import peak as peak_module
from igengine.bench.flops import forward_flops
from igengine.models import preset

PEAK = 1.0e11


@pytest.fixture
def fixed_peak(monkeypatch):
    asked = []

    def fake_peak(dtype, device, allow_tf32=False, **kwargs):
        asked.append((dtype, allow_tf32))
        return {"dtype": str(dtype), "max_flops": PEAK * (2 if dtype == torch.bfloat16 else 1)}

    monkeypatch.setattr(peak_module, "matmul_peak", fake_peak)
    return asked


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


def test_roofline_flops_mfu_and_ceiling(fixed_peak):
    model, batch, n_in, n_out = "LightningDiT-B/1", 2, 139, 109
    report = {"implementations": {
        "official": {"full_run_s": {"median": 600.0}},
        "igengine:fp32": {"full_run_s": {"median": 400.0}},
        "igengine:bf16": {"full_run_s": {"median": 300.0}},
        "igengine:onnxruntime": {"error": "failed"},  # no time: FLOPs and ceiling only
    }}
    out = official_speed.roofline(report, "lightningdit", model, "cpu", batch, n_in, n_out, 2)
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
    # One measurement per dtype: fp32 (no TF32 on a CPU) and bf16.
    assert sorted(fixed_peak, key=str) == sorted([(torch.float32, False), (torch.bfloat16, False)], key=str)
