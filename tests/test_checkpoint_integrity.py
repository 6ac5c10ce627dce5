"""Damaged checkpoints are reported as damaged, naming the file and the tensor (issue 11, item 7b).

The damages are made the way a bad copy or a bad disk makes them, inside torch.save's zip format:
a storage record cut short while the zip directory stays consistent (``torch.load(mmap=True)`` then
reads the missing bytes from the next record: NaN or garbage weights), bytes flipped inside a record
(its CRC-32 no longer matches: silently wrong weights), a record missing, the directory's size of a
record altered, the file's tail cut off; and, for safetensors, a truncated file and a header whose
offsets disagree with a tensor's shape.
"""

from __future__ import annotations

import argparse
import json
import struct
import zipfile

import pytest
import torch

from igengine.cli import main
from igengine.errors import CheckpointError
from igengine.models import IGDiT, preset
from igengine.models.checkpoint import load_checkpoint, save_safetensors
from igengine.safeload import read_checkpoint
from tests.conftest import randomize_

VICTIM = "blocks.0.adaLN_modulation.1.weight"  # the largest tensor of the model below


def small_sit(seed: int = 3) -> IGDiT:
    return randomize_(IGDiT(preset("SiT-S/2", input_size=8, depth=2, encoder_depth=1, hidden_size=96,
                                   num_classes=10)), seed=seed)


@pytest.fixture
def healthy(tmp_path):
    """A training checkpoint as SiT's train.py writes it (ema, model, opt, args) and the ema weights."""
    ema, model = small_sit(3), small_sit(4)
    path = tmp_path / "healthy.pt"
    args = argparse.Namespace(model="SiT-S/2", num_classes=10, encoder_depth=1)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}}, "args": args}, path)
    return path, ema.state_dict()


def torch_load(path, mmap: bool = False):
    """torch.load alone, as the loader calls it (weights only, argparse.Namespace allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")


def record_of(path, entry: str, key: str) -> zipfile.ZipInfo:
    """The zip record holding the storage of tensor ``entry.key``, found by the bytes it holds."""
    state = torch_load(path)[entry]
    want = state[key].contiguous().numpy().tobytes()
    with zipfile.ZipFile(path) as zf:
        hits = [i for i in zf.infolist() if "/data/" in i.filename and zf.read(i) == want]
    assert len(hits) == 1
    return hits[0]


def rewrite(src, dst, change) -> None:
    """Rewrite a zip member by member through ``change(name, bytes) -> bytes | None`` (None drops it),
    with a consistent directory: sizes and CRCs describe the new members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def data_offset(raw: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def assert_damaged(path, *expect):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path} is damaged: "), msg
    for part in expect:
        assert part in msg, msg
    assert "\n" not in msg


def test_healthy_checkpoints_load_including_a_rewritten_zip_and_one_saved_without_crcs(healthy, tmp_path):
    path, ema = healthy
    for candidate in (path, tmp_path / "rewritten.pt"):
        if candidate != path:
            rewrite(path, candidate, lambda name, data: data)  # same members, no 64-byte alignment
        loaded = load_checkpoint(candidate)
        assert loaded.weights == "ema"
        for k, v in ema.items():
            assert torch.equal(loaded.model.state_dict()[k], v), k

    from torch.utils.serialization import config

    saved = config.save.compute_crc32
    config.save.compute_crc32 = False  # torch then writes 0 as every record's CRC-32
    try:
        torch.save({"ema": ema}, tmp_path / "nocrc.pt")
    finally:
        config.save.compute_crc32 = saved
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as zf:
        assert all(i.CRC == 0 for i in zf.infolist())
    state, entry, _, _ = read_checkpoint(tmp_path / "nocrc.pt")
    assert entry == "ema" and all(torch.equal(state[k], v) for k, v in ema.items())


