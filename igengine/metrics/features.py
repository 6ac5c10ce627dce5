"""Batched feature extraction: images from an ``NpzImages`` or ``FolderImages`` through the FID network, on the device.

Per batch: uint8 [b, H, W, 3] (host) -> device -> float32 [b, 3, H, W] -> network -> pool [b, 2048]
and spatial [b, 2023]. The pool features are kept (float32, on the host: 50,000 x 2048 is 410 MB;
precision/recall and the Inception Score need them); pool and spatial statistics are accumulated
on the device in float64 (``Moments``); spatial features are not kept. TF32 is switched off for
the duration (cuDNN allows it for convolutions by default), so the network runs in true float32
as the TensorFlow graph does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from igengine.metrics.inception import POOL_DIM, SPATIAL_DIM
from igengine.metrics.reader import Images
from igengine.metrics.stats import Moments

Network = Callable[[torch.Tensor], dict]  # float32 [b, 3, H, W] pixels 0..255 -> {"pool", "spatial"}


@dataclass
class FeatureSet:
    """Features of one image set."""

    n: int
    pool: np.ndarray  # float32 [n, 2048]
    pool_moments: Moments
    spatial_moments: Moments | None


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions while inside (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_device_pixels(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [b, H, W, 3] (numpy) -> float32 [b, 3, H, W] on ``device``."""
    t = torch.from_numpy(batch)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device).permute(0, 3, 1, 2).float()


def extract(images: Images, network: Network, device: torch.device, batch_size: int, *,
            spatial: bool = True, limit: int | None = None,
            on_batch: Callable[[int], None] | None = None) -> FeatureSet:
    """Run ``network`` over the images (index order); ``on_batch(images_done_in_this_set)`` after each batch."""
    total = images.n if limit is None else min(images.n, limit)
    pool = None
    pool_m = spatial_m = None
    done = 0
    with torch.inference_mode(), exact_float32():
        for batch in images.batches(batch_size, limit=limit):
            out = network(to_device_pixels(batch, device))
            p = out["pool"]
            if pool is None:  # widths from the network (2048 and 2023 for the FID Inception)
                pool = np.empty((total, p.shape[1]), dtype=np.float32)
                pool_m = Moments(p.shape[1], device)
                spatial_m = Moments(out["spatial"].shape[1], device) if spatial else None
            pool_m.update(p)
            if spatial_m is not None:
                spatial_m.update(out["spatial"])
            pool[done:done + len(batch)] = p.float().cpu().numpy()
            done += len(batch)
            if on_batch is not None:
                on_batch(done)
    if pool is None:
        pool, pool_m = np.empty((0, POOL_DIM), dtype=np.float32), Moments(POOL_DIM, device)
        spatial_m = Moments(SPATIAL_DIM, device) if spatial else None
    return FeatureSet(n=done, pool=pool[:done], pool_moments=pool_m, spatial_moments=spatial_m)


__all__ = ["FeatureSet", "Network", "exact_float32", "extract", "to_device_pixels"]
