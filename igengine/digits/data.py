"""The 8x8 digits data set (scikit-learn's bundled copy of the UCI optical digits), split once.

1,797 grey images with values 0..16 and 10 classes. A fixed, seeded split keeps the generator's
training images apart from the held-out images on which the evaluation classifier is trained.
Images map to [-1, 1] as x = v / 8 - 1.
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 20260101
HELD_OUT = 600  # images reserved for the evaluation classifier


def load_split() -> dict[str, np.ndarray]:
    """{'train_x', 'train_y', 'held_x', 'held_y'}; x float32 (N, 1, 8, 8) in [-1, 1], y int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
        raise RuntimeError("the digits demo needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    return {"train_x": x[train], "train_y": y[train], "held_x": x[held], "held_y": y[held]}


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC (the npz format, 3 identical channels) -> float (N, 64) in [0, 16] like the data set."""
    grey = images_uint8[..., 0].astype(np.float64)
    return (grey / 255.0 * 16.0).reshape(len(grey), -1)



def write_reference_npz(path, which: str = "held") -> int:
    """The digits as an `igengine evaluate` reference: ``arr_0`` uint8 [N, 8, 8, 3] through the same pixel
    conversion as the model's samples (SiT's), and ``labels`` int64 [N]. ``which``: 'held' (the 600
    held-out images the generator never saw), 'train' or 'all'. Returns N.

        python -c "from igengine.digits.data import write_reference_npz as w; w('digits_ref.npz')"
    """
    import torch

    from igengine.config import Family
    from igengine.vae.pixels import to_uint8

    split = load_split()
    if which not in ("held", "train", "all"):
        raise ValueError(f"which must be held, train or all, got {which!r}")
    parts = {"held": ["held"], "train": ["train"], "all": ["train", "held"]}[which]
    x = np.concatenate([split[f"{p}_x"] for p in parts])
    y = np.concatenate([split[f"{p}_y"] for p in parts])
    pixels = to_uint8(torch.from_numpy(x), Family.SIT)  # uint8 [N, 8, 8, 3]
    with open(path, "wb") as f:
        np.savez(f, arr_0=pixels, labels=y)
    return len(y)
