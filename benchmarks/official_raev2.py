"""Compare igengine's RAEv2DiT with the official RAEv2 model (nanovisionx/RAEv2 ``DiTwDDTHeadIG``), same weights.

Not a test: it needs a checkout of the official repository and its dependencies (timm, einops; timm's
imports of torchvision and PIL are stubbed where they cannot load), which igengine does not use. Run:

    /work/venv-official/bin/python benchmarks/official_raev2.py --raev2-repo PATH/RAEv2

What it checks, printed as JSON and written to ``--out`` (default benchmarks/results/official_raev2.json):
  * layout: the released RAEv2-XL's official state dict (built on the meta device) against
    igengine's: key set, shapes, key count, parameter count;
  * flops: FlopCounterMode on the official RAEv2-XL (meta device) against ``igengine.bench.flops``;
  * forward: every official parameter drawn at random, the same state dict loaded into RAEv2DiT with
    ``strict=True``, both outputs compared at fp32 on RAEv2-B shapes and a tiny shape, for labels
    including the null class and times including 0 and 1 (bound 1e-5 max abs), with and without
    ``drop_mask``. The RoPE buffers igengine computes itself are compared with the official ones before
    the load. For information, the last inputs of each shape also run at the ``fp32`` (contiguous head
    tokens) and ``bf16`` precisions of ``apply_precision``.
The official model is imported and called unchanged; nothing of it is copied here.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.official_parity import max_abs, stub_import_if_broken  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from igengine.bench.flops import forward_flops  # noqa: E402
from igengine.config import ModelConfig, Precision  # noqa: E402
from igengine.models import RAEv2DiT, apply_precision, preset  # noqa: E402

BOUND = 1e-5

TINY = preset("RAEv2-B").replace(name="RAEv2-tiny", input_size=4, in_channels=8, hidden_size=48, depth=3, num_heads=2,
                                 decoder_hidden_size=64, head_depth=2, head_num_heads=4, encoder_depth=2,
                                 num_classes=10)
# Equal trunk and head widths: the official s_projector is then an Identity without parameters.
TINY_EQUAL_WIDTHS = TINY.replace(name="RAEv2-tiny-equal-widths", decoder_hidden_size=48, head_num_heads=2)


def import_official(repo: Path):
    """The official ``DiTwDDTHeadIG`` class, imported from ``repo/src``, and what was stubbed to import it."""
    stubs = {name: stub_import_if_broken(name) for name in ("torchvision", "PIL")}
    src = str(repo / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from stage2.models.DDT import DiTwDDTHeadIG  # type: ignore

    return DiTwDDTHeadIG, stubs


def official_model(cls, cfg: ModelConfig) -> torch.nn.Module:
    """The official module for ``cfg`` (label conditioning; cond_arch as in the released config)."""
    cond_arch = types.SimpleNamespace(num_t_tokens=cfg.time_tokens, num_c_tokens=cfg.class_tokens)
    return cls(
        input_size=cfg.input_size, in_channels=cfg.in_channels, patch_size=[cfg.patch_size, cfg.patch_size],
        hidden_size=[cfg.hidden_size, cfg.decoder_hidden_size], depth=[cfg.depth, cfg.head_depth],
        num_heads=[cfg.num_heads, cfg.head_num_heads], mlp_ratio=cfg.mlp_ratio, num_classes=cfg.num_classes,
        condition_type="label", cond_arch=cond_arch, base_model_depth=cfg.encoder_depth,
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: W from N(0, 1) (its own law), norm weights 1 + N(0, 0.05^2), matrices and
    tables N(0, 0.02^2), other vectors (biases, learnable tokens) N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".W"):
                p.copy_(noise)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.05 * noise)
            else:
                p.copy_((0.02 if p.ndim > 1 and not name.endswith("learnable_tokens") else 0.05) * noise)


def layout(cls) -> dict:
    """The released RAEv2-XL: official and igengine state dicts (meta device) have the same keys and shapes."""
    cfg = preset("RAEv2-XL")
    with torch.device("meta"):
        official, ours = official_model(cls, cfg), RAEv2DiT(cfg)
    a = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    return {
        "model": cfg.name,
        "official_keys": len(a), "igengine_keys": len(b),
        "official_parameters": sum(p.numel() for p in official.parameters()),
        "igengine_parameters": sum(p.numel() for p in ours.parameters()),
        "only_official": sorted(set(a) - set(b)), "only_igengine": sorted(set(b) - set(a)),
        "shape_mismatches": sorted(k for k in set(a) & set(b) if a[k] != b[k]),
    }


def flops(cls) -> dict:
    """FlopCounterMode on the official RAEv2-XL forward (meta device, 2 rows) against the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset("RAEv2-XL")
    with torch.device("meta"):
        # torch.normal(mean, std, size) ignores the device context: W and the learnable tokens come out on the CPU.
        official = official_model(cls, cfg).to("meta").eval()
        x, t, y = torch.randn(2, *cfg.latent_shape), torch.rand(2), torch.zeros(2, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        official(x, t, context=y)
    sit = forward_flops(preset("SiT-XL/2"))
    ours = forward_flops(cfg)
    return {"model": cfg.name, "official_flop_counter_per_image": counter.get_total_flops() // 2,
            "igengine_forward_flops_per_image": ours, "ratio_to_sit_xl2": round(ours / sit, 4)}


def inputs(cfg: ModelConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 rows: times 0, 1 and two random ones; labels 0, the null class, and two random ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, *cfg.latent_shape, generator=g)
    t = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(2, generator=g)])
    y = torch.cat([torch.tensor([0, cfg.null_class]), torch.randint(0, cfg.num_classes, (2,), generator=g)])
    return x, t, y


