"""The RAEv2 model: the official state-dict layout, which parts feed which output, batch independence,
low precision, state-dict round trips, refusals.

Forward parity with the official module itself needs the official code and runs outside the tests:
benchmarks/official_raev2.py.
"""

import io
import re

import pytest
import torch

from igengine.config import Precision
from igengine.errors import ConfigError
from igengine.models import IGDiT, RAEv2DiT, apply_precision, build_model, preset
from igengine.models.layers import RotaryEmbedding2D
from tests.conftest import TINY, assert_low_precision_rule, randomize_

TINY_RAEV2 = preset("RAEv2-B").replace(name="RAEv2-tiny", input_size=4, in_channels=8, hidden_size=32, depth=3,
                                       num_heads=2, decoder_hidden_size=64, head_depth=2, head_num_heads=4,
                                       encoder_depth=2, num_classes=10)


def tiny(seed: int = 0, **overrides) -> RAEv2DiT:
    """A tiny RAEv2 with every parameter random (W from its own law N(0, 1))."""
    model = randomize_(RAEv2DiT(TINY_RAEV2.replace(**overrides)), seed)
    with torch.no_grad():
        model.t_embedder.W.copy_(torch.randn(model.t_embedder.W.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def inputs(n: int, seed: int = 1, cfg=TINY_RAEV2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *cfg.latent_shape, generator=g), torch.rand(n, generator=g),
            torch.randint(0, cfg.num_classes + 1, (n,), generator=g))  # the null class too


# Names and shapes read from the official code (src/stage2/models/DDT.py, model_utils.py) for the released
# RAEv2-XL: trunk 1440 wide, 20 heads of 72, SwiGLU int(2/3 * 1440 * 4) = 3840; head 2048 wide, 16 heads of
# 128, SwiGLU int(2/3 * 2048 * 4) = 5461; 256 image + 4 time + 8 class tokens.
OFFICIAL_XL = {
    "s_embedder.proj.weight": (1440, 1024, 1, 1),
    "x_embedder.proj.weight": (2048, 1024, 1, 1),
    "x_embedder.proj.bias": (2048,),
    "s_projector.weight": (2048, 1440),
    "t_embedder.W": (256,),
    "t_embedder.learnable_tokens": (4, 1440),
    "t_embedder.mlp.0.weight": (1440, 512),
    "t_embedder.mlp.2.weight": (1440, 1440),
    "ctx_embedder.embedding_table.weight": (1001, 1440),
    "ctx_embedder.learnable_tokens": (8, 1440),
    "blocks.0.norm1.weight": (1440,),
    "blocks.0.attn.q.weight": (1440, 1440),
    "blocks.0.attn.v.bias": (1440,),
    "blocks.27.attn.q_norm.weight": (72,),
    "blocks.0.mlp.w1.weight": (3840, 1440),
    "blocks.27.mlp.w3.weight": (1440, 3840),
    "blocks.28.adaln_modulation.1.weight": (12288, 2048),
    "blocks.29.attn.k_norm.weight": (128,),
    "blocks.29.mlp.w2.weight": (5461, 2048),
    "final_layer.norm.weight": (2048,),
    "final_layer.linear.weight": (1024, 2048),
    "final_layer.adaln_modulation.1.weight": (4096, 2048),
    "base_final_layer.norm.weight": (1440,),
    "base_final_layer.linear.weight": (1024, 1440),
    "base_final_layer.adaln_modulation.1.bias": (2880,),
    "enc_rope.freqs_cos": (268, 72),
    "dec_rope.freqs_sin": (256, 128),
}


def test_released_xl_has_the_official_state_dict_layout():
    """572 keys and 875.2M parameters (875,216,500, W included: the official count of the released
    checkpoint's "ema" state dict); spot checks of names and shapes from the official code."""
    with torch.device("meta"):
        model = build_model(preset("RAEv2-XL"))
    assert isinstance(model, RAEv2DiT)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(state) == 572
    assert sum(p.numel() for p in model.parameters()) == 875_216_500
    assert {k: state.get(k) for k in OFFICIAL_XL} == OFFICIAL_XL
    # 28 trunk blocks of 18 keys without adaLN, 2 head blocks of 20 with it, no other block.
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    assert blocks == set(range(30))
    assert [sum(k.startswith(f"blocks.{i}.") for k in state) for i in (0, 27, 28, 29)] == [18, 18, 20, 20]
    assert not any(k.startswith("blocks.27.adaln") for k in state)
    # W is a parameter without gradient; the RoPE tables are persistent buffers.
    assert not model.t_embedder.W.requires_grad
    assert {k for k, _ in model.named_buffers()} == {"enc_rope.freqs_cos", "enc_rope.freqs_sin",
                                                     "dec_rope.freqs_cos", "dec_rope.freqs_sin"}


def test_equal_widths_have_no_s_projector_and_b_builds():
    """The official s_projector is an Identity (no parameters) when trunk and head widths agree."""
    model = tiny(decoder_hidden_size=32, head_num_heads=2)
    assert not any(k.startswith("s_projector") for k in model.state_dict())
    x, t, y = inputs(2)
    assert all(o.shape == x.shape for o in model(x, t, y))
    with torch.device("meta"):
        b = build_model(preset("RAEv2-B"))
    assert len(b.blocks) == 14 and b.blocks[12].attn.q.in_features == 1024


def test_condition_rows_of_the_trunk_rope_do_not_rotate():
    """enc_rope: the 2-D table of the image tokens, then rows of angle 0 for the condition tokens."""
    model = tiny()
    rope, plain = model.enc_rope, RotaryEmbedding2D(16 // 2, 4)
    assert rope.freqs_cos.shape == (16 + 12, 16)
    assert torch.equal(rope.freqs_cos[:16], plain.freqs_cos) and torch.equal(rope.freqs_sin[:16], plain.freqs_sin)
    assert torch.equal(rope.freqs_cos[16:], torch.ones(12, 16))
    assert torch.equal(rope.freqs_sin[16:], torch.zeros(12, 16))
    assert not torch.equal(plain.freqs_cos, torch.ones_like(plain.freqs_cos))  # the image rows do rotate


def test_official_initialisation_zeroes_the_outputs():
    """Zero output layers and head adaLN (official initialize_weights): a fresh model predicts zeros."""
    model = RAEv2DiT(TINY_RAEV2).eval()
    x, t, y = inputs(2)
    x_full, x_base = model(x, t, y)
    assert torch.equal(x_full, torch.zeros_like(x)) and torch.equal(x_base, torch.zeros_like(x))
    assert float(model.t_embedder.W.std()) > 0.5  # W keeps its N(0, 1) draw
    assert float(model.ctx_embedder.learnable_tokens.detach().abs().max()) > 0


def test_base_output_reads_trunk_blocks_up_to_encoder_depth_only():
    model = tiny()
    c = model.config
    x, t, y = inputs(3)
    full0, base0 = model(x, t, y)
    assert not torch.allclose(full0, base0)
    later = [model.blocks[i] for i in range(c.encoder_depth, c.depth + c.head_depth)]  # later trunk blocks, head
    with torch.no_grad():
        for module in [*later, model.final_layer, model.s_projector, model.x_embedder]:
            for p in module.parameters():
                p.add_(0.1)
    full1, base1 = model(x, t, y)
    assert torch.equal(base1, base0)
    assert not torch.allclose(full1, full0)
    with torch.no_grad():
        for p in model.base_final_layer.parameters():
            p.add_(0.1)
    full2, base2 = model(x, t, y)
    assert torch.equal(full2, full1)
    assert not torch.allclose(base2, base1)
    with torch.no_grad():
        model.blocks[c.encoder_depth - 1].mlp.w3.bias.add_(0.1)  # the last block the base head reads
    assert not torch.allclose(model(x, t, y)[1], base2)
    shifted = RAEv2DiT(c.replace(encoder_depth=c.encoder_depth + 1))
    shifted.load_state_dict(model.state_dict())
    assert not torch.allclose(shifted.eval()(x, t, y)[1], model(x, t, y)[1])


def test_batch_rows_are_independent():
    model = tiny()
    x, t, y = inputs(3)
    together = model(x, t, y)
    for i in range(3):
        alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        for a, b in zip(together, alone):
            assert torch.allclose(a[i:i + 1], b, rtol=0, atol=1e-6)


def test_drop_mask_selects_the_null_class():
    model = tiny()
    x, t, y = inputs(4)
    y = torch.tensor([1, 2, 3, 4])
    drop = torch.tensor([True, False, True, False])
    got = model(x, t, y, drop_mask=drop)
    want = model(x, t, torch.where(drop, TINY_RAEV2.null_class, y))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not torch.allclose(model(x, t, y)[0][0], got[0][0])


@pytest.mark.parametrize("precision,dtype", [(Precision.BF16, torch.bfloat16), (Precision.FP16, torch.float16)])
def test_low_precision_casts_attention_and_mlp_only(precision, dtype):
    """apply_precision casts every block's q, k, v, proj and w1, w2, w3 (trunk and head); qk-norm, block
    norms, head adaLN, embeddings, s_projector, output layers and RoPE stay fp32. Bound (docs/CONTRACTS.md
    "Tolerances"): against fp32, the error is at most twice the error of the naive run (torch.autocast:
    every matmul in the low dtype), on the max and on the mean, for both outputs."""
    ref = tiny()
    low = apply_precision(tiny(), precision)
    for name, p in low.named_parameters():
        in_matmul = re.match(r"blocks\.\d+\.(attn\.(q|k|v|proj)|mlp\.w[123])\.", name) is not None
        assert p.dtype == (dtype if in_matmul else torch.float32), name
    assert all(b.dtype == torch.float32 for b in low.buffers())
    x, t, y = inputs(3)
    with torch.inference_mode():
        want = ref(x, t, y)
        got = low(x, t, y)
        with torch.autocast("cpu", dtype=dtype):
            naive = ref(x, t, y)
    assert all(0 < (g.double() - w).abs().max() for w, g in zip(want, got))  # the cast did something
    assert_low_precision_rule(want, got, naive)


def test_contiguous_head_tokens_change_nothing_but_rounding():
    """``reference`` keeps the official (transposed-view) layout of the head's tokens; the other precisions
    make them contiguous: the same maths up to the summation order of the normalisations."""
    model = tiny()
    seen = []
    model.blocks[model.config.depth].register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    x, t, y = inputs(2)
    with torch.inference_mode():
        want = apply_precision(model, Precision.REFERENCE)(x, t, y)
        got = apply_precision(model, Precision.FP32)(x, t, y)
    assert seen == [False, True]
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_loads_strictly():
    model = tiny(seed=3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = RAEv2DiT(TINY_RAEV2)
    fresh.load_state_dict(state, strict=True)
    x, t, y = inputs(2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.eval()(x, t, y), model(x, t, y)))
    del state["enc_rope.freqs_cos"]
    with pytest.raises(RuntimeError, match="enc_rope.freqs_cos"):
        RAEv2DiT(TINY_RAEV2).load_state_dict(state, strict=True)


def test_build_model_picks_the_family_and_refusals_are_one_line():
    assert type(build_model(TINY["sit"])) is IGDiT and type(build_model(TINY_RAEV2)) is RAEv2DiT
    with pytest.raises(ConfigError, match="builds RAEv2 models, not SiT-tiny"):
        RAEv2DiT(TINY["sit"])
    with pytest.raises(ConfigError, match="set use_rope, learn_sigma accordingly"):
        RAEv2DiT(TINY_RAEV2.replace(learn_sigma=True, use_rope=False))
