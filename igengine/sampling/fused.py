"""The fused sampling loop: the reference loop with the glue between network calls in one kernel.

Per step the reference loop (``igengine.sampling.loop``) runs a dozen small tensor operations
between two network calls: IG, the SiT drift, CFG, noise generation and the update, then builds
the next network input with ``torch.cat([x, x])``. Here one kernel launch does all of it in one
pass over memory (two for Heun: predictor and corrector) and writes the next state and the next
network input, duplicated for CFG when the next evaluation needs it; SDE noise is drawn inside the
kernel from the noise contract. The state lives in fixed buffers (x, k1, the network input),
updated in place, so the loop allocates nothing per step. Its launches come precomputed from the
plan (``igengine.sampling.launches``).

Float32 state only (``fp32``, ``bf16``, ``fp16`` precisions); results equal the reference loop's
within the kernel tolerance (fp32 on the CPU twin: bit for bit, see tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from igengine.kernels.binding import fused_step, gaussian
from igengine.kernels.library import KernelLibrary
from igengine.noise import STREAM_INITIAL
from igengine.sampling.launches import StepLaunches, plan_launches
from igengine.sampling.loop import ModelFacts, Network, OnStep, cfg_labels, raise_if_nonfinite, time_column
from igengine.sampling.plan import Evaluation, Plan, Step, StepKind

_NET_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Buffers:
    """The fixed buffers of a fused run over N samples of E elements each."""

    def __init__(self, x: torch.Tensor, launches: tuple[StepLaunches, ...], labels: torch.Tensor,
                 null_class: int | None):
        n, e = x.shape
        self.n = n
        self.x = x  # (N, E) float32, updated in place
        max_rows = max([s.rows_in for s in launches] + [s.rows_mid for s in launches])
        self.net = torch.empty((max_rows * n, e), dtype=torch.float32, device=x.device)
        self.net[:n] = x
        if launches[0].rows_in == 2:
            self.net[n:2 * n] = x
        self.k1 = torch.empty_like(x) if any(s.step.kind == StepKind.HEUN for s in launches) else None
        self.first_bad = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        self.labels = {1: labels, 2: cfg_labels(labels, null_class) if null_class is not None else None}


def _network(net: Network, shape: tuple[int, int, int], rows: torch.Tensor, ev: Evaluation,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network outputs for ``rows`` (R, E) float32 at ev.t, as contiguous kernel-readable tensors."""
    r = rows.shape[0]
    v_final, v_inter = net(rows.view(r, *shape), time_column(ev.t, r, rows.device), labels)
    return kernel_ready(v_final), kernel_ready(v_inter)


def _advance(net: Network, shape: tuple[int, int, int], lib: KernelLibrary, sl: StepLaunches, b: _Buffers,
             idx: torch.Tensor) -> None:
    """One plan step on the fixed buffers: b.x is updated in place, b.net holds the next network input."""
    n, step = b.n, sl.step
    vf, vi = _network(net, shape, b.net[: sl.rows_in * n], step.evals[0], b.labels[sl.rows_in])
    nxt = b.net[: sl.rows_next * n] if sl.rows_next else None
    if step.kind == StepKind.HEUN:
        pred, corr = sl.launches
        fused_step(pred, b.x, vf, vi, k1_out=b.k1, net_out=b.net[: sl.rows_mid * n], library=lib)
        vf, vi = _network(net, shape, b.net[: sl.rows_mid * n], step.evals[1], b.labels[sl.rows_mid])
        fused_step(corr, b.x, vf, vi, k1=b.k1, x_out=b.x, net_out=nxt, first_bad=b.first_bad, library=lib)
    else:
        fused_step(sl.launches[0], b.x, vf, vi, indices=idx, x_out=b.x, net_out=nxt, first_bad=b.first_bad,
                   library=lib)


def run_fused(net: Network, plan: Plan, facts: ModelFacts, seed: int, indices: torch.Tensor, labels: torch.Tensor,
              *, device: torch.device, library: KernelLibrary, on_step: OnStep | None = None) -> torch.Tensor:
    """Final states (N, C, H, W) float32, as ``loop.run_reference`` computes them, with the fused kernels."""
    launches = plan_launches(plan, seed)
    idx = indices.to(device).contiguous()
    n = idx.numel()
    x = gaussian(seed, idx, STREAM_INITIAL, facts.latent_shape, device=device, library=library).reshape(n, -1)
    b = _Buffers(x, launches, labels.to(device), facts.null_class)
    for k, sl in enumerate(launches):
        _advance(net, facts.latent_shape, library, sl, b, idx)
        if on_step is not None:
            on_step(k + 1, len(launches))
    raise_if_nonfinite(b.first_bad, indices)
    return b.x.view(n, *facts.latent_shape)


def fused_step_once(net: Network, plan: Plan, facts: ModelFacts, step: Step, x: torch.Tensor, y: torch.Tensor,
                    seed: int, indices: torch.Tensor, library: KernelLibrary) -> torch.Tensor:
    """One plan step from state x (N, C, H, W) float32 through the same code as ``run_fused``; returns a new tensor."""
    n = x.shape[0]
    sl = next(s for s in plan_launches(Plan(plan.family, plan.solver, plan.guidance, (step,)), seed))
    b = _Buffers(x.reshape(n, -1).clone(), (sl,), y.to(x.device), facts.null_class)
    _advance(net, facts.latent_shape, library, sl, b, indices.to(x.device).contiguous())
    return b.x.view_as(x)


def kernel_ready(v: torch.Tensor) -> torch.Tensor:
    """Backends return float32 (the contract); others (bf16/fp16 engines) are read as they are."""
    if v.dtype not in _NET_DTYPES:
        v = v.float()
    return v.contiguous()


__all__ = ["fused_step_once", "kernel_ready", "run_fused"]
