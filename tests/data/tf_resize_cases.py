"""Inputs of the TF1 resize known-answer test: integer-hash images (portable: no RNG), numpy only.

Shared by tests/test_metrics_resize.py and benchmarks/tf_resize_fixture.py (which runs TensorFlow's
own kernel on them, in an environment that has TensorFlow, and records the outputs' sha256).
"""

import numpy as np

# (batch, height, width, channels) -> (out_height, out_width)
CASES = [
    ((2, 256, 256, 3), (299, 299)),  # the ADM case: 256 px samples into the 299 px graph
    ((1, 512, 512, 3), (299, 299)),  # downscaling
    ((1, 64, 64, 3), (299, 299)),
    ((1, 17, 23, 3), (31, 29)),  # odd sizes, different factors per axis
    ((1, 300, 400, 3), (299, 299)),
    ((1, 5, 7, 2), (3, 4)),
    ((1, 1, 1, 3), (4, 4)),
    ((1, 32, 32, 3), (32, 32)),  # identity
]


def pattern_images(shape) -> np.ndarray:
    """uint8 images of ``shape`` [N, H, W, C] from an integer hash of (n, y, x, c): noise-like, reproducible."""
    n, h, w, c = (np.arange(s, dtype=np.uint64) for s in shape)
    v = (n[:, None, None, None] * np.uint64(2654435761) + h[None, :, None, None] * np.uint64(40503)
         + w[None, None, :, None] * np.uint64(2246822519) + c[None, None, None, :] * np.uint64(3266489917))
    v = (v ^ (v >> np.uint64(13))) * np.uint64(0x9E3779B97F4A7C15)
    v ^= v >> np.uint64(29)
    return (v % np.uint64(256)).astype(np.uint8)
