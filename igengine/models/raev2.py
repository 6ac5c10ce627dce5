"""The RAEv2 IG model: a DiT trunk with in-context condition tokens, a DDT head, and an IG base head.

Official model: ``DiTwDDTHeadIG`` (nanovisionx/RAEv2, src/stage2/models/DDT.py) with label
conditioning. Module, parameter and buffer names are the official ones, so the released checkpoint's
state dict loads with ``strict=True``. With T image tokens (one per patch), D the trunk width and Dh
the head width:

  trunk   s_embedder(x) (N, T, D), then 4 time tokens and 8 class tokens appended: (N, T + 12, D);
          ``depth`` pre-RMSNorm blocks (no adaLN): x += attn(norm1(x)); x += mlp(norm2(x)), with
          q/k/v projections, RMS qk-norm, 2-D RoPE over the image tokens (angle 0 for the condition
          tokens) and a SwiGLU MLP (w1, w2, w3).
  head    c = s_projector(silu(t_emb + trunk image tokens)) (N, T, Dh), one condition per token;
          x_embedder(x) (N, T, Dh) through ``head_depth`` adaLN blocks modulated by c, then
          final_layer(x, c) -> x_full.
  base    the image tokens after trunk block ``encoder_depth`` (official ``base_model_depth``):
          h = silu(t_emb + tokens); base_final_layer(h, h) -> x_base.
Both outputs are x-predictions (N, C, H, W). ``t_emb`` is the time MLP's output before the learnable
time tokens are added (official ``t_emb_base``).

All blocks (trunk first, then head) live in one ``blocks`` list, as in the official module, so
``igengine.models.lowp.apply_precision`` casts every block's ``attn`` and ``mlp`` and nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from igengine.config import Family, ModelConfig
from igengine.errors import ConfigError
from igengine.models.layers import PatchEmbed, RMSNorm, RotaryEmbedding2D, compile_region, run_in_own_dtype, unpatchify

# Width of the Gaussian Fourier features of the time (official ``embedding_size``): sin and cos of
# this many random frequencies feed the time MLP (2 x 256 inputs).
FOURIER_FEATURES = 256


def modulate_per_token(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, every tensor (N, T, D): the DDT head's conditions are per token."""
    return x * (1 + scale) + shift


class FourierTimeTokens(nn.Module):
    """Time -> its embedding (N, 1, D) and ``n_tokens`` time tokens (N, n_tokens, D).

    features = [sin(2 pi t W), cos(2 pi t W)] with W (256,) drawn once from N(0, 1) and stored (a
    parameter without gradient: ``t_embedder.W`` of the state dict); embedding = mlp(features);
    tokens = learnable_tokens + embedding.
    """

    def __init__(self, hidden_size: int, n_tokens: int, features: int = FOURIER_FEATURES):
        super().__init__()
        self.W = nn.Parameter(torch.randn(features), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * features, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, hidden_size) / hidden_size ** 0.5)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (N,) float32 -> (embedding (N, 1, D), tokens (N, n_tokens, D))."""
        args = t.float()[:, None] * self.W[None, :] * 2 * math.pi  # the official order of the products
        emb = self.mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=-1)).unsqueeze(1)
        return emb, self.learnable_tokens + emb


class ClassTokens(nn.Module):
    """Label -> ``n_tokens`` class tokens (N, n_tokens, D): learnable_tokens + embedding_table(label).

    The table has num_classes + 1 rows; the last one (label ``num_classes``) is the null class of CFG.
    """

    def __init__(self, num_classes: int, hidden_size: int, n_tokens: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, hidden_size) / hidden_size ** 0.5)

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            labels = torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)
        return self.learnable_tokens + self.embedding_table(labels).unsqueeze(1)


class SplitQKVAttention(nn.Module):
    """Self-attention with separate q, k, v projections, RMS qk-norm and RoPE (official ``NormAttention``).

    The official attention adds a mask built from the condition tokens' padding; with label
    conditioning it is all zeros (every token attends to every token), so it is left out here: the
    values are the same up to the rounding of the SDPA kernel that a mask selects.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        """x (N, L, D) -> (N, L, D); ``rope`` has L rows."""
        n, length, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).reshape(n, length, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # (N, H, L, hd)

        q, k, v = heads(self.q), heads(self.k), heads(self.v)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.permute(0, 2, 1, 3).reshape(n, length, d))


class SwiGLU3(nn.Module):
    """w3(silu(w1(x)) * w2(x)) with separate gate projections (official ``SwiGLUFFN``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """The SwiGLU width of a RAEv2 block, the official expression: 3840 for 1440, 5461 for 2048 (ratio 4)."""
    return int(2 / 3 * hidden_size * mlp_ratio)


class TrunkBlock(nn.Module):
    """Pre-norm block without adaLN: x += attn(norm1(x)); x += mlp(norm2(x)).  x: (N, L, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.norm2 = RMSNorm(hidden_size)
        self.attn = SplitQKVAttention(hidden_size, num_heads)
        self.mlp = SwiGLU3(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))

    @compile_region
    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        x = x + run_in_own_dtype(self.attn, self.norm1(x), rope=rope)
        return x + run_in_own_dtype(self.mlp, self.norm2(x))


