"""The noise contract: Philox4x32-10 pinned to known answers, Box-Muller layout, batch independence."""

import math

import numpy as np
import pytest
import torch

from igengine import noise

M = 0xFFFFFFFF
# Random123's published known-answer vectors for philox4x32 with 10 rounds (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_matches_random123_known_answers(ctr, key, expected):
    out = noise.philox4x32(np.array([ctr]), np.array(key))
    assert tuple(int(w) for w in out[0]) == expected


def test_philox_matches_randomgen_on_random_counters():
    randomgen = pytest.importorskip("randomgen", reason="randomgen (test extra) not installed")
    rng = np.random.default_rng(1)
    for _ in range(20):
        ctr = rng.integers(0, 2**32, size=4, dtype=np.uint64)
        key = rng.integers(0, 2**32, size=2, dtype=np.uint64)
        packed_ctr = sum(int(w) << (32 * i) for i, w in enumerate(ctr))
        packed_key = sum(int(w) << (32 * i) for i, w in enumerate(key))
        # randomgen increments its counter before producing a block.
        g = randomgen.Philox(number=4, width=32, counter=(packed_ctr - 1) % 2**128, key=packed_key)
        expected = [int(v) for v in g.random_raw(4)]
        assert [int(w) for w in noise.philox4x32(ctr[None], key)[0]] == expected


def test_counter_layout_block_stream_index():
    words = noise.philox_words(seed=(7 << 32) | 3, indices=[2**32 + 5], stream=9, num_blocks=3)
    for b in range(3):
        direct = noise.philox4x32(np.array([[b, 9, 5, 1]]), np.array([3, 7]))
        assert np.array_equal(words[0, b], direct[0])


def test_box_muller_layout_by_hand():
    g = noise.gaussian(seed=42, indices=[3], stream=0, shape=(6,))[0]
    w = noise.philox_words(42, [3], 0, 2)[0]
    expected = []
    for block in w:
        u = [(int(v) + 0.5) / 2**32 for v in block]
        r01, r23 = math.sqrt(-2 * math.log(u[0])), math.sqrt(-2 * math.log(u[2]))
        expected += [r01 * math.cos(2 * math.pi * u[1]), r01 * math.sin(2 * math.pi * u[1]),
                     r23 * math.cos(2 * math.pi * u[3]), r23 * math.sin(2 * math.pi * u[3])]
    assert g.dtype == torch.float32
    assert torch.equal(g, torch.tensor(expected[:6], dtype=torch.float64).float())


def test_rows_do_not_depend_on_the_batch():
    shape = (3, 5, 5)  # 75 elements: not a multiple of 4
    together = noise.gaussian(5, [0, 17, 4, 2**40], 1, shape)
    for j, idx in enumerate([0, 17, 4, 2**40]):
        alone = noise.gaussian(5, [idx], 1, shape)[0]
        assert torch.equal(together[j], alone)


def test_streams_seeds_and_high_seed_bits_are_distinct():
    a = noise.gaussian(1, [0], 0, (64,))
    assert not torch.equal(a, noise.gaussian(1, [0], 1, (64,)))
    assert not torch.equal(a, noise.gaussian(2, [0], 0, (64,)))
    assert not torch.equal(a, noise.gaussian(1 + 2**32, [0], 0, (64,)))
    assert not torch.equal(a, noise.gaussian(1, [2**32], 0, (64,)))


def test_gaussian_statistics():
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (test extra) not installed")
    g = noise.gaussian(0, range(64), 3, (1024,)).double().flatten().numpy()
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    assert scipy_stats.kstest(g, "norm").pvalue > 1e-3
    # Pairs from one block must be uncorrelated.
    pairs = g.reshape(-1, 2)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 0.02


def test_labels():
    idx = np.arange(1000)
    y = noise.random_labels(9, idx, 1000)
    w0 = noise.philox_words(9, idx, noise.STREAM_LABEL, 1)[:, 0, 0].astype(np.int64)
    assert torch.equal(y, torch.from_numpy(w0 % 1000))
    assert torch.equal(noise.random_labels(9, [500], 1000), y[500:501])
    assert torch.equal(noise.balanced_labels([0, 1, 10, 11], 10), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**64), dict(stream=2**32), dict(indices=[-1])])
def test_out_of_range_arguments_are_refused(bad):
    args = dict(seed=0, indices=[0], stream=0, shape=(4,))
    args.update(bad)
    with pytest.raises(ValueError):
        noise.gaussian(**args)
