"""IG DiT checkpoints: model-config resolution and loading (the files are read by ``igengine.safeload``).

Formats: the official training dict or a bare state dict (``.pt`` / ``.pth``), or ``.safetensors``
with optional igengine metadata (``igengine.model_config`` JSON, and ``igengine.sampler_defaults``
for checkpoints that recommend their own sampler settings, validated by ``SamplerSettings``).

Config resolution, per field, in this order: explicit overrides (CLI flags) > the checkpoint's own
record (``args`` of SiT's train.py, ``config`` of LightningDiT's train.py, igengine metadata) >
the named model preset > tensor shapes. Shapes are always checked against the result.
An explicit ``model`` must agree with the checkpoint: its family (the recorded one, else the
layers), patch size, width and depth (these two may differ only with an explicit ``num_heads``);
a contradiction is refused, naming what the checkpoint is.
``encoder_depth`` and ``num_heads`` cannot be read from shapes: they come from a flag, the
checkpoint or a named model (whose official default is stated in the notes), never from a guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from igengine.config import Family, ModelConfig, SamplerSettings
from igengine.errors import CheckpointError
from igengine.models.dit import IGDiT
from igengine.models.registry import MODEL_NAMES, family_of, preset
from igengine.safeload import check_state_dict, file_sha256, read_checkpoint

META_CONFIG = "igengine.model_config"
META_SAMPLER = "igengine.sampler_defaults"


@dataclass
class LoadedCheckpoint:
    model: IGDiT
    config: ModelConfig
    path: Path
    weights: str  # which entry the weights came from: 'ema', 'model', 'state_dict', 'safetensors'
    notes: list[str] = field(default_factory=list)
    sampler_defaults: dict[str, Any] | None = None
    _sha256: str | None = None

    @property
    def sampler_settings(self) -> SamplerSettings | None:
        """The checkpoint's recommended sampler settings (``igengine.sampler_defaults``), validated:
        an unknown key or a bad value is a ConfigError naming the file."""
        if self.sampler_defaults is None:
            return None
        return SamplerSettings.from_dict(self.sampler_defaults, f"{self.path} (metadata {META_SAMPLER})")

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256


# ----------------------------------------------------------------------------------------------
# Config resolution
# ----------------------------------------------------------------------------------------------


@dataclass
class ShapeFacts:
    """What the tensors alone say about the architecture."""

    hidden_size: int
    patch_size: int
    in_channels: int
    input_size: int
    depth: int
    label_rows: int
    out_channels: int
    decoder_hidden_size: int
    qk_norm: bool
    use_swiglu: bool
    use_rope: bool
    use_rmsnorm: bool
    wo_shift: bool
    mlp_hidden: int


def shape_facts(state: dict[str, torch.Tensor], path: Path) -> ShapeFacts:
    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
            "final_layer_xr.linear.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        hint = " (no IG head 'final_layer_xr': this is not an IG checkpoint)" if "final_layer_xr.linear.weight" in missing else ""
        raise CheckpointError(f"{path} is not an IG DiT state dict: missing {missing}{hint}")
    w = state["x_embedder.proj.weight"]
    hidden, in_ch, p, _ = w.shape
    tokens = state["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    lin = state["final_layer.linear.weight"]
    ada = state.get("blocks.0.adaLN_modulation.1.weight")
    swiglu = "blocks.0.mlp.w12.weight" in state
    mlp_hidden = (state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else
                  state["blocks.0.mlp.fc1.weight"].shape[0]) if depth else 0
    return ShapeFacts(
        hidden_size=hidden,
        patch_size=p,
        in_channels=in_ch,
        input_size=grid * p,
        depth=depth,
        label_rows=state["y_embedder.embedding_table.weight"].shape[0],
        out_channels=lin.shape[0] // (p * p),
        decoder_hidden_size=lin.shape[1],
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        use_swiglu=swiglu,
        use_rope="feat_rope.freqs_cos" in state,
        use_rmsnorm="blocks.0.norm1.weight" in state,
        wo_shift=ada is not None and ada.shape[0] == 4 * hidden,
        mlp_hidden=mlp_hidden,
    )


def _record_model_fields(record: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Model name and architecture fields written by the official training scripts."""
    if record.get("source") == "args":  # SiT/train.py argparse.Namespace
        fields = {}
        for key in ("encoder_depth", "num_classes", "qk_norm", "num_heads"):
            if record.get(key) is not None:
                fields[key] = record[key]
        return record.get("model"), fields
    if record.get("source") == "config":  # LightningDiT/train.py yaml dict
        m = record.get("model", {}) or {}
        fields = {}
        mapping = {"encoder_depth": "encoder_depth", "use_qknorm": "qk_norm", "use_swiglu": "use_swiglu",
                   "use_rope": "use_rope", "use_rmsnorm": "use_rmsnorm", "wo_shift": "wo_shift",
                   "learn_sigma": "learn_sigma", "in_chans": "in_channels"}
        for src, dst in mapping.items():
            if m.get(src) is not None:
                fields[dst] = m[src]
        nc = (record.get("data", {}) or {}).get("num_classes")
        if nc is not None:
            fields["num_classes"] = nc
        return m.get("model_type"), fields
    return None, {}


