"""Low-precision networks: which parts of an IG model (IGDiT, RAEv2DiT) run in bf16/fp16 and which stay fp32.

Only the attention and MLP sub-modules of each block (the matmuls, >95% of the FLOPs) are cast.
Everything that decides the scale of activations stays fp32: patch/time/label embeddings (RAEv2's
condition tokens), every normalisation (LayerNorm, RMSNorm, qk-norm, computed in fp32 even inside
attention), the adaLN modulation, the gated residual stream, RoPE, RAEv2's s_projector, and both
output heads. This is what keeps fp16 finite (no LayerNorm statistics or modulation products
overflow) and bf16 close to fp32.
"""

from __future__ import annotations

import torch

from igengine.config import Precision
from igengine.precision import NETWORK_DTYPE


def apply_precision(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """Cast the attention and MLP weights of every block to the precision's network dtype, in place.

    Every precision but ``reference`` also runs the tokens in contiguous layout (``contiguous_tokens``:
    the same values, a faster matmul path); ``reference`` keeps the official code's layout.
    """
    precision = Precision(precision)
    dtype = NETWORK_DTYPE[precision]
    model.contiguous_tokens = precision != Precision.REFERENCE
    for block in model.blocks:
        block.attn.to(dtype)
        block.mlp.to(dtype)
        # qk-norm weights stay fp32: the norm itself runs in fp32.
        for norm in (block.attn.q_norm, block.attn.k_norm):
            norm.float()
    return model
