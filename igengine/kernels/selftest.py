"""A CUDA kernel build checks itself once per device before any run uses it.

The NVRTC build launches its kernels through the CUDA driver from Python (``nvrtc_library``): its
argument passing (structs by value, 64-bit seeds, device pointers) has no nvcc-generated launch
stub behind it. So before a run trusts it, ``check_against_reference`` runs two small launches on
the GPU and compares them with what the same maths gives elsewhere:
  * the noise contract's Gaussians (seed > 2^32, stream, scattered indices) against
    ``igengine.noise.gaussian`` on the CPU: bit for bit, as the contract requires;
  * one SiT SDE step with IG and CFG (noise drawn in the kernel, every scalar used) against the
    CPU twin (``libigengine_kernels_cpu``) on the same inputs, within 1e-5 of the state's scale
    (both are float32 maths without contraction, so they agree to a few ulps; argument passing that
    is wrong gives garbage, orders of magnitude off). Skipped, and said so, without a CPU twin.
A failure raises ``SelfTestError``; the loader then refuses the build with one warning and the run
takes the next build or the reference path.
"""

from __future__ import annotations

import torch

from igengine.kernels import abi
from igengine.noise import gaussian as reference_gaussian


class SelfTestError(RuntimeError):
    """A kernel build gave other numbers than the reference on its own GPU."""


SEED = (7 << 32) | 12345
INDICES = (3, 0, 1_000_003, 41)
STREAM = 5


def _sde_params() -> abi.StepParams:
    p = abi.StepParams()
    p.kind, p.family = abi.Kind.SDE, abi.FamilyCode.SIT
    p.ig, p.cfg, p.drift, p.dup_next = 1, 1, 1, 0
    p.step_index, p.noise_stream = 3, STREAM
    p.seed_lo, p.seed_hi = SEED & 0xFFFFFFFF, SEED >> 32
    p.ig_w, p.cfg_w = 1.4, 1.35
    p.score_ratio, p.score_var, p.drift_t = 0.8, 0.3, 0.6
    p.dt, p.sqrt_abs_dt, p.sqrt_diffusion = -0.004, 0.0632, 0.9
    return p


def check_against_reference(lib, device: int | torch.device, cpu_lib=None) -> list[str]:
    """Run the checks on ``device`` (a CUDA index, or any torch device for tests) with kernel library
    ``lib``; returns notes; SelfTestError on a mismatch."""
    from igengine.kernels.binding import fused_step, gaussian

    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    want = reference_gaussian(SEED, list(INDICES), STREAM, (3, 5, 7))
    got = gaussian(SEED, list(INDICES), STREAM, (3, 5, 7), device=dev, library=lib).cpu()
    if not torch.equal(got, want):
        bad = int((got != want).sum())
        raise SelfTestError(f"its noise differs from the noise contract in {bad} of {want.numel()} values")
    notes = ["noise: bit-equal to the contract"]
    if cpu_lib is None:
        return notes + ["fused step: not checked (no CPU twin to compare with)"]
    g = torch.Generator().manual_seed(0)
    n, e = 2, 72  # e not a multiple of 4: the scalar tail is launched too
    x = torch.randn(n, e, generator=g)
    v_final = torch.randn(2 * n, e, generator=g)
    v_inter = torch.randn(2 * n, e, generator=g)
    idx = torch.tensor(INDICES[:n], dtype=torch.int64)
    p = _sde_params()
    results = []
    for target, library in ((torch.device("cpu"), cpu_lib), (dev, lib)):
        out = torch.empty(n, e, device=target)
        fused_step(p, x.to(target), v_final.to(target), v_inter.to(target), indices=idx.to(target), x_out=out,
                   library=library)
        results.append(out.cpu())
    cpu, cuda = results
    err = float((cpu - cuda).abs().max())
    scale = float(cpu.abs().max())
    if not err <= 1e-5 * max(scale, 1.0):
        raise SelfTestError(f"its fused SDE step differs from the CPU twin's by {err:.3g} (state scale {scale:.3g})")
    return notes + [f"fused step: within {err:.2g} of the CPU twin"]


__all__ = ["SelfTestError", "check_against_reference"]
