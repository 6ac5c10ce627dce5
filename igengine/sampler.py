"""Executes a solver plan with a backend: the reference sampling loop of igengine.

``generate_latents`` is a pure function of (backend weights, sampler config, seed, sample indices,
labels): the initial state and every SDE noise draw come from the noise contract
(``igengine.noise``), so a sample does not depend on which other samples share its batch.

Outside the CFG interval only the conditional rows are sent to the network (the official
LightningDiT code computes and discards the unconditional half; skipping it changes no output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from igengine.backends.base import Backend
from igengine.config import Family, ModelConfig, Precision, SamplerConfig
from igengine.guidance import cfg_combine, ig_combine
from igengine.noise import STREAM_INITIAL, gaussian
from igengine.solvers import (
    Evaluation,
    Plan,
    Step,
    StepKind,
    build_plan,
    euler_update,
    heun_correct,
    heun_predict,
    sde_update,
    sit_drift,
)

# How often (in steps) the loop looks at its non-finite flags; the flags themselves are updated on
# the device every step, so the report always names the first bad step.
FINITE_CHECK_EVERY = 16


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in the sampler state."""

    def __init__(self, step: int, indices: list[int]):
        self.step = step
        self.indices = indices
        shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        super().__init__(f"NaN/Inf in the latents at solver step {step} for sample indices [{shown}]")


def state_dtype(family: Family, precision: Precision) -> torch.dtype:
    """float64 only for SiT in ``reference`` mode (the official sampler's dtype); else float32."""
    return torch.float64 if (family == Family.SIT and Precision(precision) == Precision.REFERENCE) else torch.float32


class PlanRunner:
    """Runs one plan for one batch of samples. Stateless between batches."""

    def __init__(self, backend: Backend, sampler: SamplerConfig):
        self.backend = backend
        self.model: ModelConfig = backend.config
        self.sampler = sampler
        self.family = self.model.family
        self.plan: Plan = build_plan(self.family, sampler)
        self.dtype = state_dtype(self.family, sampler.precision)
        if sampler.guidance.uses_cfg and not self.model.has_null_class:
            raise ValueError(
                f"CFG needs a null-class row in the label table, but {self.model.name} was trained without "
                "label dropout (class_dropout_prob = 0); use --cfg-scale 1"
            )

    # -- network ------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.backend.max_batch
        if cap is None or x.shape[0] <= cap:
            return self.backend(x, t, y)
        parts = [self.backend(x[i : i + cap], t[i : i + cap], y[i : i + cap]) for i in range(0, x.shape[0], cap)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def field(self, x: torch.Tensor, y: torch.Tensor, ev: Evaluation, drift: bool) -> torch.Tensor:
        """The guided velocity (or, for the SiT SDE, the guided drift) at state x, time ev.t."""
        n = x.shape[0]
        g = self.sampler.guidance
        if ev.cfg:
            rows = torch.cat([x, x])
            labels = torch.cat([y, torch.full_like(y, self.model.null_class)])
        else:
            rows, labels = x, y
        # The official samplers build the time column in float64 (SiT) / float32 and cast to fp32.
        t_in = torch.full((rows.shape[0],), ev.t, dtype=torch.float64, device=x.device).float()
        v_final, v_inter = self._forward(rows.float(), t_in, labels)
        if self.family == Family.SIT:
            v_final = v_final.to(self.dtype)
            v = ig_combine(v_final, v_inter.to(self.dtype), g.ig_scale, self.family) if ev.ig else v_final
            f = sit_drift(v, rows, ev.t) if drift else v
        else:
            v = ig_combine(v_final, v_inter, g.ig_scale, self.family) if ev.ig else v_final
            f = v.to(self.dtype)
        if ev.cfg:
            f = cfg_combine(f[:n], f[n:], g.cfg_scale)
        return f

    # -- one step -----------------------------------------------------------------------------
    def advance(self, step: Step, x: torch.Tensor, y: torch.Tensor, seed: int, indices: torch.Tensor) -> torch.Tensor:
        if step.kind in (StepKind.SDE, StepKind.SDE_LAST):
            d = self.field(x, y, step.evals[0], drift=True)
            noise = None
            if step.kind == StepKind.SDE:
                noise = gaussian(seed, indices, step.noise_stream, x.shape[1:]).to(x.device, self.dtype)
            return sde_update(x, d, step, noise)
        k1 = self.field(x, y, step.evals[0], drift=False)
        if step.kind == StepKind.EULER:
            return euler_update(x, k1, step.dt)
        x_pred = heun_predict(x, k1, step, self.family)
        k2 = self.field(x_pred, y, step.evals[1], drift=False)
        return heun_correct(x, k1, k2, step, self.family)

    # -- a whole batch ------------------------------------------------------------------------
    @staticmethod
    def prepare(indices, labels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated sample indices (int64, CPU) and class labels (int64, on ``device``)."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).to(device)
        if labels.shape[0] != indices.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {indices.shape[0]} samples")
        if indices.numel() and int(indices.min()) < 0:
            raise ValueError("sample indices must be >= 0")
        return indices, labels

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
        indices, labels = self.prepare(indices, labels, device)
        x = gaussian(seed, indices, STREAM_INITIAL, self.model.latent_shape).to(device, self.dtype)
        first_bad = torch.full((x.shape[0],), -1, dtype=torch.int64, device=device)
        steps = self.plan.steps
        for k, step in enumerate(steps):
            x = self.advance(step, x, labels, seed, indices)
            bad = ~torch.isfinite(x).flatten(1).all(dim=1)
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step.index), first_bad)
            if (k + 1) % FINITE_CHECK_EVERY == 0 or k + 1 == len(steps):
                raise_if_nonfinite(first_bad, indices)
            if on_step is not None:
                on_step(k + 1, len(steps))
        return x.float()


def raise_if_nonfinite(first_bad: torch.Tensor, indices: torch.Tensor) -> None:
    """Raise NonFiniteError for the earliest step recorded in ``first_bad`` (-1 = row still finite)."""
    hit = first_bad >= 0
    if bool(hit.any()):
        first = int(first_bad[hit].min())
        rows = torch.nonzero(first_bad == first).flatten().cpu()
        raise NonFiniteError(first, indices[rows].tolist())


def generate_latents(
    backend: Backend,
    sampler: SamplerConfig,
    seed: int,
    indices,
    labels,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Convenience wrapper: build a PlanRunner and run one batch."""
    return PlanRunner(backend, sampler).run(seed, indices, labels, on_step=on_step)


__all__ = ["NonFiniteError", "PlanRunner", "generate_latents", "raise_if_nonfinite", "state_dtype"]
