"""Latents of an IG DiT -> images in [-1, 1], for both families, from local files only.

SD-VAE (SiT, SiT/generate.py): ``vae.decode(z / 0.18215).sample`` with sd-vae-ft-ema / -mse.
    * a diffusers folder (config.json + weights): ``diffusers.AutoencoderKL.from_pretrained(...,
      local_files_only=True)``; diffusers is imported only then (optional dependency);
    * a single original-format (LDM) file, e.g. the released ``.ckpt`` / ``.safetensors``: decoded by
      igengine's own LDM decoder (``igengine.vae.ldm``, the same architecture), which needs no config
      file and no network access.
VA-VAE f16d32 (LightningDiT, inference.py + tokenizer/vavae.py): an LDM ``AutoencoderKL`` file, plain
    or Lightning-style ``{'state_dict': ...}``; ``decode(z * std / multiplier + mean)`` with ``mean`` and
    ``std`` ([1, 32, 1, 1]) from ``latents_stats.pt`` and ``multiplier`` 1.0 (the released config).

Strict loading: every ``decoder.*`` and ``post_quant_conv.*`` tensor the architecture needs must be
present with its exact shape and nothing else may stand under those names. The other parts of a
training checkpoint (encoder, ``quant_conv``, ``loss.*``, ``foundation_model.*``, ...) are dropped
explicitly and counted in ``describe()``, which goes into the manifest.
"""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path

import torch

from igengine.errors import CheckpointError, VAEError
from igengine.safeload import check_state_dict, file_sha256, read_checkpoint
from igengine.vae.ldm import DECODER_PREFIXES, SD_KL_F8, VAVAE_F16D32, LayoutError, LDMDecoder, infer_config

SD_LATENT_SCALE = 0.18215  # SiT/generate.py: samples / 0.18215 before vae.decode

# Why the non-decoder parts of a checkpoint are dropped (reported in the manifest).
DROP_REASONS = {
    "encoder": "encoder: only decoding is built",
    "quant_conv": "encoder side: only decoding is built",
    "loss": "training loss (LPIPS / discriminator)",
    "foundation_model": "training-only vision foundation model (VF loss)",
    "linear_proj": "training-only VF-loss projection",
    "model_ema": "training EMA copy",
}


class VAEKind(str, enum.Enum):
    """Which latent convention: ``sd`` (SiT, latents * 0.18215) or ``vavae`` (LightningDiT, mean/std)."""

    SD = "sd"
    VAVAE = "vavae"


class LatentDecoder:
    """Decodes a batch of DiT latents to images.

    ``decode``: (N, C, h, w) float32 latents as the DiT produces them -> (N, 3, H, W) float32 images in
    about [-1, 1], on the decoder's device. ``identity`` goes into the run key (it changes every
    pixel), ``describe`` into the manifest.
    """

    kind: VAEKind
    latent_channels: int
    upsample_factor: int

    def __init__(self, net: torch.nn.Module, kind: VAEKind, latent_channels: int, upsample_factor: int,
                 identity: dict, facts: dict):
        self.net = net.eval().requires_grad_(False)
        self.kind = kind
        self.latent_channels = latent_channels
        self.upsample_factor = upsample_factor
        self.identity = identity
        self.facts = facts
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "LatentDecoder":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latents -> the VAE's latent space (the family's de-normalisation)."""
        raise NotImplementedError

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (N, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.run(self.prepare(z.to(self.device, torch.float32))).float()

    def describe(self) -> dict:
        return {**self.identity, **self.facts, "device": str(self.device)}


class SDDecoder(LatentDecoder):
    """SD-VAE: ``decode(z / 0.18215)`` (SiT/generate.py)."""

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        return z / SD_LATENT_SCALE


class DiffusersSDDecoder(SDDecoder):
    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z).sample


class VAVAEDecoder(LatentDecoder):
    """VA-VAE: ``decode(z * std / multiplier + mean)`` (LightningDiT/inference.py)."""

    def __init__(self, *args, mean: torch.Tensor, std: torch.Tensor, multiplier: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.mean, self.std, self.multiplier = mean, std, float(multiplier)

    def to(self, device):
        super().to(device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std / self.multiplier + self.mean


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def split_decoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the decoder's tensors, {dropped top-level prefix: number of tensors})."""
    keep, dropped = {}, {}
    for k, v in state.items():
        if k.startswith(DECODER_PREFIXES):
            keep[k] = v
        else:
            top = k.split(".", 1)[0]
            dropped[top] = dropped.get(top, 0) + 1
    return keep, dropped


