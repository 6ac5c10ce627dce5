"""VAE decoding: the LDM decoder against diffusers' independent implementation, both checkpoint
formats, the de-normalisations of both families, and every bad VAE / statistics input."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from igengine.cli import main
from igengine.config import Family
from igengine.vae.pixels import to_uint8
from igengine.vae import LDMDecoder, VAEKind, load_vae
from igengine.vae.ldm import infer_config
from tests.bulk_fixtures import TINY_VAVAE, save_ldit, save_sit, save_stats, save_vavae, tiny_diffusers_vae, tiny_vavae_state



@pytest.fixture(scope="module")
def diffusers():
    """Only the SD-VAE tests need diffusers (the optional 'vae' extra); the VA-VAE tests run without it."""
    return pytest.importorskip("diffusers", reason="diffusers is the optional 'vae' extra (SD-VAE folders)")


def diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM names (written from both codebases' layouts)."""
    out = {}
    for k, v in state.items():
        k2 = k.replace("decoder.conv_norm_out", "decoder.norm_out").replace("conv_shortcut", "nin_shortcut")
        k2 = k2.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k2 = k2.replace("mid_block.attentions.0", "mid.attn_1")
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}", k2)
        k2 = k2.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k2 = k2.replace(f"attn_1.{a}.", f"attn_1.{b}.")
        if "attn_1" in k2 and k2.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # diffusers' Linear projections are LDM's 1x1 convolutions
        out[k2] = v.clone()
    return out


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory, diffusers):
    d = tmp_path_factory.mktemp("sdvae")
    vae = tiny_diffusers_vae()
    vae.save_pretrained(d / "folder")
    from safetensors.torch import save_file

    save_file(diffusers_to_ldm(vae.state_dict(), levels=2), str(d / "ldm.safetensors"))
    return vae, d / "folder", d / "ldm.safetensors"


def test_ldm_decoder_matches_diffusers_on_the_same_weights(sd_vae):
    vae, folder, single = sd_vae
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z / 0.18215).sample  # SiT/generate.py
    for path in (single, folder):
        dec = load_vae(path, VAEKind.SD, latent_channels=4)
        got = dec.decode(z)
        assert got.shape == (3, 3, 16, 16)
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert load_vae(single, VAEKind.SD, 4).describe()["loader"] == "igengine.vae.ldm"
    assert load_vae(folder, VAEKind.SD, 4).describe()["loader"] == "diffusers.AutoencoderKL.from_pretrained"


def test_vavae_plain_and_lightning_checkpoints_decode_with_the_official_normalisation(tmp_path):
    state = tiny_vavae_state()
    stats = save_stats(tmp_path / "latents_stats.pt")
    plain = save_vavae(tmp_path / "plain.pt", lightning=False, state=state)
    lightning = save_vavae(tmp_path / "lightning.pt", lightning=True, state=state)
    net = LDMDecoder(TINY_VAVAE)
    net.load_state_dict({k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))})
    s = torch.load(stats)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    for multiplier in (1.0, 0.5):
        with torch.no_grad():
            ref = net(z * s["std"] / multiplier + s["mean"])  # LightningDiT/inference.py
        for path in (plain, lightning):
            dec = load_vae(path, VAEKind.VAVAE, 8, stats, multiplier)
            assert torch.equal(dec.decode(z), ref)
    facts = load_vae(lightning, VAEKind.VAVAE, 8, stats).describe()
    assert facts["weights_entry"] == "state_dict" and facts["architecture"]["channels"] == [32, 64]
    assert set(facts["dropped_keys"]) == {"encoder.*", "quant_conv.*", "loss.*", "foundation_model.*"}
    assert facts["dropped_keys"]["loss.*"]["tensors"] == 2 and facts["matches_official_architecture"] is False
    assert facts["latent_stats_sha256"] and facts["latent_multiplier"] == 1.0


def test_official_f16d32_layout_is_recognised():
    from igengine.vae import VAVAE_F16D32

    state = LDMDecoder(VAVAE_F16D32).state_dict()
    assert infer_config(state) == VAVAE_F16D32 and VAVAE_F16D32.upsample_factor == 16
    assert "decoder.up.4.attn.2.proj_out.weight" in state and "decoder.up.3.attn.0.q.weight" not in state


def one_error_line(capsys, args, expect, out):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("igengine: error:") and expect in lines[0], lines[0]
    assert not out.exists()  # nothing written: the VAE is checked before the output folder is touched


