"""Compare igengine's RAE decoder with the official RAEv2 decode path: same decoder.pt, same stats.pt, same latents.

Not a test: it needs the official source (nanovisionx/RAEv2) and transformers, which igengine does
not use. Run:

    /work/venv-official/bin/python benchmarks/official_raev2_decoder.py --raev2-repo /tmp/raev2

The official side is built and called unchanged: ``stage1.rae._load_decoder`` (AutoConfig from
configs/decoder/<name>/config.json, ``GeneralDecoder``, and its loading of decoder.pt),
``_load_normalization_stats`` (stats.pt) and ``RAE.decode`` (de-normalisation, reshape to tokens,
``decoder(z, drop_cls_token=False).logits``, ``unpatchify``), then src/eval/generation.py's pixel
conversion. ``RAE.__init__`` is not run: it builds the DINOv3 encoder, which decoding does not use;
the attributes ``decode`` reads are set instead (``encoders`` is replaced by an import stub, as are
``stage1``'s other modules, which need timm / PIL / diffusers).

What it checks, at the ViTB size and at a tiny size, with every parameter drawn at random (the CLS
token and the position table too):
  * the official module's state dict loads strictly into igengine's (same names and shapes);
  * decoded images at fp32: max abs difference (bound 1e-5), and the uint8 pixels (mismatches);
  * igengine's sin-cos table against the official initial ``decoder_pos_embed`` (bound 1e-6);
  * the ViTXL decoder (the released model's): parameters and FLOPs per image, counted on the official
    module (meta device, torch's FlopCounterMode) against igengine's analytic counts.
Prints the report as JSON (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from igengine.config import Family  # noqa: E402
from igengine.vae import VAEKind, load_vae  # noqa: E402
from igengine.vae import rae as rae_arch  # noqa: E402
from igengine.vae.pixels import to_uint8  # noqa: E402

BOUND_FP32 = 1e-5
LATENT_CHANNELS, GRID, PATCH = 1024, 16, 16  # DINOv3-L latents of a 256 px image, decoder patch 16
TINY = {"decoder_hidden_size": 64, "decoder_num_hidden_layers": 2, "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 128}
SINCOS_BOUND = 1e-6  # float64 tables rounded once to float32 by numpy there, by torch here


def import_official(repo: Path):
    """The official ``stage1.rae`` module, without running ``stage1/__init__`` or importing the encoders."""
    src = repo / "src"
    sys.path.insert(0, str(src))
    for name in ("stage1", "encoders"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(src / name)]
        sys.modules[name] = pkg
    encoder = types.ModuleType("encoders.vision_encoder")
    encoder.create_encoder = None  # RAE.__init__ (which calls it) is not run
    sys.modules["encoders.vision_encoder"] = encoder
    import stage1.rae as official_rae  # type: ignore

    return official_rae


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter at random; norms around 1, decoder_pred spreading the images over about [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("weight") else 0.0))
            elif name == "decoder_pred.bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + 0.5)
            elif name == "decoder_pred.weight":  # images about 0.5 +- 0.3 (unit-variance normed input)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def decoder_config_dir(repo: Path, name: str, tmp: Path) -> Path:
    """configs/decoder/ViTB, or a copy of it with the TINY decoder sizes."""
    folder = repo / "configs" / "decoder" / "ViTB"
    if name == "ViTB":
        return folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(TINY)
    out = tmp / name
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def official_decode(official_rae, decoder, stats_path: Path, z: torch.Tensor) -> torch.Tensor:
    """``RAE.decode`` as released, on an RAE object holding only what decoding reads."""
    model = official_rae.RAE.__new__(official_rae.RAE)
    torch.nn.Module.__init__(model)
    model.decoder = decoder.eval()
    stats = official_rae._load_normalization_stats(str(stats_path))
    model.latent_mean, model.latent_var, model.do_normalization = stats
    model.eps = 1e-5  # RAE.__init__'s default, not overridden by the released configs
    return model.decode(z)


def official_pixels(images: torch.Tensor):
    """src/eval/generation.py: rae.decode(samples).clamp(0, 1), then mul(255), NHWC, uint8."""
    return images.clamp(0, 1).mul(255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def compare(repo: Path, official_rae, name: str, tmp: Path, batch: int, seed: int) -> dict:
    config_dir = decoder_config_dir(repo, name, tmp)
    num_patches = GRID * GRID
    source = official_rae._load_decoder(str(config_dir), LATENT_CHANNELS, PATCH, num_patches)
    sincos = rae_arch.sincos_pos_embed(source.decoder_pos_embed.shape[-1], GRID)[None]
    sincos_diff = float((sincos - source.decoder_pos_embed).abs().max())
    randomize_(source, seed)
    decoder_pt = tmp / f"{name}_decoder.pt"
    torch.save(source.state_dict(), decoder_pt)
    g = torch.Generator().manual_seed(seed + 1)
    stats_pt = tmp / f"{name}_stats.pt"
    torch.save({"mean": 0.5 * torch.randn(LATENT_CHANNELS, GRID, GRID, generator=g),
                "var": 0.2 + 2 * torch.rand(LATENT_CHANNELS, GRID, GRID, generator=g)}, stats_pt)
    z = torch.randn(batch, LATENT_CHANNELS, GRID, GRID, generator=g)

    official = official_rae._load_decoder(str(config_dir), LATENT_CHANNELS, PATCH, num_patches, str(decoder_pt))
    t0 = time.perf_counter()
    ref = official_decode(official_rae, official, stats_pt, z.clone())
    t_official = time.perf_counter() - t0

    ours = load_vae(decoder_pt, VAEKind.RAE, LATENT_CHANNELS, stats_pt, latent_size=GRID)
    t0 = time.perf_counter()
    got = ours.decode(z.clone())
    t_ours = time.perf_counter() - t0

    diff = (got.double() - ref.double()).abs()
    px_ref, px_got = official_pixels(ref), to_uint8(got, Family.RAEV2)
    mismatched = px_ref != px_got
    return {
        "decoder": name,
        "architecture": ours.describe()["architecture"],
        "official_configs": ours.describe()["official_configs"],
        "batch": batch,
        "images_shape": list(got.shape),
        "images_range": [round(float(ref.min()), 4), round(float(ref.max()), 4)],
        "share_clamped": round(float(((ref < 0) | (ref > 1)).double().mean()), 4),
        "max_abs_fp32": float(diff.max()),
        "mean_abs_fp32": float(diff.mean()),
        "bound_fp32": BOUND_FP32,
        "pixels": int(px_ref.size),
        "pixels_mismatched": int(mismatched.sum()),
        "pixels_max_abs_diff": int((px_ref.astype(int) - px_got.astype(int)).__abs__().max()),
        "sincos_vs_official_init_max_abs": sincos_diff,
        "seconds_official": round(t_official, 2),
        "seconds_igengine": round(t_ours, 2),
    }


def count_vitxl(repo: Path, official_rae) -> dict:
    """Parameters and FLOPs of the released model's decoder (ViTXL), on the official module, against ours."""
    with torch.device("meta"):
        official = official_rae._load_decoder(str(repo / "configs" / "decoder" / "ViTXL"), LATENT_CHANNELS, PATCH,
                                              GRID * GRID)
        z = torch.empty(1, GRID * GRID, LATENT_CHANNELS)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            official(z, drop_cls_token=False)
    ours = rae_arch.infer_config(official.state_dict())
    return {
        "architecture": ours.to_dict(),
        "official_configs": rae_arch.official_names(ours),
        "parameters_official_module": sum(p.numel() for p in official.parameters()),
        "parameters_igengine": ours.parameter_count(),
        "gflop_per_image_official_module": counter.get_total_flops() / 1e9,
        "gflop_per_image_igengine": ours.flops_per_image() / 1e9,
    }


