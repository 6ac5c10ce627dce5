"""Analytic FLOP count of one IG DiT forward, from the model config alone.

FLOPs here are 2 x multiply-adds of the matrix products, the convention of
``torch.utils.flop_counter.FlopCounterMode`` (and of MFU figures): a product of an (M, K) and a
(K, N) matrix is 2*M*K*N FLOPs. The count is exactly what ``FlopCounterMode`` reports for
``IGDiT.forward`` when attention is counted (``tests/test_flops.py`` checks equality):

counted, per row (one image; T tokens of width D, head width Dh, patch p, C_in / C_out channels)
  patch embedding   Conv2d k=p, stride p:       2 * T * (C_in p^2) * D
  timestep MLP      Linear(256, D), Linear(D, D):  2 * 256 * D + 2 * D * D
  label embedding   a table lookup:             0
  each block        adaLN modulation Linear(D, kD), k = 6 (4 with wo_shift):  2 * D * kD
                    qkv Linear(D, 3D):          2 * T * D * 3D
                    scores Q K^T and A V:       2 * T^2 * D each (summed over heads)
                    out projection Linear(D, D): 2 * T * D * D
                    MLP fc1/fc2 with hidden H = int(D * mlp_ratio):  2 * T * D * H, twice
                    or SwiGLU with H = int(2/3 * int(D * mlp_ratio)):
                      w12 Linear(D, 2H): 2 * T * D * 2H;  w3 Linear(H, D): 2 * T * H * D
  each of the two   adaLN Linear(Dh, 2 Dh):     2 * Dh * 2Dh
  heads (final_layer, linear Linear(Dh, p^2 C_out): 2 * T * Dh * p^2 C_out
  final_layer_xr)

not counted (as in FlopCounterMode): biases, every elementwise op (activations, adaLN modulate,
gates, residual adds), LayerNorm / RMSNorm / qk-norm, softmax and the attention scaling, RoPE,
the sinusoidal time features, position embedding adds, unpatchify (a permutation).

RAEv2 (``igengine.models.RAEv2DiT``; T image tokens, L = T + time + class tokens in the trunk, trunk
width D, head width Dh, SwiGLU width H = int(2/3 * width * mlp_ratio) of the block's own width)
  patch embeddings  s_embedder and x_embedder:  2 * T * (C_in p^2) * (D + Dh)
  time MLP          Linear(512, D), Linear(D, D) (Gaussian Fourier features):  2 * 512 * D + 2 * D * D
  class tokens      a table lookup:             0
  each trunk block  q, k, v, proj Linear(D, D): 4 * 2 * L * D * D
  (no adaLN)        scores and A V:             2 * L^2 * D each
                    SwiGLU w1, w2 Linear(D, H), w3 Linear(H, D):  3 * 2 * L * D * H
  s_projector       Linear(D, Dh) per image token (absent when D == Dh):  2 * T * D * Dh
  each head block   as a trunk block over T tokens at width Dh, plus its per-token adaLN
                    Linear(Dh, 6 Dh):           2 * T * Dh * 6Dh
  final_layer       per-token adaLN Linear(Dh, 2Dh) and linear Linear(Dh, p^2 C):  2 * T * Dh * (2Dh + p^2 C)
  base_final_layer  the same at width D:        2 * T * D * (2D + p^2 C)
RAEv2-XL: 475.0 GFLOP per image-forward, 2.00 x SiT-XL/2's 237.3 (the same count on the official module:
benchmarks/official_raev2.py). Without the attention products it is 462.3; setting that against SiT-XL/2
with them gives the mixed-convention ratio 1.95.

Note on FlopCounterMode and attention: it counts the fused SDPA kernels of CUDA (flash,
memory-efficient, cuDNN) and the math path (two bmm), but not the CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``), so on a CPU it reports the attention products as
0 unless the math SDPA backend (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) or the meta
device is used. This module always counts them.
"""

from __future__ import annotations

from igengine.config import Family, ModelConfig

# TimestepEmbedder's sinusoidal feature width (igengine.models.layers.TimestepEmbedder default).
FREQUENCY_EMBEDDING_SIZE = 256
# RAEv2's time MLP input: sin and cos of 256 Gaussian Fourier frequencies (igengine.models.raev2.FOURIER_FEATURES).
RAEV2_TIME_FEATURES = 2 * 256


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) @ (k, n) product."""
    return 2 * m * k * n


def raev2_swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """SwiGLU width of a RAEv2 block of ``width`` (``igengine.models.raev2.swiglu_hidden``, the official expression)."""
    return int(2 / 3 * width * mlp_ratio)


def mlp_input_width(config: ModelConfig) -> int:
    """Output width of a block's first MLP product: fc1's hidden width, or SwiGLU's two gates together
    (``igengine.models.layers.DiTBlock``: ``SwiGLU(dim, int(2/3 * mlp_hidden))``); for RAEv2, the
    trunk block's w1 (its two gates are separate products, w1 and w2, of this width each)."""
    if config.family == Family.RAEV2:
        return raev2_swiglu_hidden(config.hidden_size, config.mlp_ratio)
    mlp_hidden = int(config.hidden_size * config.mlp_ratio)
    return 2 * int(2 / 3 * mlp_hidden) if config.use_swiglu else mlp_hidden


