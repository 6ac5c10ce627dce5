"""The preflight of a run: its fast rungs compared with the reference on this device before the first chunk.

``igengine.sampling.preflight`` holds the check itself (the short plan, the rungs, the bounds and
their reasons, the cost); here it is wired to a run: the networks it needs are made from the run's
backend, the verdict is acted on, and what happened is reported.

  * networks: the run's own (``backends.network(backend)``); for the compiled backend the eager
    network of the same module at the same precision (``EagerNetwork``); for a low-precision run
    (bf16, fp16, tf32) the same weights in fp32 without TF32 (``fp32_network``: a copy of the
    module cast to fp32, or for tf32 the same module with TF32 off), freed after the check.
  * verdict: the Sampler of the run is built on the rung that passed (``kernels='off'`` or
    ``capture='off'`` when a fast step rung failed); a compiled network that failed is replaced by
    the eager torch backend. Each demotion is one RuntimeWarning (all of a run's in one line) and
    the manifest's ``preflight`` entry (what was compared, the measured error, the bound, the
    verdict, the rung chosen).
  * cost: the seconds go to ``SetupLog.seconds['preflight_s']`` (the manifest's timing, and part of
    its ``setup_s``); a compiled backend is warmed up (compiled) before the check, so its compile is
    not counted as the check's.

``--preflight off`` (``SampleJob.preflight``, ``igengine.load(preflight=...)``) skips it: the
Sampler is built as asked and the manifest says the check was skipped.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from igengine.backends import BackendName, network
from igengine.config import Precision, SamplerConfig
from igengine.errors import interruption
from igengine.jobs.backend import build_backend, sampler_for
from igengine.models import apply_precision
from igengine.precision import numerics, policy
from igengine.sampling import ModelFacts, Sampler, build_plan
from igengine.sampling.preflight import Preflight, run_preflight, step_rungs
from igengine.sampling.sampler import Fallback, is_runtime_failure, one_line

if TYPE_CHECKING:
    from igengine.export.cache import SetupLog
    from igengine.models.checkpoint import LoadedCheckpoint

PREFLIGHT_CHOICES = ("auto", "off")


class EagerNetwork:
    """An IG DiT module called eagerly, as the torch backend calls it: ``(x, t, y) -> (v_final, v_inter)``
    float32, under the numerics (TF32 or not) of ``precision``, in inference mode."""

    capturable = False

    def __init__(self, model: torch.nn.Module, precision: Precision | str):
        self.model = model
        self.precision = Precision(precision)
        self.policy = policy(self.precision, model.config.family)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with numerics(self.policy):
            v_final, v_inter = self.model(x.float(), t.float(), y)
        return v_final.float(), v_inter.float()


def _module(backend, loaded: LoadedCheckpoint | None) -> torch.nn.Module | None:
    """The PyTorch module behind a backend (torch, compiled), else the checkpoint's (graph backends)."""
    model = getattr(backend, "model", None)
    if isinstance(model, torch.nn.Module):
        return model
    model = getattr(loaded, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def fp32_network(model: torch.nn.Module, precision: Precision, device: torch.device) -> EagerNetwork | None:
    """The same weights as ``model`` in fp32 without TF32, or None where the run's network is that already.

    bf16/fp16: a copy of the module with every weight cast to fp32 (the low-precision weights' exact
    values: only the arithmetic changes) on ``device``; tf32: the module itself, called with TF32 off.
    """
    p = policy(precision, model.config.family)
    if p.network_dtype == torch.float32 and not p.allow_tf32:
        return None
    if p.network_dtype == torch.float32:
        return EagerNetwork(model, Precision.FP32)
    from igengine.backends.cpu_linear import route_linears

    twin = copy.deepcopy(model)
    route_linears(twin, fast=False)  # plain nn.Linear: no packed or widened low-precision weights carried over
    twin = apply_precision(twin.float(), Precision.FP32).to(device)
    return EagerNetwork(twin, Precision.FP32)


def preflight_sampler(backend, loaded: LoadedCheckpoint | None, sampler_cfg: SamplerConfig, device: torch.device,
                      *, capture: str = "auto", mode: str = "auto", seed: int = 0, labels=None, n: int = 0,
                      setup: SetupLog | None = None, log=None,
                      on_fallback: Callable[[Fallback], None] | None = None) -> tuple[Sampler, object, dict]:
    """The run's Sampler (and backend) on the fastest rungs that passed the preflight, and its manifest entry.

    backend: the run's backend (a compiled one that fails is replaced by the torch backend of
    ``loaded``). capture: the run's `capture`. mode: 'auto' (check) or 'off' (skip). seed, labels:
    the run's seed and labels (the check draws indices 0 and 1 with labels[:2]); n: the run's sample
    count (for the FLOP share). setup: where the seconds go (``preflight_s``); log: one line per check.
    on_fallback: the Sampler's report of a fall back at run time (its ladder, below what the check chose).
    """
    if mode not in PREFLIGHT_CHOICES:
        from igengine.errors import JobError

        raise JobError(f"unknown `preflight` {mode!r}; choose {' or '.join(PREFLIGHT_CHOICES)}")
    if mode == "off":
        return (sampler_for(backend, sampler_cfg, device=device, capture=capture, on_fallback=on_fallback), backend,
                {"mode": "off", "note": "skipped (`preflight` off): the fast rungs run unchecked"})
    precision = sampler_cfg.precision
    compiled = getattr(backend, "name", None) == BackendName.COMPILED.value
    as_asked = sampler_for(backend, sampler_cfg, device=device, capture=capture,  # a CUDA build self-tests here
                           on_fallback=on_fallback)
    if not step_rungs(as_asked) and not compiled:
        return as_asked, backend, {"mode": "auto", "compared": [], "chosen": {"step": as_asked.path},
                                   "note": "nothing to compare: the run takes the reference loop and the eager network"}
    if compiled and not backend.warm:
        try:
            backend.warmup()  # the compile belongs to the backend's set-up, not to the check (announced on `setup`)
        except Exception as e:  # noqa: BLE001 - Dynamo's and Inductor's errors have many types
            if (stop := interruption(e)) is not None:  # a stop that a library wrapped is still a stop
                raise stop from None
            if not is_runtime_failure(e):
                raise
            # A compile that fails is the compiled rung failing: the eager torch backend runs instead.
            backend = build_backend(BackendName.TORCH, loaded, precision, device)
            compiled = False
            warnings.warn(f"the compiled backend could not compile ({one_line(e)}); the run uses the eager torch "
                          "backend of the same precision (`backend` torch starts a run there)", RuntimeWarning,
                          stacklevel=2)
            if not step_rungs(sampler_for(backend, sampler_cfg, device=device, capture=capture)):
                return (sampler_for(backend, sampler_cfg, device=device, capture=capture, on_fallback=on_fallback),
                        backend, {"mode": "auto", "compared": [], "compile_failed": one_line(e),
                                  "note": "the compiled backend failed to compile; the eager network runs the "
                                          "reference loop: nothing to compare"})
    t0 = time.perf_counter()
    model = _module(backend, loaded)
    plain = EagerNetwork(model, precision) if compiled and model is not None else None
    fp32 = fp32_network(model, precision, device) if model is not None else None
    result: Preflight = run_preflight(
        network(backend) if hasattr(backend, "precision") else backend, build_plan(backend.config.family, sampler_cfg),
        ModelFacts.of(backend.config), precision, device, seed=seed, labels=labels, capture=capture, plain_net=plain,
        fp32_net=fp32, network_rung=compiled, run_samples=n)
    del fp32, plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not result.network_ok:
        backend = build_backend(BackendName.TORCH, loaded, precision, device)
    sampler = sampler_for(backend, sampler_cfg, device=device, kernels=result.kernels, capture=result.capture,
                          on_fallback=on_fallback)
    seconds = time.perf_counter() - t0  # the check, its fp32 copy of the network, and acting on it
    if setup is not None:
        setup.took("preflight_s", seconds)
    warning = result.warning
    if warning is not None:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    elif log is not None and result.compared:
        worst = ", ".join(f"{c.rung} {c.max_abs:.2g} <= {c.bound:.2g}" for c in result.checks)
        log(f"preflight: every fast rung agrees with the reference on {device} ({worst}; {len(result.plan)} steps "
            f"of {result.samples} samples, {seconds:.2f} s)")
    return sampler, backend, {"mode": "auto", **result.to_dict(), "seconds": round(seconds, 3)}


__all__ = ["PREFLIGHT_CHOICES", "EagerNetwork", "fp32_network", "preflight_sampler"]