class HeadBlock(TrunkBlock):
    """adaLN block of the DDT head with a condition per token (shift, scale and gate for each of attn, mlp).

    x <- x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
    x <- x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp));  x, c: (N, T, Dh).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    @compile_region
    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln_modulation(c).chunk(6, dim=-1)
        h = modulate_per_token(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa * run_in_own_dtype(self.attn, h, rope=rope)
        h = modulate_per_token(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * run_in_own_dtype(self.mlp, h)


class TokenFinalLayer(nn.Module):
    """RMSNorm -> per-token adaLN (shift, scale) -> linear to p^2 * C (official ``DDTFinalLayer``).  x, c: (N, T, D)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate_per_token(self.norm(x), shift, scale))


def _check_config(config: ModelConfig) -> None:
    """The official architecture has no switches: refuse a config asking for something it lacks."""
    if config.family != Family.RAEV2:
        raise ConfigError(f"RAEv2DiT builds RAEv2 models, not {config.name} (family {config.family.value})")
    wrong = [name for name, want in (("use_swiglu", True), ("use_rope", True), ("use_rmsnorm", True),
                                     ("qk_norm", True), ("wo_shift", False), ("learn_sigma", False))
             if getattr(config, name) != want]
    if wrong:
        raise ConfigError(f"{config.name}: a RAEv2 model always has SwiGLU, RoPE, RMSNorm, qk-norm, shifted adaLN "
                          f"and no learned sigma; set {', '.join(wrong)} accordingly")


class RAEv2DiT(nn.Module):
    """forward(x (N,C,H,W), t (N,), y (N,) int64) -> (x_full, x_base), both (N, C, H, W) x-predictions.

    ``config``: a RAEv2 ModelConfig (``hidden_size``/``depth``/``num_heads`` the trunk,
    ``decoder_hidden_size``/``head_depth``/``head_num_heads`` the DDT head, ``encoder_depth`` the
    official ``base_model_depth``, ``time_tokens``/``class_tokens`` the condition tokens).
    ``drop_mask`` (N,) bool: rows that take the null class (label ``num_classes``) instead of ``y``.
    ``contiguous_tokens``: set by ``apply_precision`` (the head's token layout; the same values).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = c = config
        d, dh, p = c.hidden_size, c.decoder_hidden_size, c.patch_size
        self.s_embedder = PatchEmbed(c.input_size, p, c.in_channels, d)
        self.x_embedder = PatchEmbed(c.input_size, p, c.in_channels, dh)
        # The official module has no s_projector parameters when the widths agree.
        self.s_projector = nn.Linear(d, dh) if d != dh else nn.Identity()
        self.t_embedder = FourierTimeTokens(d, c.time_tokens)
        self.ctx_embedder = ClassTokens(c.num_classes, d, c.class_tokens)
        self.blocks = nn.ModuleList(
            [TrunkBlock(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth)]
            + [HeadBlock(dh, c.head_num_heads, c.mlp_ratio) for _ in range(c.head_depth)]
        )
        self.final_layer = TokenFinalLayer(dh, p, c.in_channels)
        grid = c.input_size // p
        self.enc_rope = RotaryEmbedding2D(d // c.num_heads // 2, grid, extra_tokens=c.time_tokens + c.class_tokens)
        self.dec_rope = RotaryEmbedding2D(dh // c.head_num_heads // 2, grid)
        self.base_final_layer = TokenFinalLayer(d, p, c.in_channels)
        # Token layout: the head's patch embedding (N, T, Dh) is a transposed view of the convolution's
        # (N, Dh, T) for patch 1, as in the official code (``reference`` keeps it); the other precisions
        # make it contiguous (``igengine.models.lowp.apply_precision``; see ``IGDiT``). The trunk's
        # tokens are contiguous either way (the condition tokens are concatenated to them).
        self.contiguous_tokens = False
        self.initialize_weights()

    @property
    def family(self) -> Family:
        return self.config.family

    def initialize_weights(self) -> None:
        """The official initialisation: xavier patch embeddings with zero bias, N(0, 0.02) label table and
        time MLP, zero adaLN of the head blocks, zero output layers. Every other linear keeps PyTorch's
        default; W and the learnable tokens keep their draw from construction (as in the official code)."""
        for embedder in (self.x_embedder, self.s_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.ctx_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks[self.config.depth:]:
            nn.init.zeros_(block.adaln_modulation[-1].weight)
            nn.init.zeros_(block.adaln_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer, self.base_final_layer):
            nn.init.zeros_(layer.adaln_modulation[-1].weight)
            nn.init.zeros_(layer.adaln_modulation[-1].bias)
            nn.init.zeros_(layer.linear.weight)
            nn.init.zeros_(layer.linear.bias)

    def _output(self, layer: TokenFinalLayer, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unpatchify(layer(x, c), self.config.patch_size, self.config.in_channels)  # (N, C, H, W)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        t_emb, time_tokens = self.t_embedder(t)  # (N, 1, D), (N, time_tokens, D)
        seq = torch.cat([self.s_embedder(x), time_tokens, self.ctx_embedder(y, drop_mask)], dim=1)  # (N, L, D)
        image = self.s_embedder.num_patches
        x_base = None
        for i in range(cfg.depth):
            seq = self.blocks[i](seq, self.enc_rope)
            if i + 1 == cfg.encoder_depth:
                h = F.silu(t_emb + seq[:, :image])
                x_base = self._output(self.base_final_layer, h, h)
        c = self.s_projector(F.silu(t_emb + seq[:, :image]))  # (N, T, Dh): one condition per token
        h = self.x_embedder(x)  # (N, T, Dh)
        if self.contiguous_tokens:
            h = h.contiguous()
        for i in range(cfg.depth, cfg.depth + cfg.head_depth):
            h = self.blocks[i](h, c, self.dec_rope)
        return self._output(self.final_layer, h, c), x_base
