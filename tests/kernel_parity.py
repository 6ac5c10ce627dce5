"""Parity harness: one fused launch (or Heun pair) against the reference step of the sampling loop.

The reference is not re-implemented here: ``sampling.loop.reference_step`` / ``guided_field`` run
unchanged on a ``ReplayBackend`` that returns prepared network outputs and records the rows it was fed. The
tests (tests/test_kernels.py on the CPU twin, tests/test_kernels_gpu.py on CUDA) and the
benchmarks drive both sides through this module.

The backend contract says outputs are float32; a case with bf16/fp16 outputs therefore feeds the
kernel the raw low-precision tensors and the reference their exact float32 upcast.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igengine.config import Family, GuidanceConfig, ModelConfig, Precision, SamplerConfig, Solver
from igengine.kernels.binding import fused_step, fused_step_indexed, pack_table
from igengine.kernels.library import KernelLibrary, library_filename, load_library, CPU_STEM
from igengine.models.registry import preset
from igengine.noise import sde_stream
from igengine.sampling.launches import Phase, step_params
from igengine.sampling.loop import ModelFacts, guided_field, reference_step
from igengine.sampling.plan import SDE_T_END, Evaluation, Step, StepKind, build_plan
from igengine.sampling.randomness import NUMPY

ROOT = Path(__file__).resolve().parents[1]
TWIN_BUILD = ROOT / "build" / "kernels-test-cpu"

IG_SCALE = 1.4
CFG_SCALE = 1.5
RAEV2_IG_SCALE_UNCOND = 1.9  # RAEv2's unconditional rows extrapolate with their own scale (the others use IG_SCALE)
# docs/CONTRACTS.md, tolerances, kernels: |fused - reference| <= KERNEL_RTOL * max(1, |reference|) elementwise.
KERNEL_RTOL = 1e-6


class ReplayBackend:
    """A Backend that returns prepared (v_final, v_inter) pairs in order and records its inputs."""

    name = "replay"
    max_batch = None

    def __init__(self, config: ModelConfig, outputs: list[tuple[torch.Tensor, torch.Tensor]], device="cpu"):
        self.config = config
        self.device = torch.device(device)
        self.outputs = list(outputs)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, y):
        if not self.outputs:
            raise RuntimeError("ReplayBackend: more network calls than prepared outputs")
        self.inputs.append((x.clone(), t.clone(), y.clone()))
        vf, vi = self.outputs.pop(0)
        return vf.float(), vi.float()

    def describe(self) -> dict:
        return {"backend": self.name}


@dataclass(frozen=True)
class Case:
    """One parity case.

    kind: 'sde', 'sde-last', 'euler' or 'heun'. ig / cfg: guidance active at the (first)
    evaluation; cfg2: CFG at the Heun corrector's evaluation; dup_next: the launch writes the next
    network input twice. shape: (C, H, W) of one sample (H == W). vdtype: network output dtype.
    """

    family: Family
    kind: str
    ig: bool
    cfg: bool
    dup_next: bool
    vdtype: torch.dtype = torch.float32
    n: int = 2
    shape: tuple[int, int, int] = (3, 5, 5)
    cfg2: bool = False
    seed: int = 20240917
    step_index: int = 3
    x_offset: int = 0  # > 0: x lives at this element offset of a larger buffer (misaligned rows)
    t: float | None = None  # RAEv2 cases: the step's time (None: drawn at random from the case's id)
    ig_scale_uncond: float | None = RAEV2_IG_SCALE_UNCOND  # RAEv2 cases: GuidanceConfig.ig_scale_uncond

    @property
    def id(self) -> str:
        dt = str(self.vdtype).replace("torch.", "")
        c2 = f"-cfg2{int(self.cfg2)}" if self.kind == "heun" else ""
        off = f"-off{self.x_offset}" if self.x_offset else ""
        at = f"-t{self.t:g}" if self.t is not None else ""
        uncond = f"-uncond{self.ig_scale_uncond}" if self.ig_scale_uncond != RAEV2_IG_SCALE_UNCOND else ""
        return (f"{self.family.value}-{self.kind}-ig{int(self.ig)}-cfg{int(self.cfg)}{c2}-dup{int(self.dup_next)}-"
                f"{dt}-n{self.n}-{'x'.join(map(str, self.shape))}{off}{at}{uncond}")


def model_config(case: Case) -> ModelConfig:
    """A tiny model config whose latent shape is the case's (only the shape and the null class matter)."""
    c, h, w = case.shape
    if h != w:
        raise ValueError("latent shapes are square (C, S, S)")
    if case.family == Family.RAEV2:
        return preset("RAEv2-B", input_size=h, in_channels=c, depth=1, hidden_size=64, num_heads=4, encoder_depth=1,
                      decoder_hidden_size=64, head_num_heads=4, num_classes=10)
    name = "SiT-S/2" if case.family == Family.SIT else "LightningDiT-B/1"
    return preset(name, input_size=h, patch_size=1, in_channels=c, depth=1, hidden_size=64, num_heads=4,
                  encoder_depth=1, num_classes=10)


