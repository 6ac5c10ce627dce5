"""TF1 bilinear resize: what the FID Inception graph does to its input before the first convolution.

The 2015-12-05 Inception graph (``classify_image_graph_def.pb``, the network of the ADM evaluator and
of TTUR's FID) takes float images of any size at ``ExpandDims:0`` and resizes them to 299 x 299
with ``ResizeBilinear`` (align_corners=False; the graph predates ``half_pixel_centers``, so it is
False). That is TensorFlow's *legacy* bilinear, not the half-pixel one that ``torch.nn.functional
.interpolate(mode="bilinear", align_corners=False)`` implements: output pixel ``i`` samples the input
at ``i * in / out`` (no half-pixel offset), so the last rows and columns are clamped instead of
symmetric. On a 256 -> 299 resize the two differ by tens of grey levels at edges.

The arithmetic follows the TF kernel (resize_bilinear_op.cc) in float32, step for step:
    scale = float32(in) / float32(out)
    src   = float32(i) * scale
    lo    = floor(src),  hi = min(ceil(src), in - 1),  w = src - floor(src)
    top   = a[y_lo, x_lo] + (a[y_lo, x_hi] - a[y_lo, x_lo]) * w_x      (same for bottom with y_hi)
    out   = top + (bottom - top) * w_y
Interpolating along x first for both source rows and then along y performs exactly these
operations in this order, so the separable form below gives the same float32 results.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=16)
def legacy_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo int64 [out], hi int64 [out], w float32 [out]) of TF's legacy (align_corners=False) scaler."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize {in_size} -> {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale  # float32 * float32, as the kernel
    lo_f = np.floor(src)
    lo = np.maximum(lo_f.astype(np.int64), 0)
    hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    w = (src - lo_f).astype(np.float32)
    return lo, hi, w


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """Resize float32 images [N, C, H, W] to ``size`` (H', W') as TF1 ``resize_bilinear`` does.

    Args:
        x: float32 tensor [N, C, H, W] (any values; the FID graph feeds raw 0..255 pixels).
        size: (out_height, out_width).
    Returns:
        float32 tensor [N, C, out_height, out_width] on x's device.
    """
    if x.dim() != 4 or x.dtype != torch.float32:
        raise ValueError(f"expected float32 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    out_h, out_w = int(size[0]), int(size[1])
    _, _, in_h, in_w = x.shape
    dev = x.device
    # Gathers by advanced indexing (index_select is several times slower on CPU builds of torch 2.x).
    if in_w != out_w:
        lo, hi, w = (torch.from_numpy(a).to(dev) for a in legacy_weights(in_w, out_w))
        left, right = x[:, :, :, lo], x[:, :, :, hi]  # (N, C, H, W')
        x = left + (right - left) * w  # w broadcasts over the last axis
        del left, right
    if in_h != out_h:
        lo, hi, w = (torch.from_numpy(a).to(dev) for a in legacy_weights(in_h, out_h))
        top, bottom = x[:, :, lo, :], x[:, :, hi, :]  # (N, C, H', W')
        x = top + (bottom - top) * w[:, None]
    return x.contiguous()


__all__ = ["legacy_weights", "tf1_resize_bilinear"]
