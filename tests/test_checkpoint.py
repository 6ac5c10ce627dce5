"""Checkpoint loading: official layouts, safe unpickling, config resolution and its errors."""

import argparse
import os
import pickle

import pytest
import torch

from igengine.models.checkpoint import CheckpointError, load_checkpoint, save_safetensors
from igengine.config import Family
from igengine.models import IGDiT, preset
from tests.conftest import randomize_, tiny_model


def small_sit(**kw):
    """A SiT-S/2 (6 heads) shrunk to width 96 and 8 blocks, so the official encoder_depth 8 is valid."""
    return randomize_(IGDiT(preset("SiT-S/2", input_size=8, depth=8, hidden_size=96, num_classes=10, **kw)), seed=3)


def official_sit_checkpoint(path, model, ema, **args):
    ns = argparse.Namespace(model="SiT-S/2", num_classes=10, qk_norm=False, resolution=64, fused_attn=True, **args)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": ns, "epoch": 3, "steps": 1000}, path)


def test_official_sit_training_checkpoint_prefers_ema(tmp_path):
    model, ema = small_sit(), small_sit()
    randomize_(ema, seed=99)
    path = tmp_path / "step-1000.pt"
    official_sit_checkpoint(path, model, ema)
    loaded = load_checkpoint(path)
    assert loaded.weights == "ema"
    assert loaded.config.name == "SiT-S/2" and loaded.config.depth == 8 and loaded.config.input_size == 8
    assert loaded.config.hidden_size == 96 and loaded.config.num_heads == 6
    # SiT's train.py records no encoder_depth: the official default is used and said so.
    assert loaded.config.encoder_depth == 8
    assert loaded.config.encoder_depth_source == "official default for SiT-S/2"
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert any("encoder_depth" in n for n in loaded.notes)


def test_encoder_depth_resolution_order(tmp_path):
    model = small_sit(encoder_depth=3)
    path = tmp_path / "ckpt.pt"
    official_sit_checkpoint(path, model, model, encoder_depth=2)
    assert load_checkpoint(path).config.encoder_depth == 2  # the checkpoint's args
    assert load_checkpoint(path).config.encoder_depth_source == "checkpoint args"
    flagged = load_checkpoint(path, overrides={"encoder_depth": 3})
    assert flagged.config.encoder_depth == 3 and flagged.config.encoder_depth_source == "--encoder-depth"


def test_lightningdit_training_checkpoint_with_config_dict(tmp_path):
    model = tiny_model("lightningdit")
    cfg = model.config
    config = {"model": {"model_type": "LightningDiT-B/1", "encoder_depth": cfg.encoder_depth, "use_qknorm": True,
                        "use_swiglu": True, "use_rope": True, "use_rmsnorm": True, "wo_shift": False,
                        "in_chans": cfg.in_channels},
              "data": {"num_classes": 10, "image_size": 64}}
    path = tmp_path / "0100000.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "config": config}, path)
    loaded = load_checkpoint(path, overrides={"num_heads": 4})
    c = loaded.config
    assert c.family == Family.LIGHTNINGDIT and c.hidden_size == 64 and c.depth == 3 and c.num_heads == 4
    assert c.use_rope and c.use_swiglu and c.use_rmsnorm and c.qk_norm
    assert c.encoder_depth == cfg.encoder_depth and c.encoder_depth_source == "checkpoint config"
    x, t, y = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.tensor([1, 10])
    assert torch.equal(loaded.model(x, t, y)[0], model(x, t, y)[0])


def test_bare_state_dict_needs_a_model_name(tmp_path):
    model = small_sit()
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="pass `model`"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, model_name="SiT-S/2", overrides={"num_heads": 6})  # a custom width: heads given
    assert loaded.weights == "state_dict" and loaded.config.num_classes == 10


def test_safetensors_round_trip_keeps_config_and_sampler_defaults(tmp_path):
    model = tiny_model("sit")
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path, sampler_defaults={"steps": 7})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.sampler_defaults == {"steps": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"ema": {"w": torch.zeros(1)}, "x": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # Same through torch.save's zip format.
    path2 = tmp_path / "evil2.pt"
    torch.save({"ema": {}, "x": _Payload(marker)}, path2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path2)
    assert not marker.exists()


def test_errors_name_missing_unexpected_and_misshaped_keys(tmp_path):
    model = small_sit()
    state = model.state_dict()
    state.pop("blocks.0.attn.qkv.bias")
    state["blocks.0.extra"] = torch.zeros(1)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "broken.pt"
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model_name="SiT-S/2", overrides={"num_heads": 6})
    msg = str(e.value)
    assert "blocks.0.attn.qkv.bias" in msg and "blocks.0.extra" in msg and "blocks.1.mlp.fc1.weight" in msg


def test_wrong_family_and_unknown_names_are_clear(tmp_path):
    ldit = tiny_model("lightningdit")
    path = tmp_path / "ldit.pt"
    torch.save(ldit.state_dict(), path)
    with pytest.raises(CheckpointError, match="LightningDiT"):
        load_checkpoint(path, model_name="SiT-B/2")
    with pytest.raises(CheckpointError, match="unknown model"):
        load_checkpoint(path, model_name="DiT-XL/2")
    no_ig = {k: v for k, v in small_sit().state_dict().items() if not k.startswith("final_layer_xr")}
    torch.save(no_ig, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="not an IG checkpoint"):
        load_checkpoint(tmp_path / "dit.pt", model_name="SiT-S/2")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def meta_state(name: str) -> dict:
    """The tensors of a full-size preset, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return dict(IGDiT(preset(name)).state_dict())


@pytest.mark.parametrize("given, checkpoint, expect", [
    ("SiT-S/2", "SiT-S/8", "`model` SiT-S/2 has patch size 2 but x.pt is a SiT-S/8"),
    ("LightningDiT-B/2", "SiT-B/2", "`model` LightningDiT-B/2 is a LightningDiT model but x.pt is a SiT-B/2"),
    ("LightningDiT-B/1", "SiT-XL/2", "none of LightningDiT's layers"),
    ("SiT-B/2", "SiT-XL/2", "`model` SiT-B/2 has hidden_size 768 and depth 12 but x.pt is a SiT-XL/2"),
    ("LightningDiT-XL/2", "LightningDiT-XL/1", "has patch size 2 but x.pt is a LightningDiT-XL/1"),
])
def test_a_model_name_that_contradicts_the_checkpoint_is_refused_naming_what_it_is(given, checkpoint, expect):
    from pathlib import Path

    from igengine.models.checkpoint import resolve_config

    with pytest.raises(CheckpointError) as e:
        resolve_config(meta_state(checkpoint), Path("x.pt"), {}, {}, model_name=given)
    assert expect in str(e.value)
    cfg, _ = resolve_config(meta_state(checkpoint), Path("x.pt"), {}, {}, model_name=checkpoint)
    assert cfg.name == checkpoint


def test_a_model_name_of_the_other_family_than_the_checkpoint_records_is_refused(tmp_path):
    """SiT's train.py records its args: --model LightningDiT-... on such a file names the recorded model."""
    from pathlib import Path

    from igengine.models.checkpoint import resolve_config

    record = {"source": "args", "model": "SiT-B/2"}
    with pytest.raises(CheckpointError, match="it records model SiT-B/2"):
        resolve_config(meta_state("SiT-B/2"), Path("x.pt"), record, {}, model_name="LightningDiT-B/2")
