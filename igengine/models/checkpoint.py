"""IG DiT checkpoints: model-config resolution and loading (the files are read by ``igengine.safeload``).

RAEv2 state dicts (recognised by their own tensors) are resolved by ``igengine.models.raev2_checkpoint``;
what follows is about SiT and LightningDiT, whose tensors say less.

Formats: the official training dict or a bare state dict (``.pt`` / ``.pth``), or ``.safetensors``
with optional igengine metadata (``igengine.model_config`` JSON, and ``igengine.sampler_defaults``
for checkpoints that recommend their own sampler settings, validated by ``SamplerSettings``).

Config resolution, per field, in this order: explicit overrides (CLI flags) > the checkpoint's own
record (``args`` of SiT-style trainers, ``config`` of LightningDiT's train.py, igengine metadata) >
the named model preset > tensor shapes. Shapes are always checked against the result.

The family comes from the tensors first: LightningDiT's layers (SwiGLU ``mlp.w12``, RoPE
``feat_rope``, RMSNorm ``norm1.weight``, 4 x hidden no-shift adaLN) decide it, since SiT has none of
them. Without them the tensors fit SiT and an options-off LightningDiT alike; then an explicit
``model`` decides, else what the checkpoint states: a recorded model name, else its metadata, else
its container (an argparse Namespace under 'args' is what SiT-style trainers write, REPA-style ones
among them; a yaml dict under 'config' what LightningDiT's train.py writes). Either container is
found around either architecture, so the container is the weakest fact. A recorded name of the
other family than the tensors' is not used (a note says so); the record's other facts
(num_classes, encoder_depth, num_heads) still are, each checked against the tensors where it can be
(a num_classes that does not fit the label table is then not used).
When the family is known but no name of it is, the preset of the tensors' shape is used, if one
has it (a bare state dict without LightningDiT's layers still needs ``model``).
An explicit ``model`` must agree with the tensors: its family, patch size, width and depth (these
two may differ only with an explicit ``num_heads``); a contradiction is refused in one line naming
the tensor and the flag. A LightningDiT ``model`` on tensors without its layers is accepted only
where the checkpoint states LightningDiT too.
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
from igengine.models import build_model
from igengine.models.raev2_checkpoint import is_raev2_state, resolve_raev2_config
from igengine.models.registry import MODEL_NAMES, family_of, preset
from igengine.safeload import check_state_dict, file_sha256, read_checkpoint

META_CONFIG = "igengine.model_config"
META_SAMPLER = "igengine.sampler_defaults"


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # IGDiT (SiT, LightningDiT) or RAEv2DiT
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


_FAMILY_NAME = {Family.SIT: "SiT", Family.LIGHTNINGDIT: "LightningDiT"}
_LDIT_LAYER_NAMES = "SwiGLU, RoPE, RMSNorm, no-shift adaLN"
_LDIT_KINDS = {"swiglu", "rmsnorm", "no-shift"}


def _block_layers(state: dict[str, torch.Tensor], i: int, hidden: int) -> dict[str, tuple[str, str]]:
    """Block ``i``'s layers, {aspect: (kind, the tensor that shows it and what it is)}."""
    p = f"blocks.{i}."
    layers: dict[str, tuple[str, str]] = {}
    if p + "mlp.w12.weight" in state:
        layers["mlp"] = ("swiglu", f"{p}mlp.w12.weight is a SwiGLU MLP")
    elif p + "mlp.fc1.weight" in state:
        layers["mlp"] = ("gelu", f"{p}mlp.fc1.weight is a GELU MLP")
    if p + "norm1.weight" in state:
        layers["norm"] = ("rmsnorm", f"{p}norm1.weight is an RMSNorm weight")
    elif any(k.startswith(p) for k in state):
        layers["norm"] = ("layernorm", f"blocks.{i} has no norm1.weight, a LayerNorm without weights")
    ada = state.get(p + "adaLN_modulation.1.weight")
    if ada is not None and hidden and ada.shape[0] % hidden == 0:
        chunks = ada.shape[0] // hidden
        kind = {4: "no-shift", 6: "shift"}.get(chunks, f"{chunks} chunks")
        what = " (no shift)" if chunks == 4 else ""
        layers["adaLN"] = (kind, f"{p}adaLN_modulation.1.weight has {chunks} x hidden_size rows{what}")
    return layers


