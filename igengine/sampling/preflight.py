"""Checked before trusted: each fast rung a run will use is compared with the reference rung first.

The rungs of a run, fastest first: the captured loop (``cuda-graph``: network and fused step
replayed from CUDA graphs), the fused loop (``cuda`` or ``cpu-twin``: one kernel launch between
network calls) and the reference loop (plain PyTorch glue, the spec). A network can have a fast
rung too: the compiled backend against the eager network of the same weights and precision. None
of them may be trusted with a 50,000-sample run on a device before it has given, on that device, at
that precision and with the run's own network, the numbers the reference gives. So before the
first chunk ``run_preflight``:

  1. cuts a short plan from the run's plan (``preflight_plan``): its first ``FIRST_STEPS`` steps, the
     first step of every other kind of step it holds (SDE or its deterministic last step, Euler,
     Heun with its corrector; each with its own IG and CFG decisions per evaluation) and its last
     step, in plan order, with their own times, dt and noise streams; so every kind of launch the
     run makes (and the CFG row changes between them) runs at least once;
  2. draws ``SAMPLES`` samples through that plan on each rung (the same seed, indices and labels);
  3. compares each fast rung's final state with the reference (max abs over all elements) against
     the bounds below, and picks, for the run, the fastest rung that passed.

Bounds (docs/CONTRACTS.md, "Tolerances"). ``scale = max(1, max |reference|)``, L = launches and
E = network evaluations of the short plan, ``e_lp`` = the low-precision network's own error over
the short plan: ``max |reference loop with the run's eager network - reference loop with the same
weights in fp32 (IEEE, no TF32)|`` (0 when the network is fp32: nothing to measure).
  * a step rung (same network as the reference): ``KERNEL_RTOL * L * scale + e_lp``. The first term
    is the kernels' contract (one fused step within 1e-6 max(1, |ref|) of the reference step)
    accumulated over the launches; the second is the bf16 rule: the rungs share the network, but a
    few-ulp difference in its input flips bf16/fp16 (or TF32) roundings inside it, so the rungs may
    differ by as much as a low-precision network differs from fp32. Passing it keeps the fast rung
    within 2 e_lp + KERNEL_RTOL L scale of the fp32 maths: the parity rule (STYLE.md, "about twice
    the error of the same maths done naively in that dtype").
  * a network rung (compiled against eager): ``max |compiled - fp32| <= 2 e_lp + NETWORK_RTOL * E *
    scale`` (the parity rule itself; for an fp32 network, against the eager one: the fp32 contract
    bounds 10 steps by 1e-4 against the official code, 1e-5 per evaluation).
A wrong kernel, scalar, row or dtype is off by orders of magnitude more than either: a CFG or IG
scale, a noise stream or a dt gone wrong moves the state by a fraction of ``dt |v|`` per step, the
same order as the step itself, where e_lp is the network's rounding error times dt.

Cost: ``SAMPLES`` x the short plan's network rows per rung drawn, and at most four rungs are drawn
(the reference loop; the fp32 network for a low-precision run; the eager network beside a compiled
one; each fast step rung: fused, and captured on CUDA with a capturable network, which the compiled
one is not). SiT-XL/2 at the paper settings (SDE 250 steps, CFG for t <= 0.7; tests/test_preflight.py
pins these counts): the short plan is steps 0, 1, 78 (the first with CFG) and 249 (the last), 6
network rows per sample, 12 per rung, at most 48 in all, against 50,000 x 422 = 2.1e7 rows for the
run: a FLOP share of 2.3e-6 (every row costs the same FLOPs). LightningDiT-XL/1 (heun2 125, shift
0.3, CFG for t >= 0.19): steps 0, 1, 54 (CFG from its corrector on), 55 and 123, 15 rows per sample,
at most 120 against 50,000 x 387 = 1.9e7: 6.2e-6. A compiled network pads a call of 2 or 4 rows to
its smallest compiled row count (the run's batch), so its draws cost up to batch / 2 times their
rows: 1e-4 of the run at batch 64. In seconds, on a GPU a batch of 2-4 rows runs far below the
GEMMs' peak, so the check costs a few dozen small forwards and one more CUDA-graph capture, not its
FLOP share (not measured on a GPU yet); each run records both (``Preflight.seconds``, in the
manifest's setup time, and ``Preflight.flop_share``). On the CPU with the digits model it took
0.1-0.3 s.

This module knows only callables and plans (the sampling layer): building the networks (eager,
fp32) from a backend and acting on the verdict are ``igengine.jobs.preflight``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from igengine.config import Precision
from igengine.errors import interruption
from igengine.sampling.captured import PATH_CUDA_GRAPH
from igengine.sampling.loop import ModelFacts, Network
from igengine.sampling.plan import Plan, Step, StepKind
from igengine.sampling.sampler import Sampler

SAMPLES = 2
FIRST_STEPS = 2
KERNEL_RTOL = 1e-6  # docs/CONTRACTS.md, Tolerances: one fused step against the reference step (CUDA)
NETWORK_RTOL = 1e-5  # docs/CONTRACTS.md, Tolerances: fp32 within 1e-4 of the official code after 10 steps
REFERENCE = "reference"
NETWORK_RUNG = "compiled"


def step_signature(step: Step) -> tuple:
    """What kind of launch(es) a step makes: its kind and, per evaluation, whether IG and CFG are on."""
    return (step.kind, tuple((bool(ev.ig), bool(ev.cfg)) for ev in step.evals))


def preflight_plan(plan: Plan, first: int = FIRST_STEPS) -> Plan:
    """The short plan of the check: steps 0..first-1, the first step of every signature
    (``step_signature``) not among them, and the last step, in plan order (the steps themselves,
    unchanged: their times, dt, noise streams and indices)."""
    if not plan.steps:
        return plan
    chosen = set(range(min(first, len(plan.steps))))
    seen = {step_signature(plan.steps[k]) for k in chosen}
    for k, step in enumerate(plan.steps):
        sig = step_signature(step)
        if sig not in seen:
            seen.add(sig)
            chosen.add(k)
    chosen.add(len(plan.steps) - 1)
    return replace(plan, steps=tuple(plan.steps[k] for k in sorted(chosen)))


def describe_plan(plan: Plan) -> list[dict]:
    """The short plan's steps, for the manifest: index, kind, t, and per evaluation IG / CFG."""
    return [{"index": s.index, "kind": s.kind.value, "t": round(s.t_cur, 6),
             "ig": [bool(ev.ig) for ev in s.evals], "cfg": [bool(ev.cfg) for ev in s.evals]} for s in plan.steps]


