"""A CUDA kernel build checks itself against the CPU twin on its own GPU before any run uses it.

Both CUDA builds are checked: the CMake library (its probe only proves that its kernels load) and
the NVRTC build (launched through the driver from Python: its argument passing has no
nvcc-generated launch stub behind it). ``check_against_reference`` runs a few small launches on the
GPU, each compared with what the same maths gives elsewhere:
  * noise: the contract's Gaussians (seed > 2^32, a stream, scattered indices, 105 elements per
    sample, so the last Philox block is partial) against ``igengine.noise.gaussian``: bit for bit;
  * by-value steps: a SiT SDE step with IG, CFG, in-kernel noise, the duplicated next network
    input and the non-finite flags, and a RAEv2 Euler step (IG on both halves, the unconditional
    one with its own scale, CFG on the x-predictions, the division by t_safe), with float32,
    bfloat16 and float16 network outputs, at 72 elements per row (the vectorised kernels) and 75
    (the scalar kernels, whose last 4-element block is partial: the tail), against the CPU twin
    (``libigengine_kernels_cpu``) on the same inputs;
  * indexed launches: a table of five launches (SDE without CFG, the Heun predictor and corrector
    with CFG, a RAEv2 Euler step with CFG, the deterministic last SDE step), run one by one with
    ``fused_step_indexed`` in the vectorised float32 and the scalar bfloat16 configuration: state,
    slope, next input and flags against the twin, the launch counter advanced once per launch and
    the fault word clear;
  * capture (CUDA devices): the same launches replayed from CUDA graphs, one per network row
    count, each graph reading its launch's outputs at the device-side counter as the captured loop
    (``igengine.sampling.captured``) does: the same checks after the replays.
Both sides are float32 maths without contraction, so they agree to a few ulps; the bound is
``1e-5 max(1, |twin|)`` elementwise, ten times the kernels' contract (docs/CONTRACTS.md,
"Tolerances"), while a wrong scalar, pointer, row or dtype is orders of magnitude off. Without a
CPU twin only the noise is checked, and the notes say so.

A failure raises ``SelfTestError``. ``igengine.kernels.trusted`` runs this once per device and
build and refuses a failing build (one warning; the next build or the reference path is used).
May import (within igengine.kernels): abi, binding (and, through it, library).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from igengine.kernels import abi
from igengine.kernels.abi import KernelError
from igengine.kernels.binding import fused_step, fused_step_indexed, gaussian, pack_table
from igengine.noise import gaussian as reference_gaussian


class SelfTestError(RuntimeError):
    """A kernel build gave other numbers than the reference on its own GPU."""


SEED = (7 << 32) | 12345
INDICES = (3, 0, 1_000_003, 41)
STREAM = 5
NOISE_SHAPE = (3, 5, 7)  # 105 elements: the last Philox block of a sample is partial
ROW_LENGTHS = (72, 75)  # a multiple of 4 (vectorised kernels) and not (scalar kernels, partial last block)
RTOL = 1e-5
V_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _params(kind: abi.Kind, *, cfg: bool, ig: bool = True, dup_next: bool = False, step: int = 3,
            dt: float = -0.004, family: abi.FamilyCode = abi.FamilyCode.SIT) -> abi.StepParams:
    """Scalars of the family (SiT, or RAEv2 for its Euler step) with every field of the kind set to a
    distinct, plausible value (RAEv2: an unconditional IG weight other than the conditional one)."""
    p = abi.StepParams()
    sde = kind in (abi.Kind.SDE, abi.Kind.SDE_LAST)
    p.kind, p.family = kind, family
    p.ig, p.cfg, p.drift, p.dup_next = int(ig), int(cfg), int(sde), int(dup_next)
    p.step_index, p.noise_stream = step, (STREAM + step if kind == abi.Kind.SDE else 0)
    p.seed_lo, p.seed_hi = SEED & 0xFFFFFFFF, SEED >> 32
    p.ig_w, p.cfg_w = 1.4, 1.35
    p.ig_w_uncond = 2.1 if family == abi.FamilyCode.RAEV2 else p.ig_w
    p.score_ratio, p.score_var, p.drift_t = 0.8, 0.3, 0.6
    p.dt, p.sqrt_abs_dt = dt, abs(dt) ** 0.5
    p.sqrt_diffusion = 0.9 if kind == abi.Kind.SDE else 0.0
    p.t_safe = 0.3 if family == abi.FamilyCode.RAEV2 else 0.0
    return p


def _raev2_params(*, cfg: bool = True, dup_next: bool = False, step: int = 3, dt: float = -0.004) -> abi.StepParams:
    return _params(abi.Kind.EULER, cfg=cfg, dup_next=dup_next, step=step, dt=dt, family=abi.FamilyCode.RAEV2)


# The indexed table: (params, network rows as a multiple of N).
def _table_launches() -> list[tuple[abi.StepParams, int]]:
    return [
        (_params(abi.Kind.SDE, cfg=False, dup_next=True, step=0), 1),
        (_params(abi.Kind.HEUN_PREDICT, cfg=True, dup_next=True, step=1, dt=-0.25), 2),
        (_params(abi.Kind.HEUN_CORRECT, cfg=True, dup_next=True, step=1, dt=-0.25), 2),
        (_raev2_params(dup_next=True, step=2, dt=-0.0625), 2),
        (_params(abi.Kind.SDE_LAST, cfg=True, step=3, dt=-0.04), 2),
    ]


@dataclass
class _State:
    """The buffers an indexed run updates (on one device)."""

    x: torch.Tensor
    k1: torch.Tensor
    net: torch.Tensor
    first_bad: torch.Tensor
    counter: torch.Tensor
    fault: torch.Tensor

    def copy_to(self, device) -> "_State":
        return _State(*(t.to(device, copy=True) for t in (self.x, self.k1, self.net, self.first_bad, self.counter,
                                                           self.fault)))

    def outputs(self) -> dict[str, torch.Tensor]:
        return {"x": self.x.cpu(), "k1": self.k1.cpu(), "net_out": self.net.cpu(), "first_bad": self.first_bad.cpu()}


def check_against_reference(lib, device: int | torch.device, cpu_lib=None) -> list[str]:
    """Run the checks on ``device`` (a CUDA index, or any torch device for tests) with kernel library
    ``lib``; returns one note per check; SelfTestError on a mismatch."""
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    want = reference_gaussian(SEED, list(INDICES), STREAM, NOISE_SHAPE)
    got = gaussian(SEED, list(INDICES), STREAM, NOISE_SHAPE, device=dev, library=lib).cpu()
    if not torch.equal(got, want):
        bad = int((got != want).sum())
        raise SelfTestError(f"its noise differs from the noise contract in {bad} of {want.numel()} values")
    notes = ["noise: bit-equal to the contract"]
    if cpu_lib is None:
        return notes + ["fused steps: not checked (no CPU twin to compare with)"]
    worst = 0.0
    for dtype in V_DTYPES:
        for e in ROW_LENGTHS:
            worst = max(worst, _check_by_value(lib, dev, cpu_lib, dtype, e))
    notes.append(f"by-value steps (SiT SDE and RAEv2 Euler, f32/bf16/f16 outputs, {ROW_LENGTHS[0]} and "
                 f"{ROW_LENGTHS[1]} elements): within {worst:.2g} of the CPU twin")
    worst = max(_check_indexed(lib, dev, cpu_lib, dtype, e, capture=False)
                for dtype, e in ((torch.float32, 72), (torch.bfloat16, 75)))
    launches = len(_table_launches())
    notes.append(f"indexed launches ({launches}, counter and fault word): within {worst:.2g} of the CPU twin")
    if dev.type == "cuda":
        worst = max(_check_indexed(lib, dev, cpu_lib, dtype, e, capture=True)
                    for dtype, e in ((torch.float32, 72), (torch.bfloat16, 75)))
        notes.append(f"captured launches (CUDA graphs per row count): within {worst:.2g} of the CPU twin")
    return notes


def _compare(what: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest |got - want| over the outputs; SelfTestError beyond ``RTOL max(1, |want|)`` elementwise."""
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        if w.dtype == torch.int64:
            if not torch.equal(g, w):
                raise SelfTestError(f"{what}: {name} is {g.tolist()}, the CPU twin's {w.tolist()}")
            continue
        d = (g - w).abs()
        if not bool(torch.isfinite(g).all()) or bool((d > RTOL * w.abs().clamp(min=1.0)).any()):
            err = float(d.max()) if bool(torch.isfinite(d).all()) else float("nan")
            raise SelfTestError(f"{what} differs from the CPU twin's: {name} by {err:.3g} "
                                f"(bound {RTOL:g} max(1, |twin|) elementwise, twin up to {float(w.abs().max()):.3g})")
        worst = max(worst, float(d.max()))
    return worst


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_by_value(lib, dev: torch.device, cpu_lib, dtype: torch.dtype, e: int) -> float:
    """On both libraries: one SiT SDE step with IG, CFG, noise, the duplicated next input and the
    flags; one RAEv2 Euler step with IG (its own unconditional weight), CFG and the next input."""
    g = torch.Generator().manual_seed(e)
    n = 2
    x = torch.randn(n, e, generator=g)
    v_final = torch.randn(2 * n, e, generator=g).to(dtype)
    v_inter = torch.randn(2 * n, e, generator=g).to(dtype)
    idx = torch.tensor(INDICES[:n], dtype=torch.int64)
    path = "vectorised" if e % 4 == 0 else "scalar, with a partial last block"
    worst = 0.0
    steps = (("SDE", _params(abi.Kind.SDE, cfg=True, dup_next=True)), ("RAEv2 Euler", _raev2_params(dup_next=True)))
    for what, p in steps:
        results = []
        for target, library in ((torch.device("cpu"), cpu_lib), (dev, lib)):
            out = torch.empty(n, e, device=target)
            net = torch.empty(2 * n, e, device=target)
            first_bad = torch.full((n,), -1, dtype=torch.int64, device=target)
            fused_step(p, x.to(target), v_final.to(target), v_inter.to(target), indices=idx.to(target), x_out=out,
                       net_out=net, first_bad=first_bad, library=library)
            results.append({"x": out.cpu(), "net_out": net.cpu(), "first_bad": first_bad.cpu()})
        want, got = results
        worst = max(worst, _compare(f"its fused {what} step ({_dtype_name(dtype)} outputs, {e} elements: {path})",
                                    got, want))
    return worst