def sampler_config(case: Case) -> SamplerConfig:
    if case.family == Family.RAEV2:
        if case.kind != "euler":
            raise ValueError("RAEv2 steps are Euler steps")
        g = GuidanceConfig(ig_scale=IG_SCALE, cfg_scale=CFG_SCALE, ig_scale_uncond=case.ig_scale_uncond)
        return SamplerConfig(solver=Solver.EULER, steps=10, guidance=g, precision=Precision.FP32)
    if case.family == Family.SIT:
        solver = {"sde": Solver.SDE, "sde-last": Solver.SDE, "euler": Solver.ODE_EULER, "heun": Solver.ODE_HEUN}[case.kind]
    else:
        if case.kind.startswith("sde"):
            raise ValueError("the SDE kinds belong to the SiT family")
        solver = {"euler": Solver.EULER, "heun": Solver.HEUN2}[case.kind]
    g = GuidanceConfig(ig_scale=IG_SCALE, cfg_scale=CFG_SCALE)
    return SamplerConfig(solver=solver, steps=10, guidance=g, precision=Precision.FP32)


def make_step(case: Case, rng: np.random.Generator) -> Step:
    """A plan step of the case's kind at a random time, or at ``case.t`` (SiT and RAEv2: t from 1 down,
    RAEv2's times float32 like its grid; LightningDiT: 0 up)."""
    k = case.step_index
    if case.family == Family.RAEV2:
        t0 = np.float32(case.t if case.t is not None else rng.uniform(0.01, 1.0))
        t1 = np.float32(max(0.0, float(t0) - rng.uniform(0.005, 0.2)))
        ev = Evaluation(t=float(t0), ig=case.ig, cfg=case.cfg)
        return Step(index=k, kind=StepKind.EULER, t_cur=float(t0), t_next=float(t1), dt=-float(np.float32(t0 - t1)),
                    evals=(ev,))
    if case.family == Family.SIT:
        if case.kind == "sde-last":
            t_cur, t_next = SDE_T_END, 0.0
        else:
            t_cur = float(rng.uniform(0.1, 1.0))
            t_next = t_cur - float(rng.uniform(0.02, 0.3))
    else:
        t_cur = float(np.float32(rng.uniform(0.0, 0.8)))
        t_next = float(np.float32(t_cur + rng.uniform(0.02, 0.2)))
    dt = t_next - t_cur
    if case.family == Family.LIGHTNINGDIT:
        dt = float(np.float32(np.float32(t_next) - np.float32(t_cur)))
    first = Evaluation(t=t_cur, ig=case.ig, cfg=case.cfg)
    kind = {"sde": StepKind.SDE, "sde-last": StepKind.SDE_LAST, "euler": StepKind.EULER, "heun": StepKind.HEUN}[case.kind]
    evals = (first,)
    if kind == StepKind.HEUN:
        t_mid = t_next if case.family == Family.SIT else float(np.float32(np.float32(t_cur) + np.float32(dt)))
        evals = (first, Evaluation(t=t_mid, ig=case.ig, cfg=case.cfg2))
    return Step(index=k, kind=kind, t_cur=t_cur, t_next=t_next, dt=dt, evals=evals,
                noise_stream=sde_stream(k) if kind == StepKind.SDE else None)


@dataclass
class Inputs:
    step: Step
    x: torch.Tensor                 # (N, C, H, W) float32
    labels: torch.Tensor            # (N,) int64
    indices: torch.Tensor           # (N,) int64, on the host
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per evaluation, vdtype


