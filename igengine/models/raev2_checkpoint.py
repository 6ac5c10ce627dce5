"""RAEv2 checkpoints: recognising them, and their ModelConfig from the tensors.

The official file (nanovisionx/RAEv2, src/utils/checkpoint.py) is ``{'step', 'epoch', 'model', 'ema',
'optimizer', 'scheduler'}``; samplers take ``'ema'`` (``igengine.safeload`` prefers it) and load it
strictly into ``DiTwDDTHeadIG``. It records no model config: everything but the IG base depth is read
from the tensors, which say more here than for the other families:

  trunk width, latent channels, patch      s_embedder.proj.weight (hidden, C, p, p)
  DDT-head width                           x_embedder.proj.weight
  latent grid                              dec_rope.freqs_cos rows (= image tokens)
  trunk / head heads                       width / enc_rope (dec_rope) columns (the RoPE tables are per head)
  time and class tokens                    t_embedder / ctx_embedder learnable_tokens rows
  trunk and head depth                     blocks.* (head blocks carry adaln_modulation)
  classes                                  ctx_embedder.embedding_table rows - 1 (the null class)

``base_model_depth`` (``encoder_depth`` here) cannot be read: it comes from ``encoder_depth``, else from
igengine metadata, else from the preset of the tensors' shape (RAEv2-XL: 8), never from a guess.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from igengine.config import Family, ModelConfig
from igengine.errors import CheckpointError
from igengine.models.registry import MODEL_NAMES, family_of, preset

# Tensors only a DiTwDDTHead has (SiT and LightningDiT have y_embedder, pos_embed / feat_rope instead).
RAEV2_MARKERS = ("s_embedder.proj.weight", "ctx_embedder.embedding_table.weight", "enc_rope.freqs_cos")
IG_HEAD = "base_final_layer.linear.weight"
_NEEDED = ("s_embedder.proj.weight", "x_embedder.proj.weight", "t_embedder.learnable_tokens",
           "ctx_embedder.embedding_table.weight", "ctx_embedder.learnable_tokens", "enc_rope.freqs_cos",
           "dec_rope.freqs_cos", "final_layer.linear.weight", "blocks.0.mlp.w1.weight")


def is_raev2_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a RAEv2 DiT with a DDT head (IG or not)."""
    return any(k in state for k in RAEV2_MARKERS)


def describe_raev2(state: dict[str, torch.Tensor]) -> str:
    """The tensors in words, for refusals: "a RAEv2 DiT-DDT (trunk 1440 x 28, head 2048 x 2)"."""
    try:
        hidden = state["s_embedder.proj.weight"].shape[0]
        head = state["x_embedder.proj.weight"].shape[0]
        total, head_depth = _depths(state)
        return f"a RAEv2 DiT-DDT (trunk {hidden} x {total - head_depth} blocks, head {head} x {head_depth})"
    except (KeyError, IndexError):
        return "a RAEv2 DiT-DDT state dict"