def tokens_per_row(config: ModelConfig) -> int:
    """Patch tokens per image."""
    return (config.input_size // config.patch_size) ** 2


def sequence_tokens(config: ModelConfig) -> int:
    """Tokens a (trunk) block attends over per image: the patch tokens, and for RAEv2 its time and class tokens."""
    extra = config.time_tokens + config.class_tokens if config.family == Family.RAEV2 else 0
    return tokens_per_row(config) + extra


def block_linear_shapes(config: ModelConfig, rows: int = 1) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of each per-token linear of a block at ``rows`` rows: A (M, K) @ W^T with W (N, K), M = rows x tokens.

    Keys, the blocks' module names: "fc1", "fc2" (GELU MLP) or "w12", "w3" (SwiGLU; w3 takes one gate's
    width), "qkv", "proj" (attention's out projection), ordered largest first (by K x N). These GEMMs carry
    nearly all of a forward's FLOPs: depth x the sum of their 2 M K N is the breakdown's qkv + attn_proj +
    mlp. ``igengine.bench`` times the largest three for the matmul peak.
    RAEv2: a trunk block's "w1", "w2", "w3", "q", "k", "v", "proj" over its M = rows x (patch + condition)
    tokens; the trunk's ``depth`` blocks carry 81% of RAEv2-XL's FLOPs (the head blocks have wider ones).
    """
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    c = config
    d = c.hidden_size
    m = rows * sequence_tokens(c)
    width = mlp_input_width(c)
    if c.family == Family.RAEV2:
        shapes = {"w1": (m, d, width), "w2": (m, d, width), "w3": (m, width, d),
                  "q": (m, d, d), "k": (m, d, d), "v": (m, d, d), "proj": (m, d, d)}
    else:
        if c.use_swiglu:
            shapes = {"w12": (m, d, width), "w3": (m, width // 2, d)}
        else:
            shapes = {"fc1": (m, d, width), "fc2": (m, width, d)}
        shapes |= {"qkv": (m, d, 3 * d), "proj": (m, d, d)}
    return dict(sorted(shapes.items(), key=lambda kv: -kv[1][1] * kv[1][2]))


def forward_flops_breakdown(config: ModelConfig, rows: int = 1) -> dict[str, int]:
    """FLOPs of one forward of ``rows`` rows, by part (keys below); see the module docstring.

    Keys: patch_embed, timestep_mlp, label_embed (0), block_adaln, qkv, attention (Q K^T + A V),
    attn_proj, mlp, heads (both heads, incl. their adaLN). Values are totals over all blocks and
    all ``rows``. RAEv2 adds s_projector; its patch_embed counts both embeddings, its blocks are the
    trunk's and the DDT head's (block_adaln: the head blocks' per-token adaLN; the trunk has none), its
    heads are final_layer and base_final_layer.
    """
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    if config.family == Family.RAEV2:
        return _raev2_breakdown(config, rows)
    c = config
    d = c.hidden_size
    dh = c.head_hidden_size
    tokens = tokens_per_row(c)
    patch_out = c.patch_size * c.patch_size * c.out_channels
    width = mlp_input_width(c)
    # SwiGLU's second product takes one gate's width (half of the first's output).
    mlp = _mm(tokens, d, width) + _mm(tokens, width // 2 if c.use_swiglu else width, d)
    n_chunks = 4 if c.wo_shift else 6
    per_row = {
        "patch_embed": _mm(tokens, c.in_channels * c.patch_size * c.patch_size, d),
        "timestep_mlp": _mm(1, FREQUENCY_EMBEDDING_SIZE, d) + _mm(1, d, d),
        "label_embed": 0,
        "block_adaln": c.depth * _mm(1, d, n_chunks * d),
        "qkv": c.depth * _mm(tokens, d, 3 * d),
        "attention": c.depth * 2 * _mm(tokens, d, tokens),  # Q K^T and A V, summed over heads
        "attn_proj": c.depth * _mm(tokens, d, d),
        "mlp": c.depth * mlp,
        "heads": 2 * (_mm(1, dh, 2 * dh) + _mm(tokens, dh, patch_out)),
    }
    return {k: rows * v for k, v in per_row.items()}


def _raev2_breakdown(c: ModelConfig, rows: int) -> dict[str, int]:
    tokens, length = tokens_per_row(c), sequence_tokens(c)
    d, dh, patch_out = c.hidden_size, c.decoder_hidden_size, c.patch_size * c.patch_size * c.in_channels

    def blocks(n: int, m: int, width: int) -> dict[str, int]:
        """n blocks over m tokens of ``width``."""
        hidden = raev2_swiglu_hidden(width, c.mlp_ratio)
        return {"qkv": n * 3 * _mm(m, width, width), "attention": n * 2 * _mm(m, width, m),
                "attn_proj": n * _mm(m, width, width), "mlp": n * (2 * _mm(m, width, hidden) + _mm(m, hidden, width))}

    trunk, head = blocks(c.depth, length, d), blocks(c.head_depth, tokens, dh)
    per_row = {
        "patch_embed": _mm(tokens, c.in_channels * c.patch_size * c.patch_size, d + dh),
        "timestep_mlp": _mm(1, RAEV2_TIME_FEATURES, d) + _mm(1, d, d),
        "label_embed": 0,
        "block_adaln": c.head_depth * _mm(tokens, dh, 6 * dh),
        **{k: trunk[k] + head[k] for k in trunk},
        "s_projector": _mm(tokens, d, dh) if d != dh else 0,
        "heads": _mm(tokens, dh, 2 * dh + patch_out) + _mm(tokens, d, 2 * d + patch_out),
    }
    return {k: rows * v for k, v in per_row.items()}


def forward_flops(config: ModelConfig, rows: int = 1) -> int:
    """Total FLOPs (2 x multiply-adds of matmuls and convolutions) of one forward of ``rows`` rows (IGDiT, RAEv2DiT).

    Counts exactly the terms ``FlopCounterMode`` counts (convolution, linear layers, both attention
    products); see the module docstring for the list of what is and is not counted. SiT-XL/2 at
    256 px: about 2 x 118.6 G per image (DiT reports 118.6 "GFLOPs" meaning multiply-adds).
    """
    return sum(forward_flops_breakdown(config, rows).values())
