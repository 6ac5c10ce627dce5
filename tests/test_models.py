"""Models: the official state-dict layout, one forward with two outputs, the IG head's depth, precision."""

import json
import re
from pathlib import Path

import pytest
import torch

from igengine.config import Family, Precision
from igengine.models import IGDiT, MODEL_NAMES, RAEv2DiT, apply_precision, build_model, preset
from tests.conftest import assert_low_precision_rule, tiny_model

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_state_dict_layout.json").read_text())["models"]


def _layout(cfg):
    with torch.device("meta"):
        model = IGDiT(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "key,cfg",
    [
        ("SiT-B/2 qk_norm", preset("SiT-B/2", qk_norm=True)),
        ("SiT-XL/2", preset("SiT-XL/2")),
        ("LightningDiT-XL/1", preset("LightningDiT-XL/1")),
        ("LightningDiT-B/1 qknorm wo_shift plain",
         preset("LightningDiT-B/1", qk_norm=True, wo_shift=True, use_swiglu=False, use_rope=False, use_rmsnorm=False)),
    ],
)
def test_state_dict_layout_equals_the_official_one(key, cfg):
    """Key names and shapes recorded from the official constructors (tests/data): strict loading works."""
    assert _layout(cfg) == LAYOUT[key]


def test_every_named_model_builds():
    for name in MODEL_NAMES:
        cfg = preset(name)
        if cfg.family == Family.RAEV2:  # the official base_model_depth of each RAEv2 preset
            assert (cfg.encoder_depth, cfg.encoder_depth_source) == (
                {"RAEv2-XL": 8, "RAEv2-B": 4}[name], f"preset {name} (official base_model_depth {cfg.encoder_depth})")
        else:
            assert cfg.encoder_depth == 8 and "official default" in cfg.encoder_depth_source
        with torch.device("meta"):
            model = build_model(cfg)
        assert type(model) is (RAEv2DiT if cfg.family == Family.RAEV2 else IGDiT)
    with pytest.raises(KeyError, match="unknown model"):
        preset("SiT-XXL/2")


def test_forward_returns_final_and_intermediate(family_name):
    model = tiny_model(family_name)
    c = model.config
    x = torch.randn(5, *c.latent_shape)
    v_final, v_inter = model(x, torch.rand(5), torch.randint(0, c.num_classes + 1, (5,)))
    assert v_final.shape == v_inter.shape == x.shape
    assert not torch.allclose(v_final, v_inter)


def test_intermediate_output_reads_block_encoder_depth(family_name):
    """v_inter depends on blocks 1..encoder_depth only; later blocks change v_final alone."""
    model = tiny_model(family_name)
    c = model.config
    x, t, y = torch.randn(2, *c.latent_shape), torch.rand(2), torch.tensor([1, 2])
    f0, i0 = model(x, t, y)
    with torch.no_grad():
        model.blocks[c.encoder_depth].mlp.requires_grad_(False)
        for p in model.blocks[c.encoder_depth].parameters():
            p.add_(0.1)
    f1, i1 = model(x, t, y)
    assert torch.equal(i0, i1)
    assert not torch.allclose(f0, f1)
    shifted = IGDiT(c.replace(encoder_depth=c.encoder_depth + 1))
    shifted.load_state_dict(model.state_dict())
    assert not torch.allclose(shifted.eval()(x, t, y)[1], i1)


def test_batch_rows_are_independent(family_name):
    model = tiny_model(family_name)
    c = model.config
    x, t, y = torch.randn(4, *c.latent_shape), torch.rand(4), torch.tensor([0, 1, 2, 3])
    f_all, i_all = model(x, t, y)
    f_one, i_one = model(x[2:3], t[2:3], y[2:3])
    assert torch.allclose(f_all[2:3], f_one, atol=1e-6) and torch.allclose(i_all[2:3], i_one, atol=1e-6)


@pytest.mark.parametrize("precision,dtype", [(Precision.BF16, torch.bfloat16), (Precision.FP16, torch.float16)])
def test_low_precision_keeps_norms_and_modulation_fp32(family_name, precision, dtype):
    """Which parameters are cast, and the accuracy rule of docs/CONTRACTS.md ("Tolerances"): against the
    fp32 network, the mixed-precision network's error is at most twice the error of the naive
    low-precision run (torch.autocast: every matmul in the low dtype), on the mean and the max."""
    ref = tiny_model(family_name)
    low = apply_precision(tiny_model(family_name), precision)
    for name, p in low.named_parameters():
        in_matmul = re.match(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp)\.", name) is not None
        assert p.dtype == (dtype if in_matmul else torch.float32), name
    c = ref.config
    x, t, y = torch.randn(3, *c.latent_shape), torch.rand(3), torch.tensor([0, 4, 9])
    with torch.inference_mode():
        want = ref(x, t, y)
        got = low(x, t, y)
        with torch.autocast("cpu", dtype=dtype):
            base = ref(x, t, y)
    assert_low_precision_rule(want, got, base)


def test_token_layout_is_the_official_one_for_reference_and_contiguous_otherwise(family_name):
    """``reference`` keeps the official code's token layout (its reductions then sum in the official
    order); every other precision runs contiguous tokens: the same maths, equal up to the summation
    order of the normalisations (LightningDiT's RMSNorm sums the strided rows in another order, which
    is why ``reference`` keeps the official layout)."""
    seen = []
    model = tiny_model(family_name)
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()) or None)
    c = model.config
    x, t, y = torch.randn(2, *c.latent_shape), torch.rand(2), torch.tensor([0, 4])
    with torch.inference_mode():
        apply_precision(model, Precision.REFERENCE)
        want = model(x, t, y)
        official_layout = seen.pop()
        apply_precision(model, Precision.FP32)
        got = model(x, t, y)
    assert seen.pop() is True and model.contiguous_tokens
    assert apply_precision(model, Precision.REFERENCE).contiguous_tokens is False
    # The patch-1 LightningDiT's tokens come out of the embedding as a transposed view; the test means
    # something only where the official layout is not already contiguous.
    if family_name == "lightningdit" and c.patch_size == 1:
        assert official_layout is False
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
