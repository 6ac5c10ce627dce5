"""Decoding: DiT latents -> images (SD-VAE for SiT, VA-VAE f16d32 for LightningDiT, the RAE ViT decoder
for RAEv2) -> uint8 pixels.

  decoders  loading a VAE from local files, strictly, and decoding
  ldm       the LDM decoder architecture (written here)
  rae       the RAE ViT-MAE decoder architecture (written here)
  pixels    images in each family's range -> uint8 as each family's official script converts them

May import: igengine.config, errors, safeload. Never a DiT checkpoint, a sampler or a writer.
"""

from igengine.vae.decoders import (
    RAE_STATS_EPS,
    SD_LATENT_SCALE,
    LatentDecoder,
    VAEKind,
    load_latent_stats,
    load_rae_stats,
    load_vae,
    resolve_kind,
)
from igengine.errors import VAEError
from igengine.vae.ldm import SD_KL_F8, VAVAE_F16D32, LDMDecoder, LDMDecoderConfig
from igengine.vae.rae import ViTMAEDecoder, ViTMAEDecoderConfig

__all__ = ["LDMDecoder", "LDMDecoderConfig", "LatentDecoder", "RAE_STATS_EPS", "SD_KL_F8", "SD_LATENT_SCALE",
           "VAEError", "VAEKind", "VAVAE_F16D32", "ViTMAEDecoder", "ViTMAEDecoderConfig", "load_latent_stats",
           "load_rae_stats", "load_vae", "resolve_kind"]
