"""The noise contract: every random number of a sample is a pure function of (seed, index, stream, element).

Nothing depends on batch size, batch position, GPU count, device or resume point, so sample ``i`` of
seed ``s`` is the same image however and wherever it is computed.

Generator
    Philox4x32-10 (Salmon et al., SC'11; Random123; cuRAND's ``Philox4_32_10``), a counter-based
    generator: 10 rounds of a keyed bijection of a 128-bit counter.
    key     = (seed mod 2^32, seed div 2^32)                       seed in [0, 2^64)
    counter = (block, stream, index mod 2^32, index div 2^32)      index in [0, 2^64)
    One call yields four 32-bit words (w0, w1, w2, w3).

Gaussians
    Element ``e`` of a sample (C order over its shape) lives in block ``e div 4``. Box-Muller, in
    float64, with u = (w + 0.5) / 2^32 (never 0 or 1):
        r = sqrt(-2 ln u0),  phi = 2 pi u1  ->  element 4b   = r cos(phi), element 4b+1 = r sin(phi)
        r = sqrt(-2 ln u2),  phi = 2 pi u3  ->  element 4b+2 = r cos(phi), element 4b+3 = r sin(phi)
    then rounded to float32. Elements past the end of the sample are computed and dropped.

Streams
    0        initial state x_T
    1 + k    SDE noise of solver step k (k = 0 .. steps - 2)
    2^32 - 1 random class label: w0 of block 0, mod num_classes

Balanced labels are ``index mod num_classes`` and use no random numbers.

This module is the reference implementation (vectorised NumPy on the CPU); the CUDA kernels and
their CPU twin in csrc/ implement the same function and are tested bit-for-bit against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

STREAM_INITIAL = 0
STREAM_LABEL = 2**32 - 1

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def sde_stream(step: int) -> int:
    """Stream id of the SDE noise consumed by solver step ``step`` (0-based)."""
    if not 0 <= step < STREAM_LABEL - 1:
        raise ValueError(f"SDE step {step} out of range")
    return 1 + step


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 on arrays of counters.

    counter: (..., 4) integers < 2^32;  key: (2,) or (..., 2) integers < 2^32.
    Returns (..., 4) uint32 words. Vectorised with uint64 lanes (products of two 32-bit words).
    """
    c = np.asarray(counter, dtype=np.uint64)
    k = np.broadcast_to(np.asarray(key, dtype=np.uint64), c.shape[:-1] + (2,))
    c0, c1, c2, c3 = (c[..., i].copy() for i in range(4))
    k0, k1 = k[..., 0].copy(), k[..., 1].copy()
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = _M0 * c0  # exact: both factors < 2^32
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def check_seed(seed: int) -> int:
    """``seed`` as an int, or ValueError unless it lies in [0, 2^64) (the contract's key range)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"`seed` must lie in [0, 2^64), got {seed}")
    return seed


def check_stream(stream: int) -> int:
    stream = int(stream)
    if not 0 <= stream < 2**32:
        raise ValueError(f"`stream` must lie in [0, 2^32), got {stream}")
    return stream


def check_indices(indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Sample indices as a flat int64 tensor (on their own device), or ValueError if one is negative.

    Indices on a GPU are not inspected (that would synchronise the host); callers that build them
    on the GPU build them from checked host values.
    """
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if idx.device.type == "cpu" and idx.numel() and int(idx.min()) < 0:
        raise ValueError("sample `indices` must be >= 0")
    return idx


def _seed_key(seed: int) -> np.ndarray:
    seed = check_seed(seed)
    return np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)


def _as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    return check_indices(indices).cpu().numpy().astype(np.uint64)


def philox_words(seed: int, indices, stream: int, num_blocks: int) -> np.ndarray:
    """Raw words of the contract: (len(indices), num_blocks, 4) uint32."""
    stream = check_stream(stream)
    idx = _as_indices(indices)
    n = idx.size
    ctr = np.empty((n, num_blocks, 4), dtype=np.uint64)
    ctr[..., 0] = np.arange(num_blocks, dtype=np.uint64)[None, :]
    ctr[..., 1] = np.uint64(stream)
    ctr[..., 2] = (idx & _MASK32)[:, None]
    ctr[..., 3] = (idx >> _SHIFT32)[:, None]
    return philox4x32(ctr, _seed_key(seed))


def words_to_gaussian(words: np.ndarray) -> np.ndarray:
    """Box-Muller of the contract: (..., 4) uint32 -> (..., 4) float32."""
    u = (words.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    r01 = np.sqrt(-2.0 * np.log(u[..., 0]))
    r23 = np.sqrt(-2.0 * np.log(u[..., 2]))
    a01 = 2.0 * np.pi * u[..., 1]
    a23 = 2.0 * np.pi * u[..., 3]
    out = np.stack([r01 * np.cos(a01), r01 * np.sin(a01), r23 * np.cos(a23), r23 * np.sin(a23)], axis=-1)
    return out.astype(np.float32)


def gaussian(seed: int, indices, stream: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of the contract: float32 tensor (len(indices), *shape) on the CPU.

    Row ``j`` is a pure function of (seed, indices[j], stream): it does not depend on the other
    indices, on their order or on how many there are.
    """
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    blocks = (numel + 3) // 4
    g = words_to_gaussian(philox_words(seed, indices, stream, blocks))
    g = g.reshape(g.shape[0], blocks * 4)[:, :numel]
    return torch.from_numpy(np.ascontiguousarray(g)).reshape(-1, *shape)


def random_labels(seed: int, indices, num_classes: int) -> torch.Tensor:
    """Class labels of the contract: w0 of block 0 in stream 2^32 - 1, mod num_classes. int64 (N,)."""
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    w0 = philox_words(seed, indices, STREAM_LABEL, 1)[:, 0, 0].astype(np.int64)
    return torch.from_numpy(w0 % num_classes)


def balanced_labels(indices, num_classes: int) -> torch.Tensor:
    """index mod num_classes (every class equally often over any num_classes consecutive indices)."""
    return torch.from_numpy((_as_indices(indices) % np.uint64(num_classes)).astype(np.int64))
