"""End-to-end sampling on a GPU: precision modes and the fused step, on XL-sized models (random weights).

    PYTHONPATH=. python benchmarks/gpu_sampling_bench.py [--batch 16] [--steps 8] [--out DIR]

For SiT-XL/2 (SDE, CFG 1.35 on t <= 0.7, IG 1.4) and LightningDiT-XL/1 (heun2, shift 0.3, CFG 1.45
on t >= 0.19, IG 1.4), with every parameter random (scale 0.02, so no layer is the identity):
  * seconds per run (median of --repeats after one warm-up, CUDA-synchronised) for each runner:
    reference / fp32 / bf16 through the plain PlanRunner, and fp32 / bf16 through FusedPlanRunner when
    the kernel library is built;
  * the deviation of each mode's final latents from the GPU reference run (max abs and relative L2);
  * the GPU reference against the CPU reference on 2 samples, 3 steps (the official numerics do not
    depend on the device beyond floating-point reassociation; TF32 is off in reference mode).
Needs a CUDA GPU; exits 0 with a message otherwise. Writes gpu_sampling_<date>.json (with provenance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from igengine.backends import TorchBackend  # noqa: E402
from igengine.config import Precision, SamplerConfig  # noqa: E402
from igengine.models import IGDiT, preset  # noqa: E402
from igengine.sampling import paper_sampler  # noqa: E402
from igengine.jobs.backend import sampler_for  # noqa: E402
from igengine.sampling.plan import build_plan  # noqa: E402


def random_model(name: str, device: str, seed: int = 0) -> IGDiT:
    with torch.device(device):
        model = IGDiT(preset(name))
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname == "pos_embed":
                continue
            base = 1.0 if pname.endswith("norm.weight") else 0.0
            p.copy_(base + 0.02 * torch.randn(p.shape, generator=g, device=device))
    return model.eval()


def runner_for(model, sampler: SamplerConfig, precision: Precision, fused: bool, device: str):
    import copy

    m = copy.deepcopy(model)
    backend = TorchBackend(m, precision=precision, device=device)
    cfg = SamplerConfig(solver=sampler.solver, steps=sampler.steps, guidance=sampler.guidance,
                        timestep_shift=sampler.timestep_shift, precision=precision)
    if fused:
        r = sampler_for(backend, cfg)
        return r if r.path in ("cuda", "cpu-twin") else None
    return sampler_for(backend, cfg, kernels="off")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_family(name: str, batch: int, steps: int, repeats: int, device: str) -> dict:
    model = random_model(name, device)
    base = paper_sampler(model.config.family)
    sampler = SamplerConfig(solver=base.solver, steps=steps, guidance=base.guidance, timestep_shift=base.timestep_shift)
    idx = torch.arange(batch)
    labels = idx % 1000
    rows = []
    ref_out = None
    for precision, fused in ((Precision.REFERENCE, False), (Precision.FP32, False), (Precision.FP32, True),
                             (Precision.BF16, False), (Precision.BF16, True)):
        label = f"{precision.value}{' fused' if fused else ''}"
        try:
            r = runner_for(model, sampler, precision, fused, device)
            if r is None:
                rows.append({"mode": label, "skipped": "kernel library not built for this GPU"})
                continue
            sec, out = timed(lambda r=r: r(0, idx, labels), repeats, device)
            out = out.double()
            if ref_out is None:
                ref_out = out
            diff = out - ref_out
            rows.append({"mode": label, "seconds_per_run": round(sec, 4), "samples_per_s": round(batch / sec, 2),
                         "max_abs_vs_reference": float(diff.abs().max()),
                         "rel_l2_vs_reference": float(diff.norm() / ref_out.norm())})
            del r
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        except Exception as e:  # one failing mode must not hide the others
            rows.append({"mode": label, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps({"model": name, **rows[-1]}), flush=True)

    # Device independence of the reference numerics: 2 samples, 3 steps, CPU vs GPU.
    small = SamplerConfig(solver=base.solver, steps=3, guidance=base.guidance, timestep_shift=base.timestep_shift)
    cross = {}
    try:
        gpu = sampler_for(TorchBackend(model, device=device), small)(5, torch.arange(2), torch.tensor([1, 2]))
        cpu_model = model.to("cpu")
        cpu = sampler_for(TorchBackend(cpu_model, device="cpu"), small)(5, torch.arange(2), torch.tensor([1, 2]))
        cross = {"max_abs_gpu_vs_cpu_reference_3_steps": float((gpu.cpu().double() - cpu.double()).abs().max())}
    except Exception as e:
        cross = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps({"model": name, **cross}), flush=True)
    nfe = build_plan(model.config.family, sampler).nfe
    return {"model": name, "batch": batch, "steps": steps, "nfe_per_sample": nfe, "modes": rows, **cross}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["SiT-XL/2", "LightningDiT-XL/1"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (a dry run)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_sampling_bench: no CUDA GPU; nothing to measure")
        return 0
    torch.set_grad_enabled(False)
    report = {"provenance": provenance(), "results": []}
    for name in args.models:
        report["results"].append(bench_family(name, args.batch, args.steps, args.repeats, args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{'gpu' if args.device.startswith('cuda') else 'cpu'}_sampling_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