def build_ldm_decoder(path: Path) -> tuple[LDMDecoder, dict]:
    """Read an LDM-format VAE file and build its decoder strictly; returns (decoder, facts)."""
    try:
        state, entry, _, _ = read_checkpoint(path)
    except CheckpointError as e:
        raise VAEError(f"`vae`: {e}") from None
    decoder_state, dropped = split_decoder_state(state)
    try:
        cfg = infer_config(decoder_state)
    except LayoutError as e:
        raise VAEError(
            f"`vae` {path} is not an LDM AutoencoderKL checkpoint ({e}); igengine expects the decoder.* and "
            "post_quant_conv.* tensors of VA-VAE f16d32 or of an original-format SD-VAE file (a diffusers "
            "folder for SD-VAE also works)"
        ) from None
    net = LDMDecoder(cfg)
    try:
        check_state_dict(net, decoder_state, f"`vae` {path}: decoder of {cfg.to_dict()} does not load")
    except CheckpointError as e:
        raise VAEError(str(e)) from None
    net.load_state_dict({k: v.float() for k, v in decoder_state.items()}, strict=True)
    facts = {
        "loader": "igengine.vae.ldm",
        "weights_entry": entry,
        "architecture": cfg.to_dict(),
        "dropped_keys": {f"{p}.*": {"tensors": n, "why": DROP_REASONS.get(p, "not part of the decoder")}
                         for p, n in sorted(dropped.items())},
    }
    return net, facts