def _family_tag(kind: str) -> str:
    return "LightningDiT" if kind in _LDIT_KINDS else "SiT" if kind in ("gelu", "layernorm", "shift") else "neither"


def _tensor_layers(state: dict[str, torch.Tensor], facts: ShapeFacts, path: Path) -> tuple[list[str], list[str]]:
    """(LightningDiT's layers in the tensors, SiT's), each naming the tensor that shows it.

    SiT has none of LightningDiT's layers (SwiGLU, RoPE, RMSNorm, no-shift adaLN), so any one of them
    decides the family. Their absence does not: a LightningDiT built with those options off has
    SiT's layers. Blocks with different layers are refused: every block of a model has the same.
    """
    first = _block_layers(state, 0, facts.hidden_size)
    for i in range(1, facts.depth):
        for aspect, (kind, words) in _block_layers(state, i, facts.hidden_size).items():
            if aspect in first and first[aspect][0] != kind:
                raise CheckpointError(
                    f"{path}: its tensors contradict each other: {first[aspect][1]} ({_family_tag(first[aspect][0])}) "
                    f"but {words} ({_family_tag(kind)}); every block of a model has the same layers"
                )
    ldit = [words for kind, words in first.values() if kind in _LDIT_KINDS]
    sit = [words for kind, words in first.values() if kind not in _LDIT_KINDS]
    if facts.use_rope:
        ldit.append("feat_rope.freqs_cos is a RoPE table")
    else:
        sit.append("there is no RoPE table")
    return ldit, sit


def _family_or_none(name: str | None) -> Family | None:
    try:
        return family_of(name) if name else None
    except KeyError:
        return None


def _stored_family(stored: dict[str, Any]) -> Family | None:
    """The family of an igengine metadata config (its model name, else its ``family`` field)."""
    if family := _family_or_none(stored.get("name")):
        return family
    return Family(stored["family"]) if stored.get("family") in {f.value for f in Family} else None


def _checkpoint_claim(rec_name: str | None, record: dict[str, Any],
                      stored: dict[str, Any]) -> tuple[Family | None, str]:
    """The family the checkpoint itself states, and where: a recorded model name, else igengine metadata, else
    the container (an argparse Namespace under 'args' is what SiT-style trainers write, a yaml dict under
    'config' what LightningDiT's train.py writes). Weaker than the tensors' layers and than an explicit `model`."""
    source = record.get("source")
    if family := _family_or_none(rec_name):
        return family, f"its '{source}' records model {rec_name}"
    if family := _stored_family(stored):
        return family, f"its metadata records model {stored.get('name')}"
    if source == "args":
        return Family.SIT, "its training record is an argparse Namespace under 'args', as SiT-style trainers write"
    if source == "config":
        return Family.LIGHTNINGDIT, ("its training record is a yaml dict under 'config', "
                                     "as LightningDiT's train.py writes")
    return None, ""