def make_inputs(case: Case, device="cpu") -> Inputs:
    """Seeded random state, labels, sample indices (some >= 2^32) and network outputs for every evaluation."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    step = make_step(case, rng)
    n = case.n
    x = torch.randn((n, *case.shape), generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    indices = torch.tensor(rng.integers(0, 2**40, size=n), dtype=torch.int64)
    outputs = []
    for ev in step.evals:
        rows = 2 * n if ev.cfg else n
        vf = torch.randn((rows, *case.shape), generator=gen) * 1.5
        vi = vf + 0.5 * torch.randn((rows, *case.shape), generator=gen)
        outputs.append((vf.to(case.vdtype).to(device), vi.to(case.vdtype).to(device)))
    return Inputs(step, x.to(device), labels.to(device), indices, outputs)


def reference(case: Case, inp: Inputs, device="cpu") -> dict[str, torch.Tensor]:
    """The reference loop's step: x_next, the next network input, and for Heun k1 and the corrector's input rows."""
    cfg = model_config(case)
    backend = ReplayBackend(cfg, inp.outputs, device)
    plan = build_plan(case.family, sampler_config(case))
    facts = ModelFacts.of(cfg)
    x_next = reference_step(backend, plan, facts, inp.step, inp.x, inp.labels, case.seed, inp.indices, NUMPY)
    out = {"x_next": x_next.float(), "net_next": (torch.cat([x_next, x_next]) if case.dup_next else x_next).float()}
    if inp.step.kind == StepKind.HEUN:
        out["net_mid"] = backend.inputs[1][0]
        k1_backend = ReplayBackend(cfg, inp.outputs[:1], device)
        out["k1"] = guided_field(k1_backend, plan, facts, inp.x, inp.labels, inp.step.evals[0], drift=False)
    return out


def fused(case: Case, inp: Inputs, library: KernelLibrary | None = None, in_place: bool = False) -> dict[str, torch.Tensor]:
    """The same step through the kernels: x_next, net_next, and for Heun k1 and net_mid (x_pred rows)."""
    device = inp.x.device
    n = case.n
    e = int(np.prod(case.shape))
    if case.x_offset:
        store = torch.empty(n * e + case.x_offset, dtype=torch.float32, device=device)
        x = store[case.x_offset:].view(n, e)
        x.copy_(inp.x.reshape(n, e))
    else:
        x = inp.x.reshape(n, e).clone()
    g = sampler_config(case).guidance
    idx = inp.indices.to(device)
    first_bad = torch.full((n,), -1, dtype=torch.int64, device=device)
    out = {}
    x_out = x if in_place else torch.empty_like(x)
    net_next = torch.empty(((2 if case.dup_next else 1) * n, e), dtype=torch.float32, device=device)
    vf, vi = inp.outputs[0]
    step = inp.step
    if step.kind == StepKind.HEUN:
        ev1 = step.evals[1]
        k1 = torch.empty_like(x)
        net_mid = torch.empty(((2 if ev1.cfg else 1) * n, e), dtype=torch.float32, device=device)
        pred = step_params(case.family, g, step, phase=Phase.PREDICT, dup_next=ev1.cfg, seed=case.seed)
        fused_step(pred, x, vf, vi, k1_out=k1, net_out=net_mid, library=library)
        vf, vi = inp.outputs[1]
        corr = step_params(case.family, g, step, phase=Phase.CORRECT, dup_next=case.dup_next, seed=case.seed)
        fused_step(corr, x, vf, vi, k1=k1, x_out=x_out, net_out=net_next, first_bad=first_bad, library=library)
        out["k1"] = k1.view(n, *case.shape)
        out["net_mid"] = net_mid.view(-1, *case.shape)
    else:
        p = step_params(case.family, g, step, dup_next=case.dup_next, seed=case.seed)
        fused_step(p, x, vf, vi, indices=idx, x_out=x_out, net_out=net_next, first_bad=first_bad, library=library)
    out["x_next"] = x_out.view(n, *case.shape)
    out["net_next"] = net_next.view(-1, *case.shape)
    out["first_bad"] = first_bad
    return out


def fused_indexed(case: Case, inp: Inputs, library: KernelLibrary | None = None) -> dict[str, torch.Tensor]:
    """The same step through ``fused_step_indexed``, as the captured loop launches it.

    One launch table (the predictor and the corrector for Heun), one counter, and buffers that
    serve every launch: x updated in place (x_out is x), one 2N-row network-input buffer, one k1.
    Returns what ``fused`` returns, plus ``x_after_predict`` (Heun: x after the predictor),
    ``counter`` and ``fault``.
    """
    device = inp.x.device
    n = case.n
    e = int(np.prod(case.shape))
    x = inp.x.reshape(n, e).clone()
    g = sampler_config(case).guidance
    step = inp.step
    if step.kind == StepKind.HEUN:
        params = [step_params(case.family, g, step, phase=Phase.PREDICT, dup_next=step.evals[1].cfg, seed=case.seed),
                  step_params(case.family, g, step, phase=Phase.CORRECT, dup_next=case.dup_next, seed=case.seed)]
    else:
        params = [step_params(case.family, g, step, dup_next=case.dup_next, seed=case.seed)]
    table = pack_table(params, device)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    fault = torch.zeros(2, dtype=torch.int64, device=device)
    first_bad = torch.full((n,), -1, dtype=torch.int64, device=device)
    k1 = torch.empty_like(x)
    net = torch.empty((2 * n, e), dtype=torch.float32, device=device)
    idx = inp.indices.to(device)
    out = {}
    for j, (vf, vi) in enumerate(inp.outputs):
        fused_step_indexed(table, counter, x, vf, vi, idx, k1, x, net, first_bad, fault=fault, library=library)
        if step.kind == StepKind.HEUN and j == 0:
            out["x_after_predict"] = x.clone().view(n, *case.shape)
            out["net_mid"] = net[: (2 if step.evals[1].cfg else 1) * n].clone().view(-1, *case.shape)
            out["k1"] = k1.view(n, *case.shape)
    out["x_next"] = x.view(n, *case.shape)
    out["net_next"] = net[: (2 if case.dup_next else 1) * n].view(-1, *case.shape)
    out["first_bad"] = first_bad
    out["counter"] = counter
    out["fault"] = fault
    return out


def check_step_capture(library: KernelLibrary) -> None:
    """A fused SDE step of ``library`` captured in a CUDA graph and replayed 3 times equals 4 eager
    in-place steps (1 warm-up + 3 replays), and writes its duplicated network input (dup_next)."""
    case = Case(Family.SIT, "sde", True, True, True, n=4, shape=(4, 32, 32))
    inp = make_inputs(case, device="cuda")
    n, e = case.n, 4096
    p = step_params(case.family, sampler_config(case).guidance, inp.step, dup_next=True, seed=case.seed)
    vf, vi = inp.outputs[0]
    idx = inp.indices.cuda()
    x0 = inp.x.reshape(n, e).clone()
    x = x0.clone()
    net = torch.empty(2 * n, e, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # one warm-up launch outside the capture, as PyTorch recommends
        fused_step(p, x, vf, vi, indices=idx, x_out=x, net_out=net, library=library)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captured, not run
        fused_step(p, x, vf, vi, indices=idx, x_out=x, net_out=net, library=library)
    for _ in range(3):
        graph.replay()
    ref = x0.clone()
    ref_net = torch.empty_like(net)  # dup_next is set: the step must be given somewhere to write
    for _ in range(4):
        fused_step(p, ref, vf, vi, indices=idx, x_out=ref, net_out=ref_net, library=library)
    torch.cuda.synchronize()
    assert not torch.equal(x, x0)
    assert torch.equal(x, ref)
    assert torch.equal(net[:n], x) and torch.equal(net[n:], x)


def check_indexed_equals_by_value(case: Case, library: KernelLibrary) -> None:
    """On CUDA, the indexed launches of ``case`` equal the by-value ones bit for bit and advance the counter."""
    inp = make_inputs(case, device="cuda")
    want = fused(case, inp, library=library)
    got = fused_indexed(case, inp, library=library)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{case.id}: {differ} differ from the by-value step (same device code, same scalars)"
    assert got["counter"].tolist() == [len(inp.outputs)] and got["fault"].tolist() == [0, 0]
    if case.kind == "heun":
        assert torch.equal(got["x_after_predict"], inp.x), "the predictor must leave x (= x_out) alone"


def check_refused_indexed_launch(library: KernelLibrary) -> None:
    """An indexed launch whose table contradicts its buffers records the fault on the device (nothing
    is raised: the device cannot report back), advances the counter and writes nothing."""
    from igengine.kernels import abi

    case = Case(Family.SIT, "sde", True, False, False, n=2, shape=(3, 2, 2))
    inp = make_inputs(case, device="cuda")
    p = step_params(case.family, sampler_config(case).guidance, inp.step, seed=case.seed)
    p.cfg = 1  # the table says CFG; the buffers are an N-row graph's
    vf, vi = inp.outputs[0]
    x = inp.x.reshape(2, 12).clone()
    x_out = torch.full_like(x, 7.0)
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    fault = torch.zeros(2, dtype=torch.int64, device="cuda")
    fused_step_indexed(pack_table([p], "cuda"), counter, x, vf, vi, inp.indices.cuda(), None, x_out, None, None,
                       fault=fault, library=library)
    assert fault.tolist() == [int(abi.Fault.ROWS), 0] and counter.tolist() == [1]
    assert torch.equal(x_out, torch.full_like(x, 7.0))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max(1, |ref|) (inf if shapes differ or got is non-finite where ref is finite)."""
    if got.shape != ref.shape:
        return float("inf")
    got, ref = got.double().cpu(), ref.double().cpu()
    fin_g, fin_r = torch.isfinite(got), torch.isfinite(ref)
    if not torch.equal(fin_g, fin_r):
        return float("inf")
    err = ((got - ref).abs() / ref.abs().clamp_min(1.0))[fin_r]
    return float(err.max()) if err.numel() else 0.0