def resolve_config(
    state: dict[str, torch.Tensor],
    path: Path,
    record: dict[str, Any],
    meta: dict[str, str],
    model_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, list[str]]:
    """Resolve the ModelConfig of a checkpoint (see the module docstring for the order)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    notes: list[str] = []
    facts = shape_facts(state, path)

    stored: dict[str, Any] = {}
    if META_CONFIG in meta:
        try:
            stored = json.loads(meta[META_CONFIG])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: metadata {META_CONFIG} is not valid JSON") from None
    rec_name, rec_fields = _record_model_fields(record)
    source_of_record = {"args": "checkpoint args", "config": "checkpoint config"}.get(record.get("source"), "")

    name = model_name or rec_name or stored.get("name")
    if name is None:
        raise CheckpointError(
            f"{path} records no model name: pass `model` (one of {', '.join(MODEL_NAMES)}) so that the family, "
            "num_heads and encoder_depth are known rather than guessed"
        )
    name_src = "the model name given" if model_name else (source_of_record if rec_name else "checkpoint metadata")

    if stored:
        base = ModelConfig.from_dict(stored)
        if model_name and model_name != base.name:
            base = _preset_or_error(model_name, path)
        notes.append(f"config from {name_src}")
    else:
        base = _preset_or_error(name, path)
        notes.append(f"model {name} from {name_src}")

    if family_mismatch := _family_mismatch(base.family, facts):
        raise CheckpointError(f"{path} does not look like a {base.family.value} model: {family_mismatch}")
    if model_name:
        recorded = rec_name or stored.get("name")
        recorded_family = _family_of_record(rec_name, record, stored)
        _check_named_model(model_name, base, facts, path, recorded, recorded_family, "num_heads" in overrides)

    fields: dict[str, Any] = {}
    # Architecture that shapes determine.
    fields.update(
        hidden_size=facts.hidden_size,
        patch_size=facts.patch_size,
        in_channels=facts.in_channels,
        input_size=facts.input_size,
        depth=facts.depth,
        qk_norm=facts.qk_norm,
        use_swiglu=facts.use_swiglu,
        use_rope=facts.use_rope,
        use_rmsnorm=facts.use_rmsnorm,
        wo_shift=facts.wo_shift,
        learn_sigma=facts.out_channels == 2 * facts.in_channels,
    )
    if base.family == Family.SIT:
        fields["decoder_hidden_size"] = None if facts.decoder_hidden_size == facts.hidden_size else facts.decoder_hidden_size
    for arch_key in ("hidden_size", "patch_size", "depth"):
        if getattr(base, arch_key) != fields[arch_key] and not stored:
            notes.append(f"{arch_key} {fields[arch_key]} read from the tensors (preset {name} has {getattr(base, arch_key)})")

    # num_classes: the record, else the label table (one extra null row when CFG dropout was used).
    if "num_classes" in overrides:
        fields["num_classes"] = int(overrides["num_classes"])
    elif "num_classes" in rec_fields:
        fields["num_classes"] = int(rec_fields["num_classes"])
    elif stored:
        fields["num_classes"] = base.num_classes
    else:
        fields["num_classes"] = facts.label_rows - 1
        notes.append(f"num_classes {facts.label_rows - 1} from the label table ({facts.label_rows} rows incl. the null class)")
    extra_rows = facts.label_rows - fields["num_classes"]
    if extra_rows not in (0, 1):
        raise CheckpointError(
            f"{path}: label table has {facts.label_rows} rows, which does not fit num_classes {fields['num_classes']}"
        )
    # Only its sign matters at sampling time: > 0 means the table has the null (CFG) row.
    fields["class_dropout_prob"] = (base.class_dropout_prob or 0.1) if extra_rows else 0.0

    # num_heads and encoder_depth: never from shapes.
    for key in ("num_heads", "encoder_depth"):
        if key in overrides:
            fields[key] = int(overrides[key])
            src = f"--{key.replace('_', '-')}"
        elif key in rec_fields:
            fields[key] = int(rec_fields[key])
            src = source_of_record
        elif stored:
            fields[key] = getattr(base, key)
            src = getattr(base, f"{key}_source")
        else:
            fields[key] = getattr(base, key)
            src = f"official default for {base.name}"
            if key == "encoder_depth":
                notes.append(
                    f"encoder_depth {fields[key]} is the official default of {base.name}: the checkpoint records none "
                    f"(SiT's train.py has no --encoder-depth flag); pass `encoder_depth` if the model was trained otherwise"
                )
        fields[f"{key}_source"] = src

    for key in ("qk_norm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "learn_sigma", "in_channels"):
        if key in rec_fields and bool(rec_fields[key]) != bool(fields[key]) and key != "in_channels":
            notes.append(f"checkpoint record says {key}={rec_fields[key]} but the tensors say {fields[key]}; using the tensors")
    for key, value in overrides.items():
        if key not in ("num_heads", "encoder_depth", "num_classes"):
            fields[key] = value

    try:
        cfg = base.replace(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, notes


def _preset_or_error(name: str, path: Path) -> ModelConfig:
    try:
        return preset(name)
    except KeyError:
        raise CheckpointError(f"unknown model {name!r} (for {path}); known models: {', '.join(MODEL_NAMES)}") from None


_FAMILY_NAME = {Family.SIT: "SiT", Family.LIGHTNINGDIT: "LightningDiT"}


def _family_of_record(rec_name: str | None, record: dict[str, Any], stored: dict[str, Any]) -> Family | None:
    """The family the checkpoint itself records (its training record or igengine metadata), if any."""
    if record.get("source") == "config":  # written by LightningDiT's train.py
        return Family.LIGHTNINGDIT
    if record.get("source") == "args":  # written by SiT's train.py
        return Family.SIT
    for name in (rec_name, stored.get("name")):
        try:
            return family_of(name) if name else None
        except KeyError:
            pass
    fam = stored.get("family")
    return Family(fam) if fam in {f.value for f in Family} else None


def _shape_name(family: Family, facts: ShapeFacts) -> str:
    """What the tensors are, in words: the preset of that shape when there is one."""
    shape = f"patch size {facts.patch_size}, hidden_size {facts.hidden_size}, depth {facts.depth}"
    fam = _FAMILY_NAME[family]
    for name in MODEL_NAMES:
        if family_of(name) != family:
            continue
        p = preset(name)
        if (p.patch_size, p.hidden_size, p.depth) == (facts.patch_size, facts.hidden_size, facts.depth):
            return f"a {name} ({shape})"
    return f"a {fam} model with {shape}"


def _check_named_model(model_name: str, base: ModelConfig, facts: ShapeFacts, path: Path, recorded: str | None,
                       recorded_family: Family | None, heads_given: bool) -> None:
    """An explicit `model` must agree with what the checkpoint is: its family, patch size and shapes.

    A preset's num_heads (and time convention, solver, VAE) is only right for weights of that
    preset, so a contradiction is refused, naming what the checkpoint is. A trunk of another width
    or depth is accepted only with an explicit `num_heads` (the one fact shapes cannot give).
    """
    has_ldit_layers = facts.use_swiglu or facts.use_rope or facts.use_rmsnorm or facts.wo_shift
    family = recorded_family or (Family.LIGHTNINGDIT if has_ldit_layers else Family.SIT)
    said = f" (it records model {recorded})" if recorded and recorded != model_name else ""
    if base.family != family:
        why = ("it has none of LightningDiT's layers (SwiGLU, RoPE, RMSNorm, no-shift adaLN)"
               if family == Family.SIT and not recorded_family else f"it records the {_FAMILY_NAME[family]} family")
        raise CheckpointError(
            f"`model` {model_name} is a {_FAMILY_NAME[base.family]} model but {path} is {_shape_name(family, facts)}"
            f"{said}: {why}; pass a {_FAMILY_NAME[family]} `model`, or leave `model` out when the checkpoint records one"
        )
    if base.patch_size != facts.patch_size:
        raise CheckpointError(
            f"`model` {model_name} has patch size {base.patch_size} but {path} is {_shape_name(family, facts)}{said}; "
            "pass the `model` of that patch size"
        )
    if (base.hidden_size, base.depth) != (facts.hidden_size, facts.depth) and not heads_given:
        raise CheckpointError(
            f"`model` {model_name} has hidden_size {base.hidden_size} and depth {base.depth} but {path} is "
            f"{_shape_name(family, facts)}{said}; pass the matching `model`, or `num_heads` as well for a model of "
            "a custom size"
        )


def _family_mismatch(family: Family, facts: ShapeFacts) -> str:
    if family == Family.SIT and (facts.use_swiglu or facts.use_rope or facts.use_rmsnorm or facts.wo_shift):
        return "it has LightningDiT layers (SwiGLU / RoPE / RMSNorm / no-shift adaLN); pass a LightningDiT `model`"
    return ""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path,
    model_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load an IG DiT checkpoint safely and build its model (fp32, eval mode, CPU)."""
    path = Path(path)
    state, entry, record, meta = read_checkpoint(path)
    cfg, notes = resolve_config(state, path, record, meta, model_name=model_name, overrides=overrides)
    model = IGDiT(cfg)
    check_state_dict(model, state, f"{path} does not match {cfg.name}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.eval()
    sampler_defaults = json.loads(meta[META_SAMPLER]) if META_SAMPLER in meta else None
    if entry != "safetensors":
        notes.insert(0, f"weights from '{entry}'")
    return LoadedCheckpoint(model, cfg, path, entry, notes, sampler_defaults)


def save_safetensors(model: IGDiT, path: str | Path, sampler_defaults: dict | None = None,
                     extra: dict[str, str] | None = None) -> None:
    """Write a model as safetensors with its config (and optional sampler defaults) as metadata."""
    from safetensors.torch import save_file

    meta = {META_CONFIG: json.dumps(model.config.to_dict())}
    if sampler_defaults is not None:
        meta[META_SAMPLER] = json.dumps(sampler_defaults)
    meta.update(extra or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "check_state_dict",
    "family_of",
    "load_checkpoint",
    "read_checkpoint",
    "resolve_config",
    "save_safetensors",
]