def test_a_storage_record_cut_short_is_damage_naming_the_tensor(healthy, tmp_path):
    path, ema = healthy
    victim = record_of(path, "ema", VICTIM)
    bad = tmp_path / "short.pt"
    rewrite(path, bad, lambda name, data: data[: len(data) // 2] if name == victim.filename else data)
    # What torch alone makes of it: the load succeeds and the tensor holds bytes of other records.
    hazard = torch_load(bad, mmap=True)["ema"][VICTIM]
    assert not torch.equal(hazard, ema[VICTIM])
    nbytes = ema[VICTIM].numel() * 4
    assert_damaged(bad, f"tensor ema.{VICTIM} (float32 {list(ema[VICTIM].shape)}, record {victim.filename})",
                   f"needs {nbytes} bytes but its record holds {nbytes // 2}")


def test_flipped_bytes_fail_the_crc_naming_the_tensor(healthy, tmp_path):
    path, ema = healthy
    victim = record_of(path, "ema", VICTIM)
    raw = bytearray(path.read_bytes())
    start = data_offset(raw, victim) + 1000
    raw[start: start + 64] = bytes(b ^ 0x5A for b in raw[start: start + 64])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    hazard = torch_load(bad, mmap=True)["ema"][VICTIM]
    assert torch.isfinite(hazard).all() and not torch.equal(hazard, ema[VICTIM])  # silently wrong weights
    assert_damaged(bad, f"tensor ema.{VICTIM} (float32", f"record {victim.filename}) fails its CRC-32 check")


def test_a_missing_record_and_a_shrunk_directory_size_are_damage(healthy, tmp_path):
    path, ema = healthy
    victim = record_of(path, "ema", VICTIM)
    gone = tmp_path / "missing.pt"
    rewrite(path, gone, lambda name, data: None if name == victim.filename else data)
    assert_damaged(gone, f"tensor ema.{VICTIM}", f"has no record {victim.filename} in the zip")

    # The central directory says the record is 8 bytes shorter (sizes at offsets 20 and 24 of its entry).
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(victim.filename)
    name, entry = victim.filename.encode(), -1
    while raw[entry + 46: entry + 46 + len(name)] != name or raw[entry + 46 + len(name): entry + 47 + len(name)] == b"/":
        entry = raw.index(b"PK\x01\x02", entry + 1)  # the next central-directory entry
    struct.pack_into("<II", raw, entry + 20, info.file_size - 8, info.file_size - 8)
    shrunk = tmp_path / "shrunk.pt"
    shrunk.write_bytes(bytes(raw))
    assert_damaged(shrunk, f"tensor ema.{VICTIM}", f"needs {info.file_size} bytes but its record holds {info.file_size - 8}")


def test_a_file_cut_short_is_damage_not_an_unknown_format(healthy, tmp_path):
    path, _ = healthy
    bad = tmp_path / "cut.pt"
    bad.write_bytes(path.read_bytes()[:-5000])
    assert_damaged(bad, "no readable zip directory at its end (truncated?)")


def test_crc_damage_outside_the_weights_entry_is_not_read(healthy, tmp_path):
    """Only the records of the entry the weights come from are read for their CRC ('model' is not, with 'ema')."""
    path, ema = healthy
    victim = record_of(path, "model", VICTIM)
    raw = bytearray(path.read_bytes())
    start = data_offset(raw, victim)
    raw[start: start + 16] = b"\xff" * 16
    bad = tmp_path / "model-damaged.pt"
    bad.write_bytes(bytes(raw))
    loaded = load_checkpoint(bad)
    assert loaded.weights == "ema" and all(torch.equal(loaded.model.state_dict()[k], v) for k, v in ema.items())
    # A record of that entry cut short is still refused: sizes are checked for every record.
    short = tmp_path / "model-short.pt"
    rewrite(path, short, lambda name, data: data[:-4] if name == victim.filename else data)
    assert_damaged(short, f"tensor model.{VICTIM}")


def test_damaged_safetensors_are_refused_naming_the_file_and_the_tensor(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors(small_sit(), good)
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    begin, end = header[VICTIM]["data_offsets"]

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-1000])
    header[VICTIM]["data_offsets"] = [begin, end - 4]
    text = json.dumps(header).encode()
    text += b" " * (n - len(text))
    skewed = tmp_path / "skewed.safetensors"
    skewed.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])

    assert load_checkpoint(good).weights == "safetensors"
    for path, expect in [(cut, "is damaged: its data section ends"), (skewed, f"is damaged: tensor {VICTIM}")]:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(e.value).startswith(f"safetensors file {path} ") and expect in str(e.value), str(e.value)


def test_cli_sample_with_a_damaged_checkpoint_exits_2_with_one_line(healthy, tmp_path, capsys):
    path, _ = healthy
    args = ["sample", "--n", 2, "--steps", 2, "--no-decode", "--device", "cpu"]
    assert main([*map(str, args), "--ckpt", str(path), "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    victim = record_of(path, "ema", VICTIM)
    bad = tmp_path / "damaged.pt"
    rewrite(path, bad, lambda name, data: data[:-64] if name == victim.filename else data)
    code = main([*map(str, args), "--ckpt", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"igengine: error: checkpoint {bad} is damaged: tensor ema.{VICTIM}"), lines[0]
    assert not (tmp_path / "o" / "latents.npy").exists()