def decoder_parity(repo: Path, batch: int = 3) -> dict:
    """The report: ViTB and tiny comparisons, ViTXL counts, and the failures (checks over their bound)."""
    torch.set_grad_enabled(False)
    # igengine's loader takes the heads from the official width table; the tiny width is added to it here.
    rae_arch.HEADS_BY_WIDTH.setdefault(TINY["decoder_hidden_size"], TINY["decoder_num_attention_heads"])
    official_rae = import_official(Path(repo))
    import transformers

    report: dict = {"provenance": provenance(), "raev2_repo": str(repo), "transformers": transformers.__version__,
                    "python_executable": sys.executable}
    with tempfile.TemporaryDirectory() as tmp:
        report["comparisons"] = [compare(Path(repo), official_rae, name, Path(tmp), batch, seed)
                                 for seed, name in enumerate(("tiny", "ViTB"))]
    report["vitxl"] = count_vitxl(Path(repo), official_rae)
    report["failures"] = [c["decoder"] for c in report["comparisons"]
                          if c["max_abs_fp32"] > BOUND_FP32 or c["sincos_vs_official_init_max_abs"] > SINCOS_BOUND]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raev2-repo", type=Path, required=True, help="checkout of nanovisionx/RAEv2")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args()
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # the official loaders print; stdout carries the JSON only
        report = decoder_parity(args.raev2_repo, args.batch)
    report["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
