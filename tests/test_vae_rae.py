"""RAEv2's ViT decoder: strict loading of decoder.pt and stats.pt, the architecture against a reference
written from plain tensor operations, the de-normalisation, the pixel rule, and every bad input.

Tiny decoders (8 latent channels on a 4x4 grid, width 48, patch 4): a width outside the official
table, added to it for the test (``HEADS_BY_WIDTH``), as the loader takes heads from that table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from igengine.config import Family
from igengine.errors import VAEError
from igengine.vae import VAEKind, ViTMAEDecoder, ViTMAEDecoderConfig, load_vae
from igengine.vae import rae
from igengine.vae.pixels import PIXEL_CONVERSION, to_uint8

TINY = ViTMAEDecoderConfig(latent_channels=8, width=48, depth=2, num_heads=4, mlp_width=96, grid=4, patch_size=4)


@pytest.fixture(autouse=True)
def tiny_width(monkeypatch):
    monkeypatch.setitem(rae.HEADS_BY_WIDTH, TINY.width, TINY.num_heads)


def random_decoder(cfg: ViTMAEDecoderConfig = TINY, seed: int = 0) -> ViTMAEDecoder:
    """Every parameter drawn at random (the CLS token too; the position table stays the sin-cos one)."""
    net = ViTMAEDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "decoder_pos_embed":
                continue
            scale = 0.2 if p.ndim > 1 else 0.1
            one = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * scale + one)
    return net.eval()


def save_decoder(path, net: ViTMAEDecoder | None = None, edit=None, dtype=None):
    state = {k: v.clone() for k, v in (net or random_decoder()).state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return path


def save_stats(path, shape=(8, 4, 4), seed: int = 1, drop=None):
    g = torch.Generator().manual_seed(seed)
    stats = {"mean": 0.3 * torch.randn(shape, generator=g), "var": 0.2 + torch.rand(shape, generator=g)}
    if drop:
        stats.pop(drop)
    torch.save(stats, path)
    return path


def latents(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, TINY.latent_channels, TINY.grid, TINY.grid, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# A reference decode from plain operations (softmax attention written out, unpatchify by index)
# ----------------------------------------------------------------------------------------------


def reference_decode(state: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, 3, g * p, g * p) in float64, following GeneralDecoder.forward + unpatchify."""
    s = {k: v.double() for k, v in state.items()}

    def linear(x, name):
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-12) * s[f"{name}.weight"] + s[f"{name}.bias"]

    x = linear(tokens.double(), "decoder_embed")
    b, n, d = x.shape
    x = torch.cat([s["trainable_cls_token"].expand(b, 1, d), x], 1) + s["decoder_pos_embed"]
    hd = d // heads
    layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("decoder_layers."))
    for i in range(layers):
        pre = f"decoder_layers.{i}"
        h = norm(x, f"{pre}.layernorm_before")
        q, k, v = (linear(h, f"{pre}.attention.attention.{m}").view(b, n + 1, heads, hd).permute(0, 2, 1, 3)
                   for m in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x = x + linear(a.permute(0, 2, 1, 3).reshape(b, n + 1, d), f"{pre}.attention.output.dense")
        h = linear(norm(x, f"{pre}.layernorm_after"), f"{pre}.intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + linear(h, f"{pre}.output.dense")
    logits = linear(norm(x, "decoder_norm"), "decoder_pred")[:, 1:]
    g = math.isqrt(n)
    out = torch.empty(b, 3, g * patch, g * patch, dtype=torch.float64)
    for t in range(n):  # patch t = (row i, column j); its values run over (y, x, channel)
        i, j = divmod(t, g)
        out[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = \
            logits[:, t].view(b, patch, patch, 3).permute(0, 3, 1, 2)
    return out


def test_architecture_matches_a_reference_from_plain_operations():
    net = random_decoder()
    z = latents(2)
    tokens = z.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), as RAE.decode
    ref = reference_decode(net.state_dict(), tokens, TINY.num_heads, TINY.patch_size)
    with torch.no_grad():
        got = net(z)
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float32
    assert float((got.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_sincos_table_is_mae_2d_layout():
    width, grid = 8, 3
    got = rae.sincos_pos_embed(width, grid)
    assert got.shape == (1 + grid * grid, width) and not got[0].any()  # the CLS row is zero
    for k in range(grid * grid):
        i, j = divmod(k, grid)
        for half, pos in ((0, j), (1, i)):  # first half: column, second half: row
            for f in range(width // 4):
                angle = pos / 10000 ** (f / (width // 4))
                assert abs(float(got[1 + k, half * width // 2 + f]) - math.sin(angle)) < 1e-6
                assert abs(float(got[1 + k, half * width // 2 + width // 4 + f]) - math.cos(angle)) < 1e-6


def test_parameter_and_flop_counts_match_the_module():
    net = random_decoder()
    assert TINY.parameter_count() == sum(p.numel() for p in net.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        net(latents(3))
    assert counter.get_total_flops() == 3 * TINY.flops_per_image()


# ----------------------------------------------------------------------------------------------
# Loading and decoding through load_vae
# ----------------------------------------------------------------------------------------------


def test_strict_round_trip_and_denormalisation(tmp_path):
    net = random_decoder()
    with torch.no_grad():
        net.decoder_pos_embed.add_(0.01)  # a file's table is used as it is, and its deviation reported
    path = save_decoder(tmp_path / "decoder.pt", net)
    stats = save_stats(tmp_path / "stats.pt")
    dec = load_vae(path, VAEKind.RAE, 8, stats, latent_size=4)
    assert dec.upsample_factor == 4 and dec.image_range == (0.0, 1.0)
    for k, v in net.state_dict().items():
        assert torch.equal(dec.net.state_dict()[k], v), k

    z = latents(3)
    s = torch.load(stats)
    denorm = z.double().numpy() * np.sqrt(s["var"].double().numpy() + 1e-5) + s["mean"].double().numpy()
    assert np.abs(dec.prepare(z).double().numpy() - denorm).max() < 1e-6
    ref = reference_decode(net.state_dict(), torch.from_numpy(denorm).flatten(2).transpose(1, 2), 4, 4)
    got = dec.decode(z)
    assert got.shape == (3, 3, 16, 16) and got.dtype == torch.float32
    assert float((got.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))

    facts = dec.describe()
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert dec.identity == {"kind": "rae", "sha256": sha(path), "latent_stats_sha256": sha(stats),
                            "normalisation": "z * sqrt(var + 1e-05) + mean"}
    assert facts["architecture"] == TINY.to_dict() and facts["official_configs"] == []
    assert facts["weights_dtype"] == ["float32"] and facts["parameters"] == TINY.parameter_count()
    assert abs(facts["pos_embed_max_abs_from_sincos"] - 0.01) < 1e-6
    other = load_vae(path, VAEKind.RAE, 8, save_stats(tmp_path / "stats2.pt", seed=2))
    assert other.identity["latent_stats_sha256"] != dec.identity["latent_stats_sha256"]


def test_half_precision_file_loads_as_float32(tmp_path):
    net = random_decoder()
    path = save_decoder(tmp_path / "decoder_bf16.pt", net, dtype=torch.bfloat16)
    dec = load_vae(path, VAEKind.RAE, 8, save_stats(tmp_path / "stats.pt"))
    assert dec.describe()["weights_dtype"] == ["bfloat16"]
    w = dec.net.decoder_embed.weight
    assert w.dtype == torch.float32 and torch.equal(w, net.decoder_embed.weight.bfloat16().float())


def test_batch_independence(tmp_path):
    dec = load_vae(save_decoder(tmp_path / "decoder.pt"), VAEKind.RAE, 8, save_stats(tmp_path / "stats.pt"))
    z = latents(4)
    together = dec.decode(z)
    alone = torch.cat([dec.decode(z[i:i + 1]) for i in range(4)])
    assert (together - alone).abs().max() <= 1e-5
    assert (together[0] - together[1]).abs().max() > 1e-2  # the rows do differ


def test_official_widths_take_heads_from_the_table():
    for name, (width, depth, heads, mlp) in rae.OFFICIAL_DECODERS.items():
        cfg = ViTMAEDecoderConfig(1024, width, depth, heads, mlp, 16, 16)
        with torch.device("meta"):
            state = ViTMAEDecoder(cfg).state_dict()
        assert rae.infer_config(state) == cfg and name in rae.official_names(cfg)
    xl = ViTMAEDecoderConfig(1024, 1152, 28, 16, 4096, 16, 16)
    assert rae.official_names(xl) == ["ViTSO", "ViTXL"] and xl.image_size == 256


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def test_pixel_rule_clamps_then_truncates():
    values = np.array([-0.7, -1e-6, 0.0, 0.5 / 255, 1 / 255, 0.4999, 0.5, 100.9 / 255, 0.99999, 1.0, 1.0001, 3.0],
                      dtype=np.float32)
    images = torch.from_numpy(np.tile(values[None, None, None, :], (1, 3, 2, 1)))  # (1, 3, 2, 12)
    got = to_uint8(images, Family.RAEV2)
    expect = np.floor(np.clip(values.astype(np.float64), 0, 1) * np.float32(255)).astype(np.uint8)  # truncation
    assert got.shape == (1, 2, 12, 3) and got.dtype == np.uint8
    assert np.array_equal(got[0, 0, :, 0], expect) and np.array_equal(got[0, 1, :, 2], expect)
    assert list(expect[[0, 2, 4, 6, 9, 11]]) == [0, 0, 1, 127, 255, 255]
    assert not np.array_equal(got, to_uint8(images, Family.SIT))  # another family's rule: [-1, 1]
    assert PIXEL_CONVERSION[Family.RAEV2].startswith("uint8(255 * clamp(x, 0, 1))")


# ----------------------------------------------------------------------------------------------
# Bad input: one line, naming the file and the fix
# ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def refused(path, stats, expect: str, names=None, **kw):
    with pytest.raises(VAEError) as e:
        load_vae(path, VAEKind.RAE, kw.pop("channels", 8), stats, **kw)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg
    assert str(names) in msg, msg
    assert e.value.exit_code == 2


def test_bad_decoder_files(tmp_path):
    stats = save_stats(tmp_path / "stats.pt")

    def variant(name, edit):
        return save_decoder(tmp_path / name, edit=edit)

    for key in ("trainable_cls_token", "decoder_layers.1.attention.output.dense.bias", "decoder_norm.weight"):
        p = variant(f"no_{key}.pt", lambda s, k=key: s.pop(k))
        refused(p, stats, f"1 missing keys: {key}", p)
    p = variant("no_pos.pt", lambda s: s.pop("decoder_pos_embed"))
    refused(p, stats, "not a RAE decoder state dict (missing decoder_pos_embed)", p)
    extra_key = "decoder_layers.0.attention.attention.qk_norm.weight"
    p = variant("extra.pt", lambda s: s.__setitem__(extra_key, torch.ones(48)))
    refused(p, stats, "1 unexpected keys: decoder_layers.0.attention.attention.qk_norm.weight", p)
    p = variant("misshaped.pt", lambda s: s.__setitem__("decoder_layers.1.output.dense.weight", torch.zeros(48, 64)))
    refused(p, stats, "mis-shaped keys: decoder_layers.1.output.dense.weight (48, 64) != (48, 96)", p)
    p = variant("ints.pt", lambda s: s.__setitem__("trainable_cls_token", torch.zeros(1, 1, 48, dtype=torch.long)))
    refused(p, stats, "not floating point (trainable_cls_token)", p)

    wider = save_decoder(tmp_path / "c16.pt", random_decoder(dataclasses.replace(TINY, latent_channels=16)))
    refused(wider, stats, "is a decoder of another width: it decodes 16-channel latents", wider)
    unknown = save_decoder(tmp_path / "w40.pt", random_decoder(dataclasses.replace(TINY, width=40)))
    refused(unknown, stats, "decoder width 40 is not that of an official RAEv2 decoder (768 ViTB, 1024 ViTL, "
            "1152 ViTSO/ViTXL)", unknown)
    training = tmp_path / "stage1.pt"
    torch.save({"ema": {f"decoder.{k}": v for k, v in random_decoder().state_dict().items()}}, training)
    refused(training, stats, "extract_decoder.py", training)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"decoder_embed.weight": torch.zeros(48, 8), "x": _Payload(marker)}, evil)
    refused(evil, stats, "refusing to load", evil)
    assert not marker.exists()

    good = save_decoder(tmp_path / "decoder.pt")
    refused(good, stats, "decodes a 4x4 latent grid but the model samples 16x16", good, latent_size=16)
    refused(tmp_path / "nope.pt", stats, "not found", tmp_path / "nope.pt")
    refused(tmp_path, stats, "is a folder", tmp_path)


def test_bad_statistics_files(tmp_path):
    good = save_decoder(tmp_path / "decoder.pt")
    refused(good, None, "needs the latent statistics", "`latent_stats` PATH/stats.pt")
    refused(good, tmp_path / "nope.pt", "not found", tmp_path / "nope.pt")
    for drop in ("mean", "var"):
        p = save_stats(tmp_path / f"no_{drop}.pt", drop=drop)
        refused(good, p, f"must hold {{'mean', 'var'}} (RAEv2's stats.pt) but has no '{drop}'", p)
    for shape in ((1, 8, 1, 1), (8, 1, 1), (8, 2, 2), (16, 4, 4), (1, 8, 4, 4)):
        p = save_stats(tmp_path / f"s{'x'.join(map(str, shape))}.pt", shape=shape)
        refused(good, p, f"'mean' is float32 {list(shape)}, expected float [8, 4, 4]", p)
    negative = tmp_path / "negative.pt"
    torch.save({"mean": torch.zeros(8, 4, 4), "var": -torch.ones(8, 4, 4)}, negative)
    refused(good, negative, "'var' finite and >= 0", negative)
    vavae_style = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.zeros(1, 8, 1, 1), "std": torch.ones(1, 8, 1, 1)}, vavae_style)
    refused(good, vavae_style, "but has no 'var'", vavae_style)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_stats.pt"
    torch.save({"mean": torch.zeros(8, 4, 4), "var": _Payload(marker)}, evil)
    refused(good, evil, "refusing to load", evil)
    assert not marker.exists()
    refused(good, save_stats(tmp_path / "stats.pt"), "`latent_multiplier` applies to VA-VAE only", "drop it",
            latent_multiplier=0.5)
