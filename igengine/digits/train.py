"""Train the embedded default model: a small pixel-space SiT+IG on scikit-learn's 8x8 digits.

    python -m igengine.digits.train --out igengine/assets/sit_digits.safetensors

Seeded and deterministic on the CPU (single-threaded by default so the result does not depend on
the core count); about 10 minutes on 2 cores. Objective, as in the official SiT+IG training
(SiT/loss.py, train.py): the linear path x_t = (1 - t) x0 + t eps, t ~ U(0, 1), velocity target
v = eps - x0, loss = mse(v_final) + 0.5 mse(v_inter), labels dropped to the null class with
probability 0.1 (for CFG), EMA of the weights (decay 0.999) is what gets saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from igengine.models.checkpoint import save_safetensors
from igengine.config import Family, ModelConfig
from igengine.digits.data import load_split
from igengine.models import IGDiT

DIGITS_CONFIG = ModelConfig(
    family=Family.SIT,
    name="SiT-digits",
    input_size=8,
    patch_size=2,
    in_channels=1,
    hidden_size=96,
    depth=6,
    num_heads=4,
    encoder_depth=2,
    num_classes=10,
    class_dropout_prob=0.1,
    pixel_space=True,
    encoder_depth_source="igengine.digits.train (trained with the IG head after block 2)",
    num_heads_source="igengine.digits.train",
)

# Sampler settings recommended with this model (stored in its metadata; the CLI's defaults for it).
# Chosen before any evaluation, as the paper's SiT settings with fewer steps for a CPU demo.
DIGITS_SAMPLER_DEFAULTS = {
    "solver": "sde",
    "steps": 50,
    "cfg_scale": 1.35,
    "cfg_interval": [0.0, 0.7],
    "ig_scale": 1.4,
    "ig_interval": [0.0, 1.0],
    "timestep_shift": 0.0,
}


def train(steps: int, batch_size: int, lr: float, seed: int, threads: int, log_every: int = 200) -> tuple[IGDiT, dict]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    data = load_split()
    x_all = torch.from_numpy(data["train_x"])
    y_all = torch.from_numpy(data["train_y"])
    model = IGDiT(DIGITS_CONFIG).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    history = []
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        t = torch.rand(batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        drop = torch.rand(batch_size, generator=g) < DIGITS_CONFIG.class_dropout_prob
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        target = eps - x0
        v_final, v_inter = model(x_t, t, y, drop_mask=drop)
        loss_final = (v_final - target).pow(2).mean()
        loss_inter = (v_inter - target).pow(2).mean()
        loss = loss_final + 0.5 * loss_inter
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        if (step + 1) % log_every == 0 or step == 0:
            row = {"step": step + 1, "loss_final": round(loss_final.item(), 4), "loss_inter": round(loss_inter.item(), 4),
                   "elapsed_s": round(time.time() - t0, 1)}
            history.append(row)
            print(json.dumps(row), flush=True)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
            "train_images": int(len(x_all)), "wall_s": round(time.time() - t0, 1), "last": history[-1]}
    return ema, info


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the embedded SiT+IG digits model")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "sit_digits.safetensors")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = reproducible everywhere)")
    args = parser.parse_args()
    ema, info = train(args.steps, args.batch_size, args.lr, args.seed, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(ema, args.out, sampler_defaults=DIGITS_SAMPLER_DEFAULTS,
                     extra={"igengine.training": json.dumps(info)})
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) after {info['wall_s']} s")


if __name__ == "__main__":
    main()
