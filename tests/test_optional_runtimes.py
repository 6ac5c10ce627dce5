"""igengine and its torch backend work with none of onnx, onnxscript, onnxruntime or tensorrt installed."""

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys
for name in ("onnx", "onnxscript", "onnxruntime", "tensorrt"):
    sys.modules[name] = None  # any `import name` now raises ImportError, as if not installed
import igengine, igengine.backends, igengine.export, igengine.export.cache, igengine.export.tensorrt
import igengine.backends.onnxruntime_backend, igengine.backends.tensorrt_backend, igengine.jobs.sample
from igengine.cli import main
out = sys.argv[1]
assert main(["sample", "--n", "2", "--steps", "2", "--out", out + "/torch"]) == 0
assert main(["sample", "--n", "2", "--steps", "2", "--backend", "onnxruntime", "--out", out + "/ort"]) != 0
assert main(["export", "--ckpt", "igengine/assets/sit_digits.safetensors", "--out", out + "/exp"]) != 0
assert not [m for m in ("onnx", "onnxruntime", "tensorrt") if sys.modules.get(m) is not None]
"""


def test_igengine_imports_and_samples_without_onnx_onnxruntime_or_tensorrt(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("igengine: error:")]
    assert errors == [
        "igengine: error: the onnxruntime backend needs ONNX Runtime, which is not installed: pip install onnxruntime "
        "(CPU) or onnxruntime-gpu (CUDA), or pip install 'igengine[onnx]'",
        "igengine: error: reading or writing ONNX graphs needs onnx (and onnxscript to export): pip install 'igengine[onnx]'",
    ], proc.stderr
