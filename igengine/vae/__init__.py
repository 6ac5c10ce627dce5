"""VAE decoding of DiT latents (SD-VAE for SiT, VA-VAE f16d32 for LightningDiT). See ``decoders``."""

from igengine.vae.decoders import (
    SD_LATENT_SCALE,
    LatentDecoder,
    VAEError,
    VAEKind,
    load_latent_stats,
    load_vae,
    resolve_kind,
)
from igengine.vae.ldm import SD_KL_F8, VAVAE_F16D32, LDMDecoder, LDMDecoderConfig

__all__ = ["LDMDecoder", "LDMDecoderConfig", "LatentDecoder", "SD_KL_F8", "SD_LATENT_SCALE", "VAEError", "VAEKind",
           "VAVAE_F16D32", "load_latent_stats", "load_vae", "resolve_kind"]
