"""Safe reading of tensor files: nothing is unpickled that could run code.

Formats
  * ``.pt`` / ``.pth`` / ``.ckpt``: a bare state dict, or a training dict ``{'model', 'ema', 'opt',
    'args' (argparse.Namespace) | 'config' (dict), 'steps', ...}`` or ``{'state_dict': ...}``; ``'ema'``
    is preferred over ``'model'``. Loaded with ``torch.load(weights_only=True)`` and
    ``argparse.Namespace`` as the only extra safe global: a pickle that would construct anything else
    is refused.
  * ``.safetensors``: tensors plus string metadata.

Used by the DiT checkpoint loader (``igengine.models.checkpoint``) and the VAE loaders
(``igengine.vae``); knows nothing about either.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from igengine.errors import CheckpointError


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def _read_torch(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(2)
    if not _is_zip(path) and head[:1] != b"\x80":  # neither torch.save's zip nor a pickle stream
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (neither zip nor pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # not a refusal by the safe unpickler: a damaged file
            raise CheckpointError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0]}") from None
        culprit = _unsafe_global(str(e))
        raise CheckpointError(
            f"refusing to load {path}: unpickling it would construct {culprit}, which could run code; "
            "only tensors, plain containers and argparse.Namespace are accepted (convert it to safetensors "
            "or re-save its state dict)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _unsafe_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return m.group(1)
    return "objects through pickle instructions the safe loader does not allow"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], dict[str, str]]:
    """(state dict, weights entry, training record as a dict, safetensors metadata)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e.strerror}") from None

    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        return state, "safetensors", {}, meta

    obj = _read_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a training checkpoint")
    record: dict[str, Any] = {}
    if isinstance(obj.get("args"), argparse.Namespace):
        record = {"source": "args", **vars(obj["args"])}
    elif isinstance(obj.get("config"), dict):
        record = {"source": "config", **obj["config"]}
    for entry in ("ema", "model", "state_dict"):
        if isinstance(obj.get(entry), dict):
            return _strip_prefixes(obj[entry]), entry, record, {}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefixes(obj), "state_dict", record, {}
    raise CheckpointError(
        f"{path} has no 'ema', 'model' or 'state_dict' entry and is not a bare state dict "
        f"(top-level keys: {sorted(map(str, obj))[:8]})"
    )


def _strip_prefixes(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label} keys: {shown}")
        raise CheckpointError(f"{what}: " + "; ".join(parts))



__all__ = ["check_state_dict", "file_sha256", "read_checkpoint"]
