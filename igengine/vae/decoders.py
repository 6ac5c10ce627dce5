"""Latents of an IG DiT -> images, for the three families, from local files only.

SD-VAE (SiT, SiT/generate.py): ``vae.decode(z / 0.18215).sample`` with sd-vae-ft-ema / -mse.
    * a diffusers folder (config.json + weights): ``diffusers.AutoencoderKL.from_pretrained(...,
      local_files_only=True)``; diffusers is imported only then (optional dependency);
    * a single original-format (LDM) file, e.g. the released ``.ckpt`` / ``.safetensors``: decoded by
      igengine's own LDM decoder (``igengine.vae.ldm``, the same architecture), which needs no config
      file and no network access.
VA-VAE f16d32 (LightningDiT, inference.py + tokenizer/vavae.py): an LDM ``AutoencoderKL`` file, plain
    or Lightning-style ``{'state_dict': ...}``; ``decode(z * std / multiplier + mean)`` with ``mean`` and
    ``std`` ([1, 32, 1, 1]) from ``latents_stats.pt`` and ``multiplier`` 1.0 (the released config).
RAE (RAEv2, src/stage1/rae.py ``RAE.decode``): the ViT decoder of ``igengine.vae.rae`` on
    ``z * sqrt(var + 1e-5) + mean``, ``mean`` and ``var`` ([1024, 16, 16]) from ``stats.pt``, the weights a
    plain state dict ``decoder.pt``; its images are in about [0, 1] (the others': about [-1, 1]), which
    ``igengine.vae.pixels`` converts by the family's rule.

Strict loading: every ``decoder.*`` and ``post_quant_conv.*`` tensor the architecture needs must be
present with its exact shape and nothing else may stand under those names. The other parts of a
training checkpoint (encoder, ``quant_conv``, ``loss.*``, ``foundation_model.*``, ...) are dropped
explicitly and counted in ``describe()``, which goes into the manifest. A RAE decoder.pt must hold
exactly the decoder's ``state_dict()`` keys.
"""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path

import torch

from igengine.errors import CheckpointError, VAEError
from igengine.safeload import check_state_dict, file_sha256, read_checkpoint
from igengine.vae.rae import LayoutError as RAELayoutError
from igengine.vae.rae import ViTMAEDecoder, infer_config as infer_rae_config, official_names, sincos_pos_embed
from igengine.vae.ldm import DECODER_PREFIXES, SD_KL_F8, VAVAE_F16D32, LayoutError, LDMDecoder, infer_config

SD_LATENT_SCALE = 0.18215  # SiT/generate.py: samples / 0.18215 before vae.decode
RAE_STATS_EPS = 1e-5  # RAEv2 src/stage1/rae.py: RAE(eps=1e-5), not overridden by the released configs

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
    """Which latent convention: ``sd`` (SiT, latents * 0.18215), ``vavae`` (LightningDiT, mean/std) or
    ``rae`` (RAEv2: DINOv3 tokens normalised by a per-position mean/var, decoded by a ViT)."""

    SD = "sd"
    VAVAE = "vavae"
    RAE = "rae"


class LatentDecoder:
    """Decodes a batch of DiT latents to images.

    ``decode``: (N, C, h, w) float32 latents as the DiT produces them -> (N, 3, H, W) float32 images in
    about ``image_range`` ([-1, 1] for SD-VAE and VA-VAE, [0, 1] for RAE), on the decoder's device,
    not clamped: ``igengine.vae.pixels`` turns them into uint8 by the family's rule. ``identity`` goes
    into the run key (it changes every pixel), ``describe`` into the manifest.
    """

    image_range: tuple[float, float] = (-1.0, 1.0)
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