def compare(case: Case, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative errors of every output the reference has."""
    return {k: rel_err(got[k], ref[k]) for k in ref}


# ------------------------------------------------------------------------------------------------
# The case matrix shared by the CPU-twin and the CUDA tests
# ------------------------------------------------------------------------------------------------

KINDS = ((Family.SIT, "sde"), (Family.SIT, "sde-last"), (Family.SIT, "euler"), (Family.SIT, "heun"),
         (Family.LIGHTNINGDIT, "euler"), (Family.LIGHTNINGDIT, "heun"), (Family.RAEV2, "euler"))
# batch 1 with E = 27 (a tail of 3); E = 64 (whole blocks: the vectorised path); E = 1 (one partial
# block); E = 147 (tail of 3, several blocks).
SIZES = ((1, (3, 3, 3)), (3, (4, 4, 4)), (2, (1, 1, 1)), (2, (3, 7, 7)))
VDTYPES = (torch.float32, torch.bfloat16, torch.float16)


def step_cases() -> list[Case]:
    """Every kind x IG on/off x CFG on/off x next-input duplication on/off x output dtype x size
    (x CFG on/off at the Heun corrector)."""
    out = []
    for (fam, kind), ig, cfg, dup, dt, (n, shape) in itertools.product(
            KINDS, (False, True), (False, True), (False, True), VDTYPES, SIZES):
        for cfg2 in ((False, True) if kind == "heun" else (False,)):
            out.append(Case(fam, kind, ig, cfg, dup, dt, n, shape, cfg2=cfg2))
    return out


# ------------------------------------------------------------------------------------------------
# End-to-end runs on a tiny random IG DiT
# ------------------------------------------------------------------------------------------------

# (model, solver, CFG interval, timestep shift): CFG (and IG, interval (0, 0.8)) switch inside each 10-step run.
E2E_RUNS = (
    ("SiT-S/2", Solver.SDE, (0.0, 0.7), 0.0),
    ("SiT-S/2", Solver.ODE_EULER, (0.0, 0.55), 0.0),
    ("SiT-S/2", Solver.ODE_HEUN, (0.3, 0.7), 0.0),
    ("LightningDiT-B/1", Solver.HEUN2, (0.19, 1.0), 0.3),
    ("LightningDiT-B/1", Solver.EULER, (0.0, 0.5), 0.0),
)
# 10 steps through a random network: per-step parity of 1e-6 relative, amplified by the network's
# Lipschitz constant over the steps, stays far below this (observed: 0 on the CPU twin).
E2E_RTOL = 1e-5


def tiny_backend(name: str, precision: Precision = Precision.FP32, device="cpu"):
    """TorchBackend of a 2-block, width-64 IG DiT with every parameter random (no zero-initialised head)."""
    from igengine.backends import TorchBackend
    from igengine.models import IGDiT

    over = dict(input_size=8, depth=2, hidden_size=64, num_heads=4, encoder_depth=1, num_classes=10)
    if name.startswith("LightningDiT"):
        over["in_channels"] = 6
    torch.manual_seed(0)
    model = IGDiT(preset(name, **over))
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn_like(prm) * 0.05)
    return TorchBackend(model, precision, device=device)


def e2e_sampler(solver: Solver, cfg_interval, shift: float, precision: Precision = Precision.FP32,
                steps: int = 10) -> SamplerConfig:
    g = GuidanceConfig(ig_scale=1.4, ig_interval=(0.0, 0.8), cfg_scale=1.5, cfg_interval=tuple(cfg_interval))
    return SamplerConfig(solver=solver, steps=steps, guidance=g, timestep_shift=shift, precision=precision)


class XPredictionNet:
    """A deterministic stand-in for a RAEv2 network: ``(x, t, y) -> (full, base)``, two distinct
    x-predictions of x's shape in ``dtype``, smooth in x, t and the label (the null class included).

    Torch operations on the device only (no host synchronisation, no Python decision per call), so it
    is capturable like the torch backend.
    """

    capturable = True
    precision = None

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        tt = t.view(-1, *([1] * (x.dim() - 1)))
        yy = y.to(x.dtype).view_as(tt) * 0.1
        full = 0.8 * x * (1.0 - tt) + 0.3 * torch.sin(3.0 * x + yy)
        base = 0.6 * x - 0.2 * tt * torch.cos(2.0 * x - yy)
        return full.to(self.dtype), base.to(self.dtype)


def raev2_facts(shape: tuple[int, int, int] = (3, 5, 5)) -> ModelFacts:
    """A RAEv2 model's facts for ``XPredictionNet`` (labels 0..9, null class 10)."""
    return ModelFacts(Family.RAEV2, tuple(shape), null_class=10)


def raev2_sampler(steps: int = 12, shift: float = 0.5, ig_scale_uncond: float | None = 1.2) -> SamplerConfig:
    """A short RAEv2 run in which IG (on [0.3, 1]) and CFG (on [0, 0.6]) both switch; with 12 steps and
    shift 0.5 its last evaluations are below t = 0.05, where the velocity divides by 0.05."""
    g = GuidanceConfig(ig_scale=1.6, ig_interval=(0.3, 1.0), cfg_scale=1.5, cfg_interval=(0.0, 0.6),
                       ig_scale_uncond=ig_scale_uncond)
    return SamplerConfig(solver=Solver.EULER, steps=steps, guidance=g, timestep_shift=shift, precision=Precision.FP32)


def twin_tools_missing() -> str | None:
    """Why the CPU twin cannot be built here (no cmake, no C++ compiler), or None."""
    import os
    import shutil

    if shutil.which("cmake") is None:
        return "cmake not found on PATH: cannot build the CPU twin from csrc/"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "no C++ compiler found: cannot build the CPU twin from csrc/"
    return None


@functools.lru_cache(maxsize=1)
def build_twin() -> KernelLibrary:
    """Build (incrementally, once per process) and load the CPU twin from csrc/ into build/kernels-test-cpu/.

    Raises igengine.kernels.build.BuildError when CMake or the compiler fails.
    """
    from igengine.kernels.build import build

    lib_dir = build(cuda="off", build_dir=TWIN_BUILD, lib_dir=TWIN_BUILD / "lib", quiet=True)
    return load_library(lib_dir / library_filename(CPU_STEM), "cpu")


class TimeNaNInjector:
    """Wraps a network and turns row ``row`` of v_final into NaN at the evaluations whose time is ``t``.

    Decided on the device from the time input (no Python state per call), so it is capturable and a
    CUDA graph replays it at the right launch. ``t`` is compared in float32, as the network sees it.
    """

    def __init__(self, inner, t: float, row: int):
        self.inner, self.row = inner, row
        self.t = float(np.float32(t))
        self.precision = getattr(inner, "precision", None)
        self.capturable = True

    def __call__(self, x, t, y):
        vf, vi = self.inner(x, t, y)
        hit = (t == self.t) & (torch.arange(t.shape[0], device=t.device) == self.row)
        return torch.where(hit.view(-1, *([1] * (vf.dim() - 1))), torch.full_like(vf, float("nan")), vf), vi
