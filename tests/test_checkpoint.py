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


# ----------------------------------------------------------------------------------------------
# The family: the tensors' layers first, then an explicit model, then what the checkpoint states
# ----------------------------------------------------------------------------------------------


def repa_style_checkpoint(path, net, **args):
    """A training checkpoint as SiT-style (REPA-style) trainers write it, an argparse Namespace under 'args',
    around whatever architecture ``net`` is. ``args`` overrides the Namespace; None drops a field."""
    fields = dict(model="SiT-B/2", encoder_depth=net.config.encoder_depth, num_classes=10, resolution=64,
                  enc_type="dinov2-vit-b", proj_coeff=0.5, qk_norm=False, fused_attn=True)
    fields.update(args)
    ns = argparse.Namespace(**{k: v for k, v in fields.items() if v is not None})
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": ns, "steps": 400000}, path)


def assert_same_network(loaded, model):
    cfg = model.config
    x, t, y = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.tensor([1, cfg.num_classes])
    for got, want in zip(loaded.model(x, t, y), model(x, t, y)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("recorded", ["SiT-B/2", "LightningDiT-B/1", None])
def test_lightningdit_tensors_in_an_args_namespace_load_with_a_lightningdit_model(tmp_path, recorded):
    """Issue 18: SwiGLU, RMSNorm and RoPE tensors cannot be SiT's, whatever container holds them; the
    Namespace's other facts (encoder_depth, num_classes) fit the tensors and are taken, and say so."""
    model = tiny_model("lightningdit")  # SwiGLU, RMSNorm, RoPE, qk-norm; IG head after block 2 of 3
    path = tmp_path / "repa-ldit.pt"
    repa_style_checkpoint(path, model, model=recorded)
    loaded = load_checkpoint(path, model_name="LightningDiT-B/1", overrides={"num_heads": 4})
    c = loaded.config
    assert c.family == Family.LIGHTNINGDIT and c.name == "LightningDiT-B/1"
    assert c.use_swiglu and c.use_rope and c.use_rmsnorm and c.qk_norm and not c.wo_shift
    assert (c.encoder_depth, c.encoder_depth_source) == (2, "checkpoint args")
    assert c.num_classes == 10 and (c.num_heads, c.num_heads_source) == (4, "--num-heads")
    assert_same_network(loaded, model)
    assert "checkpoint record says qk_norm=False but the tensors say True; using the tensors" in loaded.notes
    family_notes = [n for n in loaded.notes if n.startswith("family ")]
    if recorded == "LightningDiT-B/1":  # the record agrees with the tensors: nothing to say
        assert family_notes == []
    else:
        said = f"its 'args' records model {recorded}" if recorded else "an argparse Namespace under 'args'"
        assert len(family_notes) == 1 and "blocks.0.mlp.w12.weight is a SwiGLU MLP" in family_notes[0]
        assert said in family_notes[0] and "which does not decide it" in family_notes[0]
        taken = "num_classes 10, encoder_depth 2 from the checkpoint args, though "
        assert any(n.startswith(taken) for n in loaded.notes), loaded.notes


def test_lightningdit_tensors_decide_the_family_without_a_model_name():
    """No `model`: the tensors' layers give the family, their shape the preset; the args' SiT name is not used,
    its encoder_depth and num_classes are (they fit the tensors), and the notes say where each came from."""
    from pathlib import Path

    from igengine.models.checkpoint import resolve_config

    record = {"source": "args", "model": "SiT-B/2", "encoder_depth": 4, "num_classes": 1000}
    cfg, notes = resolve_config(meta_state("LightningDiT-B/1"), Path("x.pt"), record, {})
    assert cfg.family == Family.LIGHTNINGDIT and cfg.name == "LightningDiT-B/1" and cfg.num_heads == 12
    assert cfg.use_swiglu and cfg.use_rope and cfg.use_rmsnorm
    assert (cfg.encoder_depth, cfg.encoder_depth_source) == (4, "checkpoint args") and cfg.num_classes == 1000
    shape = "patch size 1, hidden_size 768, depth 12"
    assert f"model LightningDiT-B/1 from the tensors' shape ({shape}, LightningDiT layers)" in notes
    assert any(n.startswith("family LightningDiT from its tensors") and "its 'args' records model SiT-B/2" in n
               for n in notes)
    # That record's num_classes is taken only where it fits the label table (1001 rows here).
    cfg, notes = resolve_config(meta_state("LightningDiT-B/1"), Path("x.pt"), {**record, "num_classes": 10}, {})
    assert cfg.num_classes == 1000
    assert "num_classes 10 of the checkpoint args does not fit the label table (1001 rows): not used" in notes
    # A bare LightningDiT state dict: the same, with the official encoder_depth (and a note saying so).
    bare, notes = resolve_config(meta_state("LightningDiT-XL/1"), Path("x.pt"), {}, {})
    assert bare.name == "LightningDiT-XL/1" and bare.encoder_depth_source == "official default for LightningDiT-XL/1"
    # Without LightningDiT's layers the tensors cannot tell SiT from an options-off LightningDiT: a name is needed.
    with pytest.raises(CheckpointError, match="records no model name: pass `model`"):
        resolve_config(meta_state("SiT-XL/2"), Path("x.pt"), {}, {})
    # ... or at least a container: an argparse Namespace is what SiT-style trainers write.
    cfg, _ = resolve_config(meta_state("SiT-XL/2"), Path("x.pt"), {"source": "args", "encoder_depth": 8}, {})
    assert cfg.family == Family.SIT and cfg.name == "SiT-XL/2"


def one_line_refusal(path, model_name=None, overrides=None):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model_name=model_name, overrides=overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_true_family_contradiction_is_refused_in_one_line_naming_the_tensor_and_the_flag(tmp_path):
    model = tiny_model("lightningdit")
    path = tmp_path / "repa-ldit.pt"
    repa_style_checkpoint(path, model)
    msg = one_line_refusal(path, "SiT-B/2")
    assert msg.startswith(f"`model` SiT-B/2 is a SiT model but {path} is a LightningDiT model with patch size 1, "
                          "hidden_size 64, depth 3: its tensors have LightningDiT's layers, which SiT has not "
                          "(blocks.0.mlp.w12.weight is a SwiGLU MLP, blocks.0.norm1.weight is an RMSNorm weight, "
                          "feat_rope.freqs_cos is a RoPE table)"), msg
    assert "its 'args' records model SiT-B/2, but the tensors decide; pass a LightningDiT `model`" in msg
    # No `model`: the family is clear but this custom shape is no preset, so num_heads is unknown.
    msg = one_line_refusal(path)
    assert "is a LightningDiT model (blocks.0.mlp.w12.weight is a SwiGLU MLP" in msg
    assert ("of a shape no preset has (patch size 1, hidden_size 64, depth 3), "
            "and its 'args' records model SiT-B/2") in msg
    assert msg.endswith("pass a LightningDiT `model`, with `num_heads` for a model of a custom size")


def test_tensors_that_contradict_each_other_are_refused_in_one_line(tmp_path):
    state = dict(tiny_model("lightningdit").state_dict())
    w12, w3 = state.pop("blocks.2.mlp.w12.weight"), state.pop("blocks.2.mlp.w3.weight")
    state.pop("blocks.2.mlp.w12.bias"), state.pop("blocks.2.mlp.w3.bias")
    state["blocks.2.mlp.fc1.weight"], state["blocks.2.mlp.fc2.weight"] = w12, w3  # a GELU MLP in the last block
    path = tmp_path / "mixed.pt"
    torch.save({"ema": state, "args": argparse.Namespace(model="LightningDiT-B/1")}, path)
    msg = one_line_refusal(path, "LightningDiT-B/1", {"num_heads": 4})
    assert msg == (f"{path}: its tensors contradict each other: blocks.0.mlp.w12.weight is a SwiGLU MLP (LightningDiT) "
                   "but blocks.2.mlp.fc1.weight is a GELU MLP (SiT); every block of a model has the same layers")


def lightningdit_config(model_type, **model):
    """LightningDiT's train.py record: its yaml dict under 'config'."""
    return {"model": {"model_type": model_type, "use_qknorm": False, **model}, "data": {"num_classes": 10}}


@pytest.mark.parametrize("model_type", ["LightningDiT-B/1", "SiT-S/2"])
def test_sit_tensors_in_a_lightningdit_config_load_with_a_sit_model(tmp_path, model_type):
    """The symmetric case: SiT's tensors under a LightningDiT-style 'config'; `model` SiT-... agrees with them."""
    model = small_sit()
    path = tmp_path / "sit-in-config.pt"
    config = lightningdit_config(model_type, use_swiglu=True, use_rope=True, use_rmsnorm=True, in_chans=4)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "config": config}, path)
    loaded = load_checkpoint(path, model_name="SiT-S/2", overrides={"num_heads": 6})
    c = loaded.config
    assert c.family == Family.SIT and c.name == "SiT-S/2" and c.num_classes == 10
    assert not (c.use_swiglu or c.use_rope or c.use_rmsnorm or c.wo_shift)
    assert_same_network(loaded, model)
    if model_type.startswith("LightningDiT"):
        assert any(n.startswith("family SiT from `model` SiT-S/2, which its tensors fit") and
                   "its 'config' records model LightningDiT-B/1, which does not decide it" in n for n in loaded.notes)
        # Alone, a record that states LightningDiT's layers the tensors lack decides nothing.
        msg = one_line_refusal(path)
        assert msg.startswith(f"{path}: its 'config' records model LightningDiT-B/1 and states use_swiglu=True, "
                              "use_rope=True, use_rmsnorm=True, but its tensors have none of LightningDiT's layers "
                              "(SwiGLU, RoPE, RMSNorm, no-shift adaLN): blocks.0.mlp.fc1.weight is a GELU MLP"), msg
        assert msg.endswith("pass a SiT `model` if the weights are SiT's, or a LightningDiT `model` to build it with "
                            "those options off")
    else:  # the recorded name is SiT's: it decides, the container does not
        alone = load_checkpoint(path, overrides={"num_heads": 6})
        assert alone.config == c


