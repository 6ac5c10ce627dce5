"""The IG diffusion transformer: one forward pass returns the final and the intermediate output.

SiT+IG and LightningDiT+IG share one skeleton; the family only switches options (LightningDiT adds
SwiGLU, RoPE, RMSNorm, qk-norm and no-shift adaLN). The intermediate head ``final_layer_xr`` reads
the token stream after block ``encoder_depth`` (1-based), exactly as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from igengine.config import Family, ModelConfig
from igengine.models.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    RotaryEmbedding2D,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    unpatchify,
)


class IGDiT(nn.Module):
    """forward(x (N,C,H,W), t (N,), y (N,) int64) -> (v_final, v_inter), both (N, C, H, W)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, c.hidden_size), requires_grad=False)
        if c.use_rope:
            self.feat_rope = RotaryEmbedding2D(c.hidden_size // c.num_heads // 2, c.input_size // c.patch_size)
        else:
            self.feat_rope = None
        self.blocks = nn.ModuleList(
            DiTBlock(
                c.hidden_size,
                c.num_heads,
                c.mlp_ratio,
                qk_norm=c.qk_norm,
                use_swiglu=c.use_swiglu,
                use_rmsnorm=c.use_rmsnorm,
                wo_shift=c.wo_shift,
            )
            for _ in range(c.depth)
        )
        head = c.head_hidden_size
        self.final_layer_xr = FinalLayer(head, c.patch_size, c.out_channels, use_rmsnorm=c.use_rmsnorm)
        self.final_layer = FinalLayer(head, c.patch_size, c.out_channels, use_rmsnorm=c.use_rmsnorm)
        # Token layout. The patch embedding's (N, T, D) is a transposed view of the convolution's
        # (N, D, T), and adding the position table keeps that layout for LightningDiT's patch 1
        # (SiT's comes out contiguous); every elementwise op of the blocks then keeps it. The official
        # code runs so, and ``reference`` keeps it: its normalisations then sum in the official order
        # (a contiguous LightningDiT differs from the official one in the last bits). The other
        # precisions make the tokens contiguous (``igengine.models.lowp.apply_precision``): on the
        # strided layout a bf16 linear takes a batched-matmul path with the weight expanded per sample
        # (2.1x slower) and a oneDNN fp32 linear is 1.1x slower (LightningDiT-B/1 shapes, 2 CPU threads).
        self.contiguous_tokens = False
        self.initialize_weights()

    @property
    def family(self) -> Family:
        return self.config.family

    def initialize_weights(self) -> None:
        """The official initialisation (xavier linears, zero adaLN and output layers)."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        grid = self.config.input_size // self.config.patch_size
        pos = sincos_pos_embed_2d(self.config.hidden_size, grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in (self.final_layer, self.final_layer_xr):
            nn.init.zeros_(head.adaLN_modulation[-1].weight)
            nn.init.zeros_(head.adaLN_modulation[-1].bias)
            nn.init.zeros_(head.linear.weight)
            nn.init.zeros_(head.linear.bias)

    def _head(self, layer: FinalLayer, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        out = unpatchify(layer(x, c), cfg.patch_size, cfg.out_channels)  # (N, C_out, H, W)
        return out[:, : cfg.in_channels] if cfg.learn_sigma else out

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        if self.contiguous_tokens:
            h = h.contiguous()
        c = self.t_embedder(t) + self.y_embedder(y, drop_mask)  # (N, D)
        v_inter = None
        for i, block in enumerate(self.blocks):
            h = block(h, c, self.feat_rope)
            if i + 1 == self.config.encoder_depth:
                v_inter = self._head(self.final_layer_xr, h, c)
        v_final = self._head(self.final_layer, h, c)
        return v_final, v_inter
