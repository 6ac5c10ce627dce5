"""Decoding: DiT latents -> images (SD-VAE for SiT, VA-VAE f16d32 for LightningDiT) -> uint8 pixels.

  decoders  loading a VAE from local files, strictly, and decoding
  ldm       the LDM decoder architecture (written here)
  pixels    images in [-1, 1] -> uint8 as each family's official script converts them

May import: igengine.config, errors, safeload. Never a DiT checkpoint, a sampler or a writer.
"""

from igengine.vae.decoders import (
    SD_LATENT_SCALE,
    LatentDecoder,
    VAEKind,
    load_latent_stats,
    load_vae,
    resolve_kind,
)
from igengine.errors import VAEError
from igengine.vae.ldm import SD_KL_F8, VAVAE_F16D32, LDMDecoder, LDMDecoderConfig

__all__ = ["LDMDecoder", "LDMDecoderConfig", "LatentDecoder", "SD_KL_F8", "SD_LATENT_SCALE", "VAEError", "VAEKind",
           "VAVAE_F16D32", "load_latent_stats", "load_vae", "resolve_kind"]