def test_an_options_off_lightningdit_needs_the_checkpoint_to_say_lightningdit(tmp_path):
    """Tensors without LightningDiT's layers fit a LightningDiT built with its options off: a LightningDiT
    `model` is accepted where the checkpoint states LightningDiT too (and the note says the options are off)."""
    model = tiny_model("lightningdit", use_swiglu=False, use_rope=False, use_rmsnorm=False, qk_norm=False)
    path = tmp_path / "plain.pt"
    config = lightningdit_config("LightningDiT-B/1", use_swiglu=False, encoder_depth=2, in_chans=8)
    torch.save({"ema": model.state_dict(), "config": config}, path)
    for name in ("LightningDiT-B/1", None):
        loaded = load_checkpoint(path, model_name=name, overrides={"num_heads": 4})
        assert loaded.config.family == Family.LIGHTNINGDIT and not loaded.config.use_swiglu
        assert any("so the model is built with those options off" in n for n in loaded.notes)
        assert_same_network(loaded, model)
    repa_style_checkpoint(path, model, model=None)  # the same tensors under a SiT-style 'args'
    msg = one_line_refusal(path, "LightningDiT-B/1", {"num_heads": 4})
    assert "`model` LightningDiT-B/1 is a LightningDiT model but" in msg
    assert "blocks.0.mlp.fc1.weight is a GELU MLP" in msg
    assert msg.endswith("its training record is an argparse Namespace under 'args', as SiT-style trainers write; "
                        "pass a SiT `model`")
