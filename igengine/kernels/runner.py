"""FusedPlanRunner: the reference sampling loop with the glue between network calls fused.

Per step the reference (``PlanRunner``) runs a dozen small tensor operations between two network
calls: IG, the SiT drift, CFG, noise generation (NumPy, on the host) and the update, then builds the
next network input with ``torch.cat([x, x])``. Here one kernel launch does all of it in one pass over
memory (two launches for Heun: predictor and corrector) and writes the next state and the next network
input, duplicated for CFG when the next evaluation needs it. The state stays in three fixed buffers
(x, k1, the network input), updated in place, so the loop allocates nothing per step.

Precision: fp32, bf16 and fp16 runs (float32 state; bf16/fp16 network outputs are upcast inside the
kernel). ``reference`` precision (SiT's float64 state) and any run without a usable kernel library
take the plain ``PlanRunner`` path unchanged; ``path`` says which one a runner takes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from igengine.backends.base import Backend
from igengine.config import Precision, SamplerConfig
from igengine.kernels import library as _library
from igengine.kernels.binding import fused_step, gaussian
from igengine.kernels.library import KernelLibrary
from igengine.kernels.params import Phase, StepLaunches, plan_launches, step_params
from igengine.noise import STREAM_INITIAL
from igengine.sampler import FINITE_CHECK_EVERY, PlanRunner, raise_if_nonfinite
from igengine.solvers import Evaluation, Step, StepKind

_NET_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedPlanRunner(PlanRunner):
    """A PlanRunner whose guidance + solver update runs in the fused kernels (CUDA or the CPU twin).

    backend, sampler: as for PlanRunner. kernels: 'auto' (use the library for the run's device when
    there is one) or 'off' (always the reference path; for A/B comparisons).
    Results equal PlanRunner's within the kernel tolerance of DESIGN.md section 9 (fp32: the CPU twin
    reproduces every float32 operation of the reference in the same order).
    """

    def __init__(self, backend: Backend, sampler: SamplerConfig, kernels: str = "auto"):
        super().__init__(backend, sampler)
        if kernels not in ("auto", "off"):
            raise ValueError(f"kernels must be 'auto' or 'off', got {kernels!r}")
        self.kernels = kernels

    # -- which path ---------------------------------------------------------------------------
    def library(self, device: torch.device | str | None = None) -> KernelLibrary | None:
        """The kernel library this runner uses on ``device`` (default: the backend's), or None."""
        if self.kernels == "off" or Precision(self.sampler.precision) == Precision.REFERENCE:
            return None
        return _library.library_for(torch.device(device) if device is not None else self.backend.device)

    def path(self, device: torch.device | str | None = None) -> str:
        """'cuda', 'cpu-twin' or 'reference': the implementation of the step on ``device``."""
        lib = self.library(device)
        if lib is None:
            return _library.PATH_REFERENCE
        return _library.PATH_CUDA if lib.kind == "cuda" else _library.PATH_CPU

    # -- network ------------------------------------------------------------------------------
    def _net(self, rows: torch.Tensor, ev: Evaluation, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs for ``rows`` (R, E) float32 at ev.t, as contiguous kernel-readable tensors."""
        r = rows.shape[0]
        # Same time column as PlanRunner.field: built in float64, cast to float32.
        t_in = torch.full((r,), ev.t, dtype=torch.float64, device=rows.device).float()
        v_final, v_inter = self._forward(rows.view(r, *self.model.latent_shape), t_in, labels)
        return _kernel_ready(v_final), _kernel_ready(v_inter)

    def _labels(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y, torch.cat([y, torch.full_like(y, self.model.null_class)])

    # -- one step -----------------------------------------------------------------------------
    def advance(self, step: Step, x: torch.Tensor, y: torch.Tensor, seed: int, indices: torch.Tensor) -> torch.Tensor:
        """One solver step from state x (N, C, H, W) float32; returns the next state (a new tensor)."""
        lib = self.library(x.device)
        if lib is None or x.dtype != torch.float32:
            return super().advance(step, x, y, seed, indices)
        n = x.shape[0]
        xs = x.reshape(n, -1).contiguous()
        idx, y = self.prepare(indices, y, x.device)  # same checks as a whole run
        if idx.numel() != n:
            raise ValueError(f"{idx.numel()} sample indices for {n} rows of x")
        idx = idx.to(x.device)
        y1, y2 = self._labels(y)
        ev0 = step.evals[0]
        rows = torch.cat([xs, xs]) if ev0.cfg else xs
        vf, vi = self._net(rows, ev0, y2 if ev0.cfg else y1)
        out = torch.empty_like(xs)
        g = self.sampler.guidance
        if step.kind == StepKind.HEUN:
            ev1 = step.evals[1]
            k1 = torch.empty_like(xs)
            net = torch.empty((2 * n if ev1.cfg else n, xs.shape[1]), dtype=torch.float32, device=x.device)
            pred = step_params(self.family, g, step, phase=Phase.PREDICT, dup_next=ev1.cfg, seed=seed)
            fused_step(pred, xs, vf, vi, k1_out=k1, net_out=net, library=lib)
            vf, vi = self._net(net, ev1, y2 if ev1.cfg else y1)
            corr = step_params(self.family, g, step, phase=Phase.CORRECT, seed=seed)
            fused_step(corr, xs, vf, vi, k1=k1, x_out=out, library=lib)
        else:
            fused_step(step_params(self.family, g, step, seed=seed), xs, vf, vi, indices=idx, x_out=out, library=lib)
        return out.view_as(x)

    # -- a whole batch ------------------------------------------------------------------------
    def run(
        self,
        seed: int,
        indices: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Final states (N, C, H, W) float32 for the given sample indices and class labels."""
        device = torch.device(device) if device is not None else self.backend.device
        lib = self.library(device)
        if lib is None:
            return super().run(seed, indices, labels, device=device, on_step=on_step)
        indices, labels = self.prepare(indices, labels, device)
        n = indices.numel()
        shape = self.model.latent_shape
        launches = plan_launches(self.plan, self.sampler.guidance, seed)
        idx = indices.to(device).contiguous()
        # The state (N, E), the predictor slope and the network input (up to 2N rows): fixed buffers.
        x = gaussian(seed, idx, STREAM_INITIAL, shape, device=device, library=lib).reshape(n, -1)
        e = x.shape[1]
        max_rows = max([s.rows_in for s in launches] + [s.rows_mid for s in launches])
        net = torch.empty((max_rows * n, e), dtype=torch.float32, device=device)
        net[:n] = x
        if launches[0].rows_in == 2:
            net[n:] = x
        k1 = torch.empty_like(x) if any(s.step.kind == StepKind.HEUN for s in launches) else None
        first_bad = torch.full((n,), -1, dtype=torch.int64, device=device)
        y1, y2 = self._labels(labels)
        for k, sl in enumerate(launches):
            self._fused_step(lib, sl, x, k1, net, n, idx, first_bad, y1, y2)
            if (k + 1) % FINITE_CHECK_EVERY == 0 or k + 1 == len(launches):
                raise_if_nonfinite(first_bad, indices)
            if on_step is not None:
                on_step(k + 1, len(launches))
        return x.view(n, *shape)

    def _fused_step(self, lib: KernelLibrary, sl: StepLaunches, x: torch.Tensor, k1: torch.Tensor | None,
                    net: torch.Tensor, n: int, idx: torch.Tensor, first_bad: torch.Tensor, y1: torch.Tensor,
                    y2: torch.Tensor) -> None:
        """One plan step on the fixed buffers: x is updated in place, net holds the next network input."""
        step = sl.step
        ev0 = step.evals[0]
        vf, vi = self._net(net[: sl.rows_in * n], ev0, y2 if sl.rows_in == 2 else y1)
        nxt = net[: sl.rows_next * n] if sl.rows_next else None
        if step.kind == StepKind.HEUN:
            pred, corr = sl.launches
            fused_step(pred, x, vf, vi, k1_out=k1, net_out=net[: sl.rows_mid * n], library=lib)
            vf, vi = self._net(net[: sl.rows_mid * n], step.evals[1], y2 if sl.rows_mid == 2 else y1)
            fused_step(corr, x, vf, vi, k1=k1, x_out=x, net_out=nxt, first_bad=first_bad, library=lib)
        else:
            fused_step(sl.launches[0], x, vf, vi, indices=idx, x_out=x, net_out=nxt, first_bad=first_bad, library=lib)


def _kernel_ready(v: torch.Tensor) -> torch.Tensor:
    """Backends return float32 (the contract); others (bf16/fp16 engines) are read as they are."""
    if v.dtype not in _NET_DTYPES:
        v = v.float()
    return v.contiguous()