def launches(plan: Plan) -> int:
    """Fused launches of a plan (two per Heun step)."""
    return sum(2 if s.kind == StepKind.HEUN else 1 for s in plan.steps)


@dataclass(frozen=True)
class RungCheck:
    """One fast rung against its reference: the measured error, the bound, the verdict."""

    rung: str  # 'cuda-graph', 'cuda', 'cpu-twin' (step rungs) or 'compiled' (the network)
    against: str  # what it was compared with
    max_abs: float  # inf when the rung failed to run (``error`` says why)
    bound: float
    passed: bool
    bound_terms: dict
    error: str | None = None

    def to_dict(self) -> dict:
        return {"rung": self.rung, "against": self.against, "max_abs": _num(self.max_abs), "bound": _num(self.bound),
                "verdict": "pass" if self.passed else "fail", "bound_terms": self.bound_terms,
                **({"error": self.error} if self.error else {})}


@dataclass(frozen=True)
class Preflight:
    """What the check found, and the rung the run takes.

    ``kernels`` / ``capture``: the Sampler options of the chosen step rung ('auto'/'off' each);
    ``step_rung``: its path; ``network_ok``: False when the network rung (compiled) failed and the
    run must take the eager network; ``warning``: one line when anything was demoted, else None.
    """

    checks: tuple[RungCheck, ...] = ()
    step_rung: str = REFERENCE
    kernels: str = "auto"
    capture: str = "auto"
    network_ok: bool = True
    plan: tuple[dict, ...] = ()
    samples: int = SAMPLES
    network_rows: int = 0  # rows the check fed the network, over every rung
    run_rows: int = 0  # rows the whole run feeds it (n x the plan's rows per sample)
    low_precision_error: float | None = None  # e_lp
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def compared(self) -> bool:
        return bool(self.checks)

    @property
    def failed(self) -> tuple[RungCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def flop_share(self) -> float | None:
        """The check's network FLOPs over the run's (the FLOPs of a row are the same in both)."""
        return self.network_rows / self.run_rows if self.run_rows else None

    @property
    def warning(self) -> str | None:
        if not self.failed:
            return None
        what = "; ".join(f"the {c.rung} {'network' if c.rung == NETWORK_RUNG else 'step'} differs from "
                         f"{c.against} by {_fmt(c.max_abs)} (bound {_fmt(c.bound)})" + (f": {c.error}" if c.error else "")
                         for c in self.failed)
        using = [f"the {self.step_rung} step"] + ([] if self.network_ok else ["the eager network"])
        return (f"igengine preflight: {what} over {len(self.plan)} steps of {self.samples} samples on this device; "
                f"the run uses {' and '.join(using)} instead (see the manifest's preflight entry)")

    def to_dict(self) -> dict:
        share = self.flop_share
        return {
            "compared": [c.to_dict() for c in self.checks],
            "chosen": {"step": self.step_rung, "kernels": self.kernels, "capture": self.capture,
                       "network": "as built" if self.network_ok else "eager (the compiled network failed)"},
            "plan_steps": list(self.plan),
            "samples": self.samples,
            "low_precision_error": _num(self.low_precision_error) if self.low_precision_error is not None else None,
            "network_rows": self.network_rows,
            "flop_share": float(f"{share:.3g}") if share is not None else None,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


def _num(v: float) -> float | str:
    return v if np.isfinite(v) else str(v)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if np.isfinite(v) else str(v)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.detach().cpu().double() - b.detach().cpu().double()).abs()
    if not bool(torch.isfinite(d).all()):
        return float("inf")
    return float(d.max()) if d.numel() else 0.0


def step_rungs(sampler: Sampler) -> list[tuple[str, dict]]:
    """The fast step rungs a Sampler would use, fastest first, each with the Sampler options that give it."""
    path = sampler.path
    if path == REFERENCE:
        return []
    fused = "cuda" if path == PATH_CUDA_GRAPH else path
    rungs = [(PATH_CUDA_GRAPH, {"capture": "auto"})] if path == PATH_CUDA_GRAPH else []
    return rungs + [(fused, {"capture": "off"})]


def run_preflight(net: Network, plan: Plan, facts: ModelFacts, precision: Precision | str, device: torch.device | str,
                  *, seed: int = 0, labels=None, capture: str = "auto", plain_net: Network | None = None,
                  fp32_net: Network | None = None, network_rung: bool = False, run_samples: int = 0) -> Preflight:
    """Compare the fast rungs of a run on ``net`` with its reference rung; the rung the run should take.

    net: the run's network. plan, facts, precision, device, capture: the run's (``capture`` 'off'
    takes the captured rung out, as it does for the run). seed, labels: of the ``SAMPLES`` samples
    drawn (indices 0..SAMPLES-1; labels default to ``index mod num_classes``). plain_net: the eager
    network of the same weights at the same precision, when ``net`` is another implementation of
    it (the compiled backend; None: ``net`` is plain). fp32_net: the same weights in fp32 without
    TF32 (None for an fp32 network: no low-precision error to measure). network_rung: compare
    ``net`` with ``plain_net`` (and fp32_net) as a rung of its own. run_samples: n of the run, for
    the FLOP share.
    """
    t0 = time.perf_counter()
    precision = Precision(precision)
    run_sampler = Sampler(net, plan, facts, precision, device, capture=capture)  # a CUDA build self-tests here
    rungs = step_rungs(run_sampler)
    network_rung = network_rung and plain_net is not None
    if not rungs and not network_rung:
        return Preflight(step_rung=run_sampler.path, seconds=time.perf_counter() - t0, run_rows=run_samples * plan.network_rows,
                         notes=("nothing to compare: the run takes the reference loop and the eager network",))
    short = preflight_plan(plan)
    idx = torch.arange(SAMPLES, dtype=torch.int64)
    y = (torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[:SAMPLES] if labels is not None
         else idx % max(1, facts.null_class or 1))
    if y.numel() < SAMPLES:
        y = torch.cat([y, y[-1:].expand(SAMPLES - y.numel())])
    rows = short.network_rows * SAMPLES
    runs = 0

    def draw(network: Network, prec: Precision, **options) -> torch.Tensor:
        nonlocal runs
        runs += 1
        return Sampler(network, short, facts, prec, device, **options)(seed, idx, y).detach().clone()

    reference = draw(net, precision, kernels="off")
    plain = draw(plain_net, precision, kernels="off") if plain_net is not None else reference
    fp32 = draw(fp32_net, Precision.FP32, kernels="off") if fp32_net is not None else None
    e_lp = _max_abs(plain, fp32) if fp32 is not None else 0.0
    checks: list[RungCheck] = []
    network_ok = True
    if network_rung:  # the parity rule: the compiled network's error against fp32 (or the eager fp32 network)
        target = fp32 if fp32 is not None else plain
        scale = max(1.0, float(target.abs().max()))
        evals = short.nfe
        bound = 2.0 * e_lp + NETWORK_RTOL * evals * scale
        err = _max_abs(reference, target)
        network_ok = err <= bound
        against = "the fp32 network" if fp32 is not None else "the eager network"
        checks.append(RungCheck(
            NETWORK_RUNG, f"{against} (reference loop, same weights)", err, bound, network_ok,
            {"2 e_lp": 2.0 * e_lp, "NETWORK_RTOL * evaluations * scale": NETWORK_RTOL * evals * scale,
             "evaluations": evals, "scale": scale}))
        if not network_ok:  # the run takes the eager network: its step rungs are checked with it
            net, reference = plain_net, plain
    scale = max(1.0, float(reference.abs().max()))
    n_launch = launches(short)
    step_bound = KERNEL_RTOL * n_launch * scale + e_lp
    chosen: tuple[str, dict] | None = None
    for rung, options in rungs:
        error = None
        try:
            got = draw(net, precision, **options)
            err = _max_abs(got, reference)
        except Exception as exc:  # noqa: BLE001 - a fast rung that cannot run is a failed rung, whatever it raised
            if (stop := interruption(exc)) is not None:  # an interrupt (Interrupted is no Exception) a library wrapped
                raise stop from None
            err, error = float("inf"), f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ok = err <= step_bound
        checks.append(RungCheck(rung, "the reference loop (same network)", err, step_bound, ok,
                                {"KERNEL_RTOL * launches * scale": KERNEL_RTOL * n_launch * scale, "e_lp": e_lp,
                                 "launches": n_launch, "scale": scale}, error))
        if ok and chosen is None:
            chosen = (rung, options)
    if rungs and chosen is None:
        step_rung, kernels, cap = REFERENCE, "off", capture
    elif chosen is not None:  # capture 'off' only where the captured rung was there and failed
        step_rung, kernels, cap = chosen[0], "auto", ("off" if chosen[0] != rungs[0][0] else capture)
    else:
        step_rung, kernels, cap = run_sampler.path, "auto", capture
    notes = ()
    if not network_ok and cap != "off":  # the eager replacement might capture: that rung was not checked
        cap = "off"
        notes = ("capture off: the eager network that replaces the compiled one was checked on the fused and "
                 "reference loops only",)
    return Preflight(tuple(checks), step_rung, kernels, cap, network_ok, tuple(describe_plan(short)), SAMPLES,
                     rows * runs, run_samples * plan.network_rows, e_lp if fp32_net is not None else None,
                     time.perf_counter() - t0, notes)


__all__ = ["FIRST_STEPS", "KERNEL_RTOL", "NETWORK_RTOL", "SAMPLES", "Preflight", "RungCheck", "describe_plan",
           "preflight_plan", "run_preflight", "step_rungs", "step_signature"]