def _indexed_inputs(dtype: torch.dtype, e: int, n: int = 2):
    """Initial state, and per launch its (v_final, v_inter) of its own row count."""
    g = torch.Generator().manual_seed(100 + e)
    launches = _table_launches()
    x = torch.randn(n, e, generator=g)
    v = [(torch.randn(m * n, e, generator=g).to(dtype), torch.randn(m * n, e, generator=g).to(dtype))
         for _, m in launches]
    state = _State(x=x, k1=torch.zeros(n, e), net=torch.zeros(2 * n, e),
                   first_bad=torch.full((n,), -1, dtype=torch.int64), counter=torch.zeros(1, dtype=torch.int64),
                   fault=torch.zeros(2, dtype=torch.int64))
    return launches, v, state


def _check_indexed(lib, dev: torch.device, cpu_lib, dtype: torch.dtype, e: int, capture: bool) -> float:
    """The table's launches on the CPU twin (one by one) and on ``lib`` (one by one, or from CUDA graphs)."""
    launches, v, state0 = _indexed_inputs(dtype, e)
    idx = torch.tensor(INDICES[:2], dtype=torch.int64)
    params = [p for p, _ in launches]
    results = []
    for target, library in ((torch.device("cpu"), cpu_lib), (dev, lib)):
        s = state0.copy_to(target)
        table, ix = pack_table(params, target), idx.to(target)
        how = "captured" if capture and library is not cpu_lib else "indexed"
        try:
            if how == "captured":
                _replay_captured(library, table, s, ix, [m for _, m in launches], v, target)
            else:
                for vf, vi in v:
                    fused_step_indexed(table, s.counter, s.x, vf.to(target), vi.to(target), ix, s.k1, s.x, s.net,
                                       s.first_bad, fault=s.fault, library=library)
        except KernelError as exc:
            if library is cpu_lib:
                raise
            raise SelfTestError(f"its {how} launches were refused: {exc}") from None
        counter, fault = int(s.counter.cpu()[0]), s.fault.cpu().tolist()
        if counter != len(params) or fault != [0, 0]:
            side = "the CPU twin" if library is cpu_lib else "it"
            raise SelfTestError(f"its {how} launches: after {len(params)} launches {side} left the counter at {counter} "
                                f"and the fault word at {fault} (expected {len(params)} and [0, 0])")
        results.append(s.outputs())
    want, got = results
    how = "captured" if capture else "indexed"
    return _compare(f"its {how} launches ({_dtype_name(dtype)} outputs, {e} elements)", got, want)


