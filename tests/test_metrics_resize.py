"""TF1 bilinear resize (what the FID Inception graph does to 256 px samples) against independent references.

1. TensorFlow's own kernel: tests/data/tf1_resize_bilinear.json holds the sha256 of
   tf.compat.v1.image.resize_bilinear(align_corners=False, half_pixel_centers=False) on portable
   integer-hash images (TensorFlow 2.21 CPU, benchmarks/tf_resize_fixture.py). Expected: bit-identical,
   because the kernel's float32 operations are done in the same order (tolerance 0, measured 0).
2. A per-pixel scalar transcription of the kernel written here (numpy float32 scalars): bit-identical too.
3. torch-fidelity's independent port, when importable (it is not a test dependency: it requires
   torchvision, whose PyPI wheel pins its own torch build).
And a guard that the test could fail: torch's default (half-pixel) bilinear differs by > 10 grey levels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igengine.metrics.resize import tf1_resize_bilinear

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from tf_resize_cases import CASES, pattern_images  # noqa: E402

FIXTURE = json.loads((DATA / "tf1_resize_bilinear.json").read_text())


def ours_nhwc(x_uint8: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float()
    return np.ascontiguousarray(tf1_resize_bilinear(t, size).permute(0, 2, 3, 1).numpy(), dtype="<f4")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0][1]}x{c[0][2]}->{c[1][0]}x{c[1][1]}" for c in CASES])
def test_resize_is_bit_identical_to_tensorflow_kernel(case):
    shape, size = CASES[case]
    rec = FIXTURE["cases"][case]
    assert rec["input_shape"] == list(shape) and rec["size"] == list(size)
    y = ours_nhwc(pattern_images(shape), size)
    assert y[0, 0, : len(rec["first_row"]), 0].tolist() == pytest.approx(rec["first_row"], abs=0)
    assert hashlib.sha256(y.tobytes()).hexdigest() == rec["sha256"]


def scalar_tf1_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF's ResizeBilinear (legacy scaler) pixel by pixel, numpy float32 scalars; img [H, W, C]."""
    f32 = np.float32
    in_h, in_w, c = img.shape
    sy, sx = f32(in_h) / f32(out_h), f32(in_w) / f32(out_w)
    out = np.zeros((out_h, out_w, c), dtype=np.float32)
    for y in range(out_h):
        fy = f32(y) * sy
        y0, y1 = int(np.floor(fy)), min(int(np.ceil(fy)), in_h - 1)
        wy = f32(fy - f32(np.floor(fy)))
        for x in range(out_w):
            fx = f32(x) * sx
            x0, x1 = int(np.floor(fx)), min(int(np.ceil(fx)), in_w - 1)
            wx = f32(fx - f32(np.floor(fx)))
            for ch in range(c):
                tl, tr = f32(img[y0, x0, ch]), f32(img[y0, x1, ch])
                bl, br = f32(img[y1, x0, ch]), f32(img[y1, x1, ch])
                top = f32(tl + f32(f32(tr - tl) * wx))
                bottom = f32(bl + f32(f32(br - bl) * wx))
                out[y, x, ch] = f32(top + f32(f32(bottom - top) * wy))
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((9, 13), (20, 11)), ((31, 31), (17, 40)), ((2, 3), (7, 7)),
                                          ((40, 40), (47, 47))])
def test_resize_matches_scalar_transcription_of_the_kernel(in_hw, out_hw):
    img = np.random.default_rng(sum(in_hw) + sum(out_hw)).integers(0, 256, (*in_hw, 3)).astype(np.uint8)
    want = scalar_tf1_resize(img, *out_hw)
    got = ours_nhwc(img[None], out_hw)[0]
    assert np.array_equal(got, want), f"max abs {np.abs(got - want).max()}"


def test_resize_differs_from_torch_half_pixel_bilinear():
    x = pattern_images((1, 256, 256, 3))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    ours = tf1_resize_bilinear(t, (299, 299))
    torch_default = F.interpolate(t, (299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_default).abs().max() > 10.0


def test_resize_keeps_dtype_device_and_rejects_non_float32():
    with pytest.raises(ValueError):
        tf1_resize_bilinear(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        tf1_resize_bilinear(torch.zeros(3, 4, 4))
    y = tf1_resize_bilinear(torch.zeros(2, 3, 4, 5), (6, 7))
    assert y.shape == (2, 3, 6, 7) and y.dtype == torch.float32


def _torch_fidelity_resize():
    """torch-fidelity's TF1-compatible resize, imported without running its package __init__ (torchvision)."""
    try:
        spec = importlib.util.find_spec("torch_fidelity")
    except ValueError:  # a stand-in module without a spec is in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    saved = sys.modules.get("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    try:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        return interpolate_bilinear_2d_like_tensorflow1x
    finally:
        if saved is not None:
            sys.modules["torch_fidelity"] = saved
        else:
            sys.modules.pop("torch_fidelity", None)


def test_resize_matches_torch_fidelity_port():
    fn = _torch_fidelity_resize()
    if fn is None:
        pytest.skip("torch-fidelity is not installed (not a test dependency: it requires torchvision, whose "
                    "PyPI wheel pins a CUDA torch); pip install --no-deps torch-fidelity to run this check")
    x = torch.from_numpy(pattern_images((2, 256, 256, 3))).permute(0, 3, 1, 2).float()
    theirs = fn(x, size=(299, 299), align_corners=False)
    ours = tf1_resize_bilinear(x, (299, 299))
    # Another author's code for the same kernel; measured bit-identical (0.0) with torch-fidelity 0.4.0.
    # Allowed: a few float32 ulps of values up to 255 (ulp 1.5e-5), in case its op order changes.
    assert (ours - theirs).abs().max().item() <= 1e-4