class RAEDecoder(LatentDecoder):
    """RAE: the ViT decoder on ``z * sqrt(var + 1e-5) + mean`` (RAEv2 src/stage1/rae.py ``RAE.decode``).

    ``mean`` and ``var`` are [C, h, w] (one value per channel and token position); images in about [0, 1].
    """

    image_range = (0.0, 1.0)

    def __init__(self, *args, mean: torch.Tensor, var: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.mean, self.var = mean, var

    def to(self, device):
        super().to(device)
        self.mean, self.var = self.mean.to(self.device), self.var.to(self.device)
        return self

    def prepare(self, z: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N, C, h, w)
        return z * torch.sqrt(self.var + RAE_STATS_EPS) + self.mean


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


def build_rae_decoder(path: Path) -> tuple[ViTMAEDecoder, dict]:
    """Read a RAE ``decoder.pt`` (the decoder's plain state dict) and build the decoder strictly; (decoder, facts).

    The released file is ``GeneralDecoder.state_dict()`` (RAEv2 scripts/stage1/extract_decoder.py, fp32
    or cast to fp16 / bf16): every parameter, the CLS token and the fixed ``decoder_pos_embed`` included.
    The official loader uses ``strict=False`` and only prints missing keys; here a file missing any
    tensor is refused (a missing CLS token or layer would decode with its initial values).
    """
    try:
        state, entry, _, _ = read_checkpoint(path)
    except CheckpointError as e:
        raise VAEError(f"`vae`: {e}") from None
    try:
        cfg = infer_rae_config(state)
    except RAELayoutError as e:
        raise VAEError(
            f"`vae` {path} is not a RAE decoder state dict ({e}); igengine expects the decoder.pt of RAEv2 "
            "(GeneralDecoder.state_dict(), as scripts/stage1/extract_decoder.py writes it)"
        ) from None
    net = ViTMAEDecoder(cfg)
    try:
        check_state_dict(net, state, f"`vae` {path}: RAE decoder of {cfg.to_dict()} does not load")
    except CheckpointError as e:
        raise VAEError(f"{e}; pass the complete decoder.pt") from None
    odd = sorted(k for k, v in state.items() if not v.is_floating_point())
    if odd:
        raise VAEError(f"`vae` {path}: {len(odd)} decoder tensors are not floating point ({', '.join(odd[:4])}): "
                       "not a RAE decoder's weights")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    sincos = sincos_pos_embed(cfg.width, cfg.grid)[None]
    facts = {
        "loader": "igengine.vae.rae",
        "weights_entry": entry,
        "weights_dtype": dtypes,
        "architecture": cfg.to_dict(),
        "official_configs": official_names(cfg),
        "parameters": sum(p.numel() for p in net.parameters()),
        "pos_embed_max_abs_from_sincos": float((net.decoder_pos_embed - sincos).abs().max()),
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


def _rae_stats_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise VAEError(f"`latent_stats` {path} not found: RAE decoding needs the stats.pt ({{'mean', 'var'}}) of the "
                       "decoder the model was trained with")
    return path


def load_rae_stats(path: Path, channels: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mean, var, sha256) from RAEv2's ``stats.pt``: ``{'mean', 'var'}``, each float [channels, grid, grid].

    Exactly that shape: it is what the official statistics script (scripts/stage1/compute_encoder_stats.py)
    writes, one value per channel and token position. ``RAE.decode`` would also broadcast other shapes
    ([C, 1, 1], a scalar, [1, C, h, w]), but no released file has them, and accepting them would let the
    [1, C, 1, 1] ``latents_stats.pt`` of another family's VAE pass. Both entries are required: the
    official code would silently use mean 0 / var 1 for a missing one.
    """
    path = _rae_stats_file(path)
    try:
        obj, _, _, _ = read_checkpoint(path)  # safe: weights_only for .pt, or safetensors
    except CheckpointError as e:
        raise VAEError(f"`latent_stats`: {e}") from None
    missing = [k for k in ("mean", "var") if k not in obj]
    if missing:
        raise VAEError(f"`latent_stats` {path} must hold {{'mean', 'var'}} (RAEv2's stats.pt) but has no "
                       f"{' or '.join(repr(k) for k in missing)} (found {sorted(map(str, obj))})")
    want = (channels, grid, grid)
    out = []
    for name in ("mean", "var"):
        t = obj[name]
        if tuple(t.shape) != want or not t.is_floating_point():
            raise VAEError(f"`latent_stats` {path}: '{name}' is {str(t.dtype).removeprefix('torch.')} "
                           f"{list(t.shape)}, expected float {list(want)} for {channels}-channel latents on a "
                           f"{grid}x{grid} grid: pass the stats.pt of the model's decoder")
        out.append(t.float().clone())
    mean, var = out
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
        raise VAEError(f"`latent_stats` {path}: 'mean' must be finite and 'var' finite and >= 0")
    return mean, var, file_sha256(path)


def resolve_kind(kind: str, family_kind: VAEKind) -> VAEKind:
    if kind == "auto":
        return family_kind
    try:
        return VAEKind(kind)
    except ValueError:
        raise VAEError(f"unknown `vae_kind` {kind!r}; choose auto, {', '.join(k.value for k in VAEKind)}") from None


def load_vae(path: Path, kind: VAEKind, latent_channels: int, latent_stats: Path | None = None,
             latent_multiplier: float = 1.0, latent_size: int | None = None) -> LatentDecoder:
    """Build the decoder for ``kind`` from ``path`` and check it fits a model with ``latent_channels``.

    ``latent_size``: the side of the model's latent grid (``ModelConfig.input_size``), if known. The RAE
    decoder is built for one grid (its ``decoder_pos_embed``) and is refused for another; the
    convolutional VAEs decode any size.
    """
    path = Path(path)
    if not path.exists():
        raise VAEError(f"`vae` {path} not found (a VAE file, a diffusers folder for SD-VAE, or RAEv2's decoder.pt)")
    if kind == VAEKind.RAE:
        return load_rae(path, latent_channels, latent_stats, latent_multiplier, latent_size)
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


def load_rae(path: Path, latent_channels: int, latent_stats: Path | None, latent_multiplier: float = 1.0,
             latent_size: int | None = None) -> RAEDecoder:
    """RAEv2's decoder: ``path`` its decoder.pt, ``latent_stats`` its stats.pt (see ``load_vae``)."""
    if latent_stats is None:
        raise VAEError("RAE decoding needs the latent statistics the model was trained with: pass `latent_stats` "
                       "PATH/stats.pt (beside RAEv2's decoder.pt)")
    if latent_multiplier != 1.0:
        raise VAEError(f"`latent_multiplier` applies to VA-VAE only; RAE latents are de-normalised by stats.pt alone "
                       f"(got {latent_multiplier}): drop it")
    if path.is_dir():
        raise VAEError(f"`vae` {path} is a folder; the RAE decoder is a single file (RAEv2's decoder.pt)")
    latent_stats = _rae_stats_file(latent_stats)  # before reading a decoder of 1.7 GB
    net, facts = build_rae_decoder(path)
    cfg = net.config
    facts["path"] = str(path)
    if cfg.latent_channels != latent_channels:
        raise VAEError(f"`vae` {path} is a decoder of another width: it decodes {cfg.latent_channels}-channel latents "
                       f"(decoder_embed) but the model samples {latent_channels} channels: pass the decoder.pt the "
                       "model was trained with")
    if latent_size is not None and cfg.grid != latent_size:
        raise VAEError(f"`vae` {path} decodes a {cfg.grid}x{cfg.grid} latent grid but the model samples "
                       f"{latent_size}x{latent_size}: pass the decoder.pt of the model's resolution")
    mean, var, stats_sha = load_rae_stats(latent_stats, cfg.latent_channels, cfg.grid)
    identity = {"kind": VAEKind.RAE.value, "sha256": file_sha256(path), "latent_stats_sha256": stats_sha,
                "normalisation": f"z * sqrt(var + {RAE_STATS_EPS:g}) + mean"}
    facts.update(latent_stats=str(latent_stats), image_range=list(RAEDecoder.image_range))
    return RAEDecoder(net, VAEKind.RAE, cfg.latent_channels, cfg.patch_size, identity, facts, mean=mean, var=var)