def forward_parity(repo: Path) -> dict:
    """Official vs igengine forward at fp32, same random weights, RAEv2-B and two tiny shapes: max abs per output."""
    cls, stubs = import_official(repo)
    rows = []
    for cfg in (preset("RAEv2-B"), TINY, TINY_EQUAL_WIDTHS):
        torch.manual_seed(0)
        official = official_model(cls, cfg).eval()
        ours = RAEv2DiT(cfg).eval()
        rope_equal = all(torch.equal(getattr(ours, n).freqs_cos, getattr(official, n).freqs_cos)
                         and torch.equal(getattr(ours, n).freqs_sin, getattr(official, n).freqs_sin)
                         for n in ("enc_rope", "dec_rope"))
        randomize_(official, seed=1)
        ours.load_state_dict(official.state_dict(), strict=True)
        for seed in (0, 1):
            x, t, y = inputs(cfg, seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                want = official(x, t, context=y)
                got = ours(x, t, y)
                # drop_mask: rows replaced by the null class inside the model, as the official null label.
                drop = torch.tensor([True, False, True, False])
                want_dropped = official(x, t, context=torch.where(drop, cfg.null_class, y))
                got_dropped = ours(x, t, y, drop_mask=drop)
            rows.append({
                "model": cfg.name, "seed": seed, "t": [round(v, 4) for v in t.tolist()], "y": y.tolist(),
                "rope_buffers_bit_equal": rope_equal,
                "x_full": max_abs(got[0], want[0]), "x_base": max_abs(got[1], want[1]),
                "x_full_drop_mask": max_abs(got_dropped[0], want_dropped[0]),
                "x_base_drop_mask": max_abs(got_dropped[1], want_dropped[1]),
                "x_full_std": round(float(want[0].std()), 4), "x_base_std": round(float(want[1].std()), 4),
                "outputs_differ": bool(not torch.allclose(want[0], want[1])),
                "seconds": round(time.perf_counter() - t0, 2),
            })
        # The other precisions against the official fp32 forward (informative, no bound here): ``fp32`` runs
        # the head's tokens contiguous (another summation order), ``bf16`` casts attention and MLP.
        for precision in (Precision.FP32, Precision.BF16):
            low = apply_precision(copy.deepcopy(ours), precision)
            with torch.no_grad():
                got = low(x, t, y)
            rows[-1][f"precision_{precision.value}"] = {"x_full": max_abs(got[0], want[0]),
                                                        "x_base": max_abs(got[1], want[1])}
    worst = max(max(r["x_full"], r["x_base"], r["x_full_drop_mask"], r["x_base_drop_mask"]) for r in rows)
    # The comparison can fail: the last model with one trunk weight of block 1 moved by 1e-4 differs in both outputs.
    with torch.no_grad():
        ours.blocks[0].attn.q.weight[0, 0] += 1e-4
        moved = ours(x, t, y)
    sensitivity = {"x_full": max_abs(moved[0], want[0]), "x_base": max_abs(moved[1], want[1])}
    return {"stubs": stubs, "bound": BOUND, "worst_max_abs": worst, "rows": rows,
            "one_weight_moved_by_1e-4": sensitivity,
            "ok": worst <= BOUND and min(sensitivity.values()) > 0
            and all(r["rope_buffers_bit_equal"] and r["outputs_differ"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raev2-repo", type=Path, required=True, help="checkout of nanovisionx/RAEv2")
    parser.add_argument("--raev2-commit", default="unknown", help="the checkout's commit, recorded in the report")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "official_raev2.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    report: dict = {"provenance": provenance(), "raev2_repo": str(args.raev2_repo),
                    "raev2_commit": args.raev2_commit, "torch": torch.__version__,
                    "threads": torch.get_num_threads()}
    report["forward"] = forward_parity(args.raev2_repo)
    cls, _ = import_official(args.raev2_repo)
    report["layout"] = layout(cls)
    report["flops"] = flops(cls)
    lay, fl = report["layout"], report["flops"]
    report["ok"] = bool(
        report["forward"]["ok"]
        and not (lay["only_official"] or lay["only_igengine"] or lay["shape_mismatches"])
        and lay["official_parameters"] == lay["igengine_parameters"]
        and fl["official_flop_counter_per_image"] == fl["igengine_forward_flops_per_image"]
    )
    report["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