def _depths(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    head = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.adaln_modulation\.", k))}
    return (max(ids) + 1 if ids else 0), len(head)


def _shape_config(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    missing = [k for k in _NEEDED if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete RAEv2 DiT-DDT state dict: missing {missing}")
    if IG_HEAD not in state:
        raise CheckpointError(f"{path} is a RAEv2 DiT-DDT without the IG head 'base_final_layer' (a DiTwDDTHead, "
                              "not a DiTwDDTHeadIG): it has no intermediate output to guide with")
    hidden, in_ch, p, _ = state["s_embedder.proj.weight"].shape
    head_hidden = state["x_embedder.proj.weight"].shape[0]
    tokens = state["dec_rope.freqs_cos"].shape[0]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: dec_rope.freqs_cos has {tokens} rows, not a square token grid")
    total, head_depth = _depths(state)
    enc_head_dim = state["enc_rope.freqs_cos"].shape[1]
    dec_head_dim = state["dec_rope.freqs_cos"].shape[1]
    if hidden % enc_head_dim or head_hidden % dec_head_dim:
        raise CheckpointError(f"{path}: RoPE tables of {enc_head_dim} / {dec_head_dim} columns do not divide the "
                              f"widths {hidden} / {head_hidden}")
    mlp_hidden = state["blocks.0.mlp.w1.weight"].shape[0]
    # The official SwiGLU width is int(2/3 * hidden * mlp_ratio); 4.0 in every released config.
    mlp_ratio = 4.0 if int(2 / 3 * hidden * 4.0) == mlp_hidden else mlp_hidden * 1.5 / hidden
    if int(2 / 3 * hidden * mlp_ratio) != mlp_hidden:
        raise CheckpointError(f"{path}: SwiGLU width {mlp_hidden} is int(2/3 * {hidden} * r) for no mlp_ratio r")
    return dict(
        family=Family.RAEV2,
        input_size=grid * p,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=total - head_depth,
        num_heads=hidden // enc_head_dim,
        decoder_hidden_size=head_hidden,
        head_depth=head_depth,
        head_num_heads=head_hidden // dec_head_dim,
        time_tokens=state["t_embedder.learnable_tokens"].shape[0],
        class_tokens=state["ctx_embedder.learnable_tokens"].shape[0],
        num_classes=state["ctx_embedder.embedding_table.weight"].shape[0] - 1,
        mlp_ratio=mlp_ratio,
        use_swiglu=True, use_rope=True, use_rmsnorm=True, qk_norm=True,
        num_heads_source="the RoPE table's width (head dimension)",
    )


_ARCH = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "decoder_hidden_size",
         "head_depth", "head_num_heads", "time_tokens", "class_tokens")


def _preset_of_shape(shape: dict[str, Any]) -> str | None:
    for name in MODEL_NAMES:
        if family_of(name) == Family.RAEV2 and all(getattr(preset(name), k) == shape[k] for k in _ARCH):
            return name
    return None


def _arch_words(shape: dict[str, Any]) -> str:
    return (f"trunk {shape['hidden_size']} x {shape['depth']} blocks / {shape['num_heads']} heads, head "
            f"{shape['decoder_hidden_size']} x {shape['head_depth']} / {shape['head_num_heads']}, latent "
            f"{shape['in_channels']}x{shape['input_size']}x{shape['input_size']}")


def resolve_raev2_config(state: dict[str, torch.Tensor], path: Path, stored: dict[str, Any],
                         named: ModelConfig | None = None,
                         overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig of a RAEv2 state dict (see the module docstring); CheckpointError for what does not fit.

    ``stored``: the config in the file's igengine metadata ({} if none; used when it is a RAEv2 one).
    ``named``: the preset of an explicit ``model``, which must be a RAEv2 preset whose architecture the
    tensors have. ``overrides``: ``encoder_depth`` (the official base_model_depth), ``num_heads`` (must
    equal the RoPE table's), ``num_classes``.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    shape = _shape_config(state, path)
    notes: list[str] = []
    model_name = named.name if named is not None else None
    if named is not None:
        if named.family != Family.RAEV2:
            raise CheckpointError(f"`model` {model_name} is a {'SiT' if named.family == Family.SIT else 'LightningDiT'} "
                                  f"model but {path} is {describe_raev2(state)}: pass a RAEv2 `model` "
                                  f"({', '.join(n for n in MODEL_NAMES if family_of(n) == Family.RAEV2)}) or none")
        differ = [k for k in _ARCH if getattr(named, k) != shape[k]]
        if differ:
            raise CheckpointError(f"`model` {model_name} does not fit {path} ({_arch_words(shape)}): "
                                  + ", ".join(f"{k} {getattr(named, k)} != {shape[k]}" for k in differ))
    if stored.get("family") != Family.RAEV2.value:
        stored = {}
    name = model_name or stored.get("name") or _preset_of_shape(shape) or "RAEv2-custom"
    if "num_heads" in overrides and int(overrides["num_heads"]) != shape["num_heads"]:
        raise CheckpointError(f"`num_heads` {overrides['num_heads']} does not fit {path}: its RoPE table is per head of "
                              f"{shape['hidden_size'] // shape['num_heads']} dims, i.e. {shape['num_heads']} heads")
    if "encoder_depth" in overrides:
        depth, src = int(overrides["encoder_depth"]), "--encoder-depth"
    elif stored.get("encoder_depth") is not None:
        depth, src = int(stored["encoder_depth"]), stored.get("encoder_depth_source", "checkpoint metadata")
    elif name in MODEL_NAMES:
        depth = preset(name).encoder_depth
        src = preset(name).encoder_depth_source
        notes.append(f"encoder_depth (base_model_depth) {depth} is the official value of {name}: the checkpoint "
                     "records none; pass `encoder_depth` if the model was trained otherwise")
    else:
        raise CheckpointError(f"{path} is a RAEv2 model of a shape no preset has ({_arch_words(shape)}): pass "
                              "`encoder_depth`, the trunk block whose tokens feed the IG head (base_model_depth)")
    if "num_classes" in overrides and int(overrides["num_classes"]) != shape["num_classes"]:
        raise CheckpointError(f"`num_classes` {overrides['num_classes']} does not fit {path}: its label table has "
                              f"{shape['num_classes'] + 1} rows ({shape['num_classes']} classes and the null class)")
    notes.append(f"model {name} from " + ("the model name given" if model_name else
                                          "checkpoint metadata" if stored.get("name") else
                                          f"the tensors' shape ({_arch_words(shape)})"))
    try:
        cfg = ModelConfig(name=name, encoder_depth=depth, encoder_depth_source=src, **shape)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, notes


__all__ = ["describe_raev2", "is_raev2_state", "resolve_raev2_config"]