def _decide_family(model_name: str | None, flag_family: Family | None, ldit: list[str], sit: list[str],
                   claim: tuple[Family | None, str], refuted: list[str], facts: ShapeFacts, path: Path,
                   recorded: str | None) -> tuple[Family | None, str | None]:
    """(family, a note where the tensors' layers do not show it or something the checkpoint states is not used),
    or a one-line refusal naming the tensors and the flag or record they contradict.

    LightningDiT's layers decide (SiT cannot have them). Without them the tensors fit SiT and an
    options-off LightningDiT alike: an explicit `model` decides, then what the checkpoint states
    (``claim``); a LightningDiT `model` needs the checkpoint to state LightningDiT too, and a record
    that states LightningDiT with layers the tensors lack (``refuted``) decides nothing alone.
    """
    claimed, stated = claim
    said = f" (it records model {recorded})" if recorded and recorded != model_name else ""
    if ldit:
        if flag_family == Family.SIT:
            also = f"; {stated}, but the tensors decide" if claimed == Family.SIT and not said else ""
            raise CheckpointError(
                f"`model` {model_name} is a SiT model but {path} is {_shape_name(Family.LIGHTNINGDIT, facts)}{said}: "
                f"its tensors have LightningDiT's layers, which SiT has not ({', '.join(ldit)}){also}; "
                "pass a LightningDiT `model`"
            )
        if claimed in (None, Family.LIGHTNINGDIT):
            return Family.LIGHTNINGDIT, None
        by = f"`model` {model_name} and its tensors" if model_name else "its tensors"
        return Family.LIGHTNINGDIT, (f"family LightningDiT from {by}, which have LightningDiT's layers "
                                     f"({', '.join(ldit)}); {stated}, which does not decide it")
    lacks = f"its tensors have none of LightningDiT's layers ({_LDIT_LAYER_NAMES}): {', '.join(sit)}"
    if flag_family == Family.LIGHTNINGDIT and claimed != Family.LIGHTNINGDIT:
        also = f"; {stated}" if claimed == Family.SIT and not said else ""
        raise CheckpointError(
            f"`model` {model_name} is a LightningDiT model but {path} is {_shape_name(Family.SIT, facts)}{said}: "
            f"{lacks}{also}; pass a SiT `model`" + (", or leave `model` out" if recorded else "")
        )
    if flag_family is None and claimed == Family.LIGHTNINGDIT and refuted:
        raise CheckpointError(
            f"{path}: {stated} and states {', '.join(f'{k}=True' for k in refuted)}, but {lacks}; pass a SiT `model` "
            "if the weights are SiT's, or a LightningDiT `model` to build it with those options off"
        )
    family = flag_family or claimed
    if family == Family.LIGHTNINGDIT:
        by = f"`model` {model_name}, as {stated} too" if model_name else f"as {stated}"
        return family, f"family LightningDiT from {by}: {lacks}, so the model is built with those options off"
    if family == Family.SIT and claimed == Family.LIGHTNINGDIT:
        return family, (f"family SiT from `model` {model_name}, which its tensors fit (none of LightningDiT's "
                        f"layers); {stated}, which does not decide it")
    return family, None


def _preset_of_shape(family: Family, facts: ShapeFacts) -> str | None:
    """The preset of ``family`` with the tensors' patch size, width and depth, if one has them (no two
    presets of a family share all three)."""
    for name in MODEL_NAMES:
        p = preset(name)
        shape = (p.patch_size, p.hidden_size, p.depth)
        if p.family == family and shape == (facts.patch_size, facts.hidden_size, facts.depth):
            return name
    return None


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
    ldit, sit = _tensor_layers(state, facts, path)

    stored = stored_config(meta, path)
    rec_name, rec_fields = _record_model_fields(record)
    source_of_record = {"args": "checkpoint args", "config": "checkpoint config"}.get(record.get("source"), "")
    flag_family = _preset_or_error(model_name, path).family if model_name else None

    claim = _checkpoint_claim(rec_name, record, stored)
    refuted = [k for k in ("use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")
               if rec_fields.get(k) and not getattr(facts, k)]
    family, family_note = _decide_family(model_name, flag_family, ldit, sit, claim, refuted, facts, path,
                                         rec_name or stored.get("name"))
    if family is None:
        raise CheckpointError(
            f"{path} records no model name: pass `model` (one of {', '.join(MODEL_NAMES)}) so that the family, "
            "num_heads and encoder_depth are known rather than guessed"
        )
    if family_note:
        notes.append(family_note)
    # What the checkpoint states of another family than the tensors' is not used: its model name and
    # metadata config. Its other facts (num_classes, encoder_depth, num_heads) are still taken below,
    # each checked against the tensors where it can be: num_classes against the label table,
    # encoder_depth against the block count, num_heads against the RoPE table (by check_state_dict).
    rec_overruled = claim[0] not in (None, family)
    if _stored_family(stored) not in (None, family):
        stored = {}
    rec_family = _family_or_none(rec_name)
    if model_name:
        name, name_src = model_name, "the model name given"
    elif rec_name and rec_family in (None, family):
        name, name_src = rec_name, source_of_record
    elif stored:
        name, name_src = stored.get("name"), "checkpoint metadata"
    else:
        name = _preset_of_shape(family, facts)
        fam = _FAMILY_NAME[family]
        shape = f"patch size {facts.patch_size}, hidden_size {facts.hidden_size}, depth {facts.depth}"
        why = f" ({', '.join(ldit)})" if ldit else ""
        if name is None:
            told = f", and {claim[1]}" if rec_overruled else ""
            raise CheckpointError(
                f"{path} is a {fam} model{why} of a shape no preset has ({shape}){told}: pass a {fam} `model`, "
                "with `num_heads` for a model of a custom size"
            )
        name_src = f"the tensors' shape ({shape}, {fam} layers)" if ldit else f"the tensors' shape ({shape})"

    if stored:
        base = ModelConfig.from_dict(stored)
        if model_name and model_name != base.name:
            base = _preset_or_error(model_name, path)
        notes.append(f"config from {name_src}")
    else:
        base = _preset_or_error(name, path)
        notes.append(f"model {name} from {name_src}")

    if model_name:
        _check_named_model(model_name, base, facts, path, rec_name or stored.get("name"), family,
                           "num_heads" in overrides)

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
    # A record whose family the tensors overrule gives it only where it fits the table.
    rec_classes = rec_fields.get("num_classes")
    if rec_overruled and rec_classes is not None and facts.label_rows - int(rec_classes) not in (0, 1):
        notes.append(f"num_classes {rec_classes} of the {source_of_record} does not fit the label table "
                     f"({facts.label_rows} rows): not used")
        del rec_fields["num_classes"]
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
                    f"encoder_depth {fields[key]} is the official default of {base.name}: the checkpoint records none"
                    + (" (SiT's train.py has no --encoder-depth flag)" if base.family == Family.SIT else "")
                    + "; pass `encoder_depth` if the model was trained otherwise"
                )
        fields[f"{key}_source"] = src

    if rec_overruled:
        taken = [f"{key} {fields[key]}" for key in ("num_classes", "encoder_depth", "num_heads")
                 if key in rec_fields and key not in overrides]
        if taken:
            fit = "they fit" if len(taken) > 1 else "it fits"
            hint = "; pass `encoder_depth` if the model was trained otherwise" if "encoder_depth" in rec_fields else ""
            unused = f"its model {rec_name} is not" if rec_name else "its container's family is not"
            notes.append(f"{', '.join(taken)} from the {source_of_record}, though {unused} used: "
                         f"{fit} the tensors{hint}")
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


