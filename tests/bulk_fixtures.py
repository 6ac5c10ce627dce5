"""Tiny latent models and tiny VAEs, saved the way users get them, for the bulk-sampling tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from igengine.models.checkpoint import save_safetensors
from igengine.vae import LDMDecoder, LDMDecoderConfig
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run_torchrun(args: list[str], cwd: Path, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node P -m igengine ARGS``, one thread per worker, this checkout on the path.

    Each worker runs with OMP_NUM_THREADS=1: the CPU's intra-op thread count changes the order of float
    reductions, so a one-process run to compare bit for bit must use one thread as well."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "igengine", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


# LightningDiT-tiny samples 8x4x4 latents; this VA-VAE-shaped decoder makes 8x8 RGB images.
TINY_VAVAE = LDMDecoderConfig(embed_dim=8, z_channels=8, channels=(32, 64), num_res_blocks=1, attn_levels=(1,))


def tiny_vavae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Decoder tensors with LDM names, random, plus the training-only parts an official file holds."""
    torch.manual_seed(seed)
    net = LDMDecoder(TINY_VAVAE)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    state["quant_conv.weight"] = torch.randn(16, 16, 1, 1)
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    state["foundation_model.model.blocks.0.weight"] = torch.randn(4, 4)
    return state


def save_vavae(path: Path, lightning: bool = True, state: dict | None = None) -> Path:
    state = tiny_vavae_state() if state is None else state
    torch.save({"state_dict": state, "global_step": 7} if lightning else state, path)
    return path


def save_stats(path: Path, channels: int = 8, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    torch.save({"mean": 0.2 * torch.randn(1, channels, 1, 1, generator=g),
                "std": 0.5 + torch.rand(1, channels, 1, 1, generator=g)}, path)
    return path


def save_ldit(path: Path) -> Path:
    save_safetensors(tiny_model("lightningdit"), path)
    return path


def save_sit(path: Path) -> Path:
    save_safetensors(tiny_model("sit"), path)
    return path


def tiny_diffusers_vae(seed: int = 0):
    """A 4-latent-channel AutoencoderKL (f2: 8x8 latents -> 16x16 images) with random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=16)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()