def _replay_captured(lib, table: torch.Tensor, s: _State, idx: torch.Tensor, rows: list[int], v, dev: torch.device):
    """One CUDA graph per row count m: copy launch ``counter``'s outputs into static buffers, then the
    indexed step; replayed in the table's order (the structure of ``igengine.sampling.captured``)."""
    n = s.x.shape[0]
    counts = sorted(set(rows))
    # Per row count: every launch's outputs stacked (launches of another count hold zeros, never read).
    src = {m: [torch.stack([pair[k] if r == m else torch.zeros_like(v[rows.index(m)][k]) for pair, r in zip(v, rows)])
               .to(dev) for k in (0, 1)] for m in counts}
    static = {m: (torch.empty_like(src[m][0][0]), torch.empty_like(src[m][1][0])) for m in counts}

    def launch(m: int) -> None:
        vf, vi = static[m]
        torch.index_select(src[m][0], 0, s.counter, out=vf.unsqueeze(0))
        torch.index_select(src[m][1], 0, s.counter, out=vi.unsqueeze(0))
        fused_step_indexed(table, s.counter, s.x, vf, vi, idx, s.k1, s.x, s.net, s.first_bad, fault=s.fault,
                           library=lib)

    with torch.cuda.device(dev):
        # Warm up outside the capture on a side stream (one real launch per row count), then restore.
        saved = [t.clone() for t in (s.x, s.k1, s.net, s.first_bad, s.fault)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for m in counts:
                s.counter.fill_(rows.index(m))
                launch(m)
        torch.cuda.current_stream().wait_stream(side)
        for t, keep in zip((s.x, s.k1, s.net, s.first_bad, s.fault), saved):
            t.copy_(keep)
        graphs = {}
        pool = torch.cuda.graph_pool_handle()
        for m in counts:
            graphs[m] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[m], pool=pool):
                launch(m)
        s.counter.zero_()
        for m in rows:
            graphs[m].replay()
        torch.cuda.synchronize(dev)


__all__ = ["SelfTestError", "check_against_reference"]