def stored_config(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The model config recorded in a safetensors file's igengine metadata ({} without one)."""
    if META_CONFIG not in meta:
        return {}
    try:
        return json.loads(meta[META_CONFIG])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata {META_CONFIG} is not valid JSON") from None


def _preset_or_error(name: str, path: Path) -> ModelConfig:
    try:
        return preset(name)
    except KeyError:
        raise CheckpointError(f"unknown model {name!r} (for {path}); known models: {', '.join(MODEL_NAMES)}") from None


def _shape_name(family: Family, facts: ShapeFacts) -> str:
    """What the tensors are, in words: the preset of that shape when there is one."""
    shape = f"patch size {facts.patch_size}, hidden_size {facts.hidden_size}, depth {facts.depth}"
    name = _preset_of_shape(family, facts)
    return f"a {name} ({shape})" if name else f"a {_FAMILY_NAME[family]} model with {shape}"


def _check_named_model(model_name: str, base: ModelConfig, facts: ShapeFacts, path: Path, recorded: str | None,
                       family: Family, heads_given: bool) -> None:
    """An explicit `model` must agree with what the checkpoint is: its patch size and shapes (its family is
    checked by ``_decide_family``).

    A preset's num_heads (and time convention, solver, VAE) is only right for weights of that
    preset, so a contradiction is refused, naming what the checkpoint is. A trunk of another width
    or depth is accepted only with an explicit `num_heads` (the one fact shapes cannot give).
    """
    said = f" (it records model {recorded})" if recorded and recorded != model_name else ""
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
    if is_raev2_state(state):
        named = _preset_or_error(model_name, path) if model_name is not None else None
        cfg, notes = resolve_raev2_config(state, path, stored_config(meta, path), named=named, overrides=overrides)
    else:
        if model_name is not None and model_name in MODEL_NAMES and family_of(model_name) == Family.RAEV2:
            facts = shape_facts(state, path)
            ldit, _ = _tensor_layers(state, facts, path)
            raise CheckpointError(
                f"`model` {model_name} is a RAEv2 model but {path} is "
                f"{_shape_name(Family.LIGHTNINGDIT if ldit else Family.SIT, facts)} (no RAEv2 tensors such as "
                "s_embedder, ctx_embedder, base_final_layer): pass the SiT or LightningDiT `model` it is, or none"
            )
        cfg, notes = resolve_config(state, path, record, meta, model_name=model_name, overrides=overrides)
    model = build_model(cfg)
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
