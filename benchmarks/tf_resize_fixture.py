"""Record TensorFlow's own TF1 bilinear resize on the test images (tests/data/tf1_resize_bilinear.json).

    python benchmarks/tf_resize_fixture.py       # in an environment with tensorflow (e.g. tensorflow-cpu)

Runs ``tf.compat.v1.image.resize_bilinear(x, size, align_corners=False, half_pixel_centers=False)``
(the op and attributes of the FID Inception graph's ``ResizeBilinear``) on the integer-hash images of
tests/data/tf_resize_cases.py and writes the sha256 of each float32 output (C order, little-endian)
with a few values. tests/test_metrics_resize.py checks igengine's resize against it, bit for bit.
Needs numpy and tensorflow only (no torch, no igengine).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from tf_resize_cases import CASES, pattern_images  # noqa: E402


def main() -> None:
    import tensorflow as tf

    records = []
    for shape, size in CASES:
        x = pattern_images(shape).astype(np.float32)
        y = tf.compat.v1.image.resize_bilinear(x, size, align_corners=False, half_pixel_centers=False).numpy()
        y = np.ascontiguousarray(y, dtype="<f4")
        records.append({"input_shape": list(shape), "size": list(size),
                        "sha256": hashlib.sha256(y.tobytes()).hexdigest(),
                        "first_row": [float(v) for v in y[0, 0, : min(8, y.shape[2]), 0]],
                        "mean": float(y.astype(np.float64).mean())})
    out = {"op": "tf.compat.v1.image.resize_bilinear(align_corners=False, half_pixel_centers=False)",
           "tensorflow": tf.__version__, "numpy": np.__version__, "machine": platform.machine(),
           "layout": "NHWC float32, sha256 of the C-order little-endian bytes", "cases": records}
    path = ROOT / "tests" / "data" / "tf1_resize_bilinear.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