def _diffusers_weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def build_diffusers_decoder(folder: Path) -> tuple[torch.nn.Module, dict, int]:
    """Load a diffusers AutoencoderKL from a local folder; fails on missing or mis-shaped decoder tensors."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise VAEError(f"`vae` {folder} is a diffusers folder, but diffusers is not installed: "
                       "pip install diffusers (or igengine[vae])") from None
    try:
        model, info = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                    low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VAEError(f"`vae` {folder}: diffusers cannot load it as an AutoencoderKL: {first}") from None
    bad = [k for k in info.get("missing_keys", []) if k.startswith(("decoder.", "post_quant_conv."))]
    bad += [str(k) for k in info.get("mismatched_keys", [])]
    if bad or info.get("error_msgs"):
        shown = ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
        raise VAEError(f"`vae` {folder}: {len(bad)} decoder tensors are missing or mis-shaped: {shown}")
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    facts = {
        "loader": "diffusers.AutoencoderKL.from_pretrained",
        "diffusers_config": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "missing_non_decoder_keys": len(info.get("missing_keys", [])),
        "unexpected_keys": len(info.get("unexpected_keys", [])),
    }
    return model, facts, factor


def folder_sha256(folder: Path) -> str:
    """One digest over config.json and the weight files of a diffusers folder."""
    h = hashlib.sha256()
    for p in [folder / "config.json", *_diffusers_weights(folder)]:
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def load_latent_stats(path: Path, channels: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mean, std, sha256) from ``latents_stats.pt``: ``{'mean', 'std'}``, each float [1, channels, 1, 1]."""
    path = Path(path)
    try:
        obj, _, _, _ = read_checkpoint(path)  # safe: weights_only for .pt, or safetensors
    except CheckpointError as e:
        raise VAEError(f"`latent_stats`: {e}") from None
    if not isinstance(obj, dict) or not {"mean", "std"} <= set(obj):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise VAEError(f"`latent_stats` {path} must hold {{'mean', 'std'}} (LightningDiT's latents_stats.pt), found {keys}")
    want = (1, channels, 1, 1)
    out = []
    for name in ("mean", "std"):
        t = obj[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise VAEError(f"`latent_stats` {path}: '{name}' has shape {got}, expected {want} for a model with "
                           f"{channels} latent channels")
        out.append(t.float().clone())
    if not bool(torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all() and (out[1] > 0).all()):
        raise VAEError(f"`latent_stats` {path}: 'mean' must be finite and 'std' finite and > 0")
    return out[0], out[1], file_sha256(path)


def resolve_kind(kind: str, family_kind: VAEKind) -> VAEKind:
    if kind == "auto":
        return family_kind
    try:
        return VAEKind(kind)
    except ValueError:
        raise VAEError(f"unknown `vae_kind` {kind!r}; choose auto, sd or vavae") from None


def load_vae(path: Path, kind: VAEKind, latent_channels: int, latent_stats: Path | None = None,
             latent_multiplier: float = 1.0) -> LatentDecoder:
    """Build the decoder for ``kind`` from ``path`` and check it fits a model with ``latent_channels``."""
    path = Path(path)
    if not path.exists():
        raise VAEError(f"`vae` {path} not found (a VAE file, or a diffusers folder for SD-VAE)")
    if kind == VAEKind.SD and latent_stats is not None:
        raise VAEError("`latent_stats` applies to VA-VAE (`vae_kind` vavae) only; SD-VAE latents use the fixed 0.18215")
    if kind == VAEKind.VAVAE and latent_stats is None:
        raise VAEError("VA-VAE decoding needs the latent statistics the model was trained with: pass `latent_stats` "
                       "PATH/latents_stats.pt")
    if not (latent_multiplier > 0 and latent_multiplier < float("inf")):
        raise VAEError(f"`latent_multiplier` must be a finite number > 0, got {latent_multiplier}")

    if path.is_dir():
        if kind != VAEKind.SD:
            raise VAEError(f"`vae` {path} is a folder; VA-VAE is a single checkpoint file (e.g. vavae-imagenet256-f16d32-dinov2.pt)")
        if not (path / "config.json").is_file():
            raise VAEError(f"`vae` {path} is a folder without config.json: not a diffusers AutoencoderKL folder")
        net, facts, factor = build_diffusers_decoder(path)
        channels = int(net.config.latent_channels)
        identity = {"kind": kind.value, "sha256": folder_sha256(path)}
    else:
        net, facts = build_ldm_decoder(path)
        channels, factor = net.config.embed_dim, net.config.upsample_factor
        reference = VAVAE_F16D32 if kind == VAEKind.VAVAE else SD_KL_F8
        facts["matches_official_architecture"] = net.config == reference
        identity = {"kind": kind.value, "sha256": file_sha256(path)}

    facts["path"] = str(path)
    if channels != latent_channels:
        raise VAEError(f"`vae` {path} decodes {channels}-channel latents but the model samples {latent_channels} "
                       f"channels: pass the VAE the model was trained with")
    if kind == VAEKind.SD:
        identity["latent_scale"] = SD_LATENT_SCALE
        cls = DiffusersSDDecoder if path.is_dir() else SDDecoder
        return cls(net, kind, channels, factor, identity, facts)
    mean, std, stats_sha = load_latent_stats(latent_stats, channels)
    identity.update(latent_stats_sha256=stats_sha, latent_multiplier=latent_multiplier,
                    normalisation="x * std / multiplier + mean")
    facts["latent_stats"] = str(latent_stats)
    return VAVAEDecoder(net, kind, channels, factor, identity, facts, mean=mean, std=std, multiplier=latent_multiplier)