def test_bad_vae_and_statistics_inputs(tmp_path, capsys, monkeypatch):
    ckpt = save_ldit(tmp_path / "ldit.safetensors")
    stats = save_stats(tmp_path / "stats.pt")
    good = tiny_vavae_state()

    def variant(name, edit):
        s = {k: v.clone() for k, v in good.items()}
        edit(s)
        return save_vavae(tmp_path / name, state=s)

    missing = variant("missing.pt", lambda s: s.pop("decoder.up.1.block.0.conv2.weight"))
    misshaped = variant("misshaped.pt", lambda s: s.__setitem__("decoder.mid.attn_1.q.weight", torch.zeros(64, 64, 3, 3)))
    extra = variant("extra.pt", lambda s: s.__setitem__("decoder.up.0.block.0.temb_proj.weight", torch.zeros(32, 512)))
    narrow = tmp_path / "c4.pt"
    torch.save({"state_dict": LDMDecoder(TINY_VAVAE.__class__(**{**TINY_VAVAE.__dict__, "embed_dim": 4})).state_dict()},
               narrow)
    bad_stats = tmp_path / "bad_stats.pt"
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, bad_stats)
    no_std = tmp_path / "no_std.pt"
    torch.save({"mean": torch.zeros(1, 8, 1, 1)}, no_std)
    vae_ok = save_vavae(tmp_path / "ok.pt")
    out = tmp_path / "o"
    base = ["sample", "--ckpt", ckpt, "--num-samples", 2, "--steps", 2, "--out", out]
    cases = [
        (["--vae", missing, "--latent-stats", stats], "1 missing keys: decoder.up.1.block.0.conv2.weight"),
        (["--vae", misshaped, "--latent-stats", stats], "mis-shaped keys: decoder.mid.attn_1.q.weight (64, 64, 3, 3) != (64, 64, 1, 1)"),
        (["--vae", extra, "--latent-stats", stats], "1 unexpected keys: decoder.up.0.block.0.temb_proj.weight"),
        (["--vae", ckpt, "--latent-stats", stats], "is not an LDM AutoencoderKL checkpoint (missing post_quant_conv.weight"),
        (["--vae", narrow, "--latent-stats", stats], "decodes 4-channel latents but the model samples 8 channels"),
        (["--vae", vae_ok, "--latent-stats", bad_stats], "'mean' has shape (1, 4, 1, 1), expected (1, 8, 1, 1)"),
        (["--vae", vae_ok, "--latent-stats", no_std], "must hold {'mean', 'std'}"),
        (["--vae", vae_ok], "VA-VAE decoding needs the latent statistics"),
        (["--vae", vae_ok, "--latent-stats", tmp_path / "nope.pt"], "not found"),
        (["--vae", tmp_path / "nope.pt", "--latent-stats", stats], "--vae"),
        (["--vae", vae_ok, "--latent-stats", stats, "--vae-kind", "vqgan"], "'vqgan' is not one of"),
        (["--vae", vae_ok, "--latent-stats", stats, "--vae-kind", "sd"], "--latent-stats applies to VA-VAE"),
        (["--vae", vae_ok, "--latent-stats", stats, "--no-decode"], "drop them"),
        ([], "pass --vae PATH"),
    ]
    for extra_args, expect in cases:
        one_error_line(capsys, base + extra_args, expect, out)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the optional dependency were absent
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    sit = save_sit(tmp_path / "sit.safetensors")
    one_error_line(capsys, ["sample", "--ckpt", sit, "--vae", folder, "--out", out], "pip install diffusers", out)


def test_sit_with_sd_vae_folder_end_to_end(tmp_path, capsys, sd_vae):
    vae, folder, _ = sd_vae
    ckpt = save_sit(tmp_path / "sit.safetensors")
    out = tmp_path / "run"
    code = main(["sample", "--ckpt", str(ckpt), "--vae", str(folder), "--num-samples", "5", "--steps", "3",
                 "--save-latents", str(tmp_path / "lat.npy"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = np.load(out / "samples.npz")
    latents = torch.from_numpy(np.load(tmp_path / "lat.npy"))
    with torch.no_grad():
        expect = to_uint8(vae.decode(latents / 0.18215).sample, Family.SIT)  # SiT/generate.py, end to end
    assert data["arr_0"].shape == (5, 16, 16, 3) and np.array_equal(data["arr_0"], expect)
    m = json.loads((out / "manifest.json").read_text())
    assert m["vae"]["kind"] == "sd" and m["vae"]["latent_scale"] == 0.18215
    assert m["run_key"]["vae"]["sha256"] and m["outputs"]["pixel_conversion"].startswith("uint8(clamp(255 * (x + 1) / 2")
