"""``Sampler``: a plan, a network and a generator bound together, and the one place that picks the loop.

    sampler = Sampler(net, plan, ModelFacts.of(config), precision=Precision.FP32, device="cpu")
    latents = sampler(seed=0, indices=torch.arange(8), labels=torch.arange(8))   # (8, C, H, W) float32

Everything the sampler uses is an argument: the network callable, the plan (times, guidance), the
model facts, the precision (``igengine.precision.policy``: state dtype, fused kernels or not) and
the randomness (default: the kernel library's device generator where one is loaded, NumPy
otherwise; the same numbers). Which loop runs (``path``):
  * ``cuda-graph``: the captured loop (``igengine.sampling.captured``): network and fused step
    replayed from CUDA graphs, when the fused loop would run on CUDA, ``capture`` is 'auto' and the
    network declares ``capturable = True`` (the torch backend does; ONNX Runtime and TensorRT do not);
  * ``cuda`` / ``cpu-twin``: the fused loop (``igengine.sampling.fused``), for precisions with a
    float32 state when a kernel library is loaded for the device and the default randomness is used;
  * ``reference``: the plain loop (``igengine.sampling.loop``) otherwise.
A network that declares ``precision`` (every igengine backend does) must have been built for the
sampler's precision: a mismatch is a PrecisionMismatchError, never a silently mislabelled run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from igengine.config import Precision
from igengine.kernels import library as kernel_library
from igengine.kernels import trusted
from igengine.noise import check_indices, check_seed
from igengine.precision import PrecisionPolicy, check_network_precision, policy
from igengine.sampling.captured import PATH_CUDA_GRAPH, run_captured
from igengine.sampling.fused import run_fused
from igengine.sampling.loop import ModelFacts, Network, OnStep, run_reference
from igengine.sampling.plan import Plan
from igengine.sampling.randomness import Randomness, default_randomness, kernel_randomness

KERNEL_CHOICES = ("auto", "off")
CAPTURE_CHOICES = ("auto", "off")


@dataclass(frozen=True)
class Sampler:
    """Draws final latents for given (seed, sample indices, labels); holds no state between calls.

    net: ``(x, t, y) -> (v_final, v_inter)``; plan: ``igengine.sampling.plan.build_plan``; facts:
    ``ModelFacts``; precision: the run's precision; device: where the state lives; randomness: a
    ``Randomness`` (None = ``default_randomness(device)``); kernels: 'auto' (fused loop where
    possible) or 'off' (always the reference loop, for A/B comparisons); capture: 'auto' (CUDA
    graphs where the fused loop runs on CUDA and ``net.capturable`` is True) or 'off'.
    """

    net: Network
    plan: Plan
    facts: ModelFacts
    precision: Precision
    device: torch.device
    randomness: Randomness | None = None
    kernels: str = "auto"
    capture: str = "auto"
    numerics: PrecisionPolicy = field(init=False)
    _library: kernel_library.KernelLibrary | None = field(init=False, repr=False)
    _captured: bool = field(init=False, repr=False)
    _randomness: Randomness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "precision", Precision(self.precision))
        set_(self, "device", _resolve_device(self.device))
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"`kernels` must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.capture not in CAPTURE_CHOICES:
            raise ValueError(f"`capture` must be one of {', '.join(CAPTURE_CHOICES)}, got {self.capture!r}")
        self.facts.check_plan(self.plan)
        set_(self, "numerics", policy(self.precision, self.facts.family))
        check_network_precision(getattr(self.net, "precision", None), self.numerics)
        lib = None
        if self.kernels == "auto" and self.numerics.fused_kernels and self.randomness is None:
            lib = trusted.library_for(self.device)  # a CUDA build self-tested on this device first
        set_(self, "_library", lib)
        set_(self, "_captured", bool(self.capture == "auto" and lib is not None and lib.kind == "cuda"
                                     and getattr(self.net, "capturable", False) is True))
        # The fused loops draw in the kernel library they run on; the reference loop takes the argument.
        set_(self, "_randomness", self.randomness if self.randomness is not None else
             kernel_randomness(lib) if lib is not None else default_randomness(self.device))

    @property
    def path(self) -> str:
        """'cuda-graph', 'cuda', 'cpu-twin' or 'reference': the implementation of the step this sampler runs."""
        if self._captured:
            return PATH_CUDA_GRAPH
        if self._library is None:
            return kernel_library.PATH_REFERENCE
        return kernel_library.PATH_CUDA if self._library.kind == "cuda" else kernel_library.PATH_CPU

    @property
    def kernel_build(self) -> dict | None:
        """Which build of the kernels the fused step runs ({'build': 'cmake' or 'nvrtc', 'path', 'info'}),
        None on the reference path."""
        return None if self._library is None else self._library.build_facts(self.device)

    @property
    def generator(self) -> str:
        """Which generator of the noise contract draws the numbers ('cuda-kernel', 'cpu-twin' or 'numpy')."""
        return self._randomness.name

    def describe(self) -> dict:
        return {"step": self.path, "noise_generator": self.generator, **self.numerics.describe()}

    def __call__(self, seed: int, indices: Sequence[int] | np.ndarray | torch.Tensor,
                 labels: Sequence[int] | np.ndarray | torch.Tensor, on_step: OnStep | None = None) -> torch.Tensor:
        """Final latents (N, C, H, W) float32 on ``device`` for samples ``indices`` of ``seed`` with class ``labels``."""
        seed = check_seed(seed)
        indices = check_indices(indices)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != indices.shape[0]:
            raise ValueError(f"{labels.shape[0]} `labels` for {indices.shape[0]} sample `indices`")
        if self._captured:
            return run_captured(self.net, self.plan, self.facts, seed, indices, labels, device=self.device,
                                library=self._library, on_step=on_step)
        if self._library is not None:
            return run_fused(self.net, self.plan, self.facts, seed, indices, labels, device=self.device,
                             library=self._library, on_step=on_step)
        return run_reference(self.net, self.plan, self.facts, seed, indices, labels,
                             state_dtype=self.numerics.state_dtype, device=self.device, randn=self._randomness,
                             on_step=on_step)


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def sample(net: Network, plan: Plan, facts: ModelFacts, seed: int, indices, labels, *, precision: Precision | str,
           device: torch.device | str = "cpu", randomness: Randomness | None = None, kernels: str = "auto",
           capture: str = "auto", on_step: OnStep | None = None) -> torch.Tensor:
    """One call of a ``Sampler`` built from the same arguments (see its docstring)."""
    return Sampler(net, plan, facts, Precision(precision), torch.device(device), randomness, kernels, capture)(
        seed, indices, labels, on_step)


__all__ = ["CAPTURE_CHOICES", "KERNEL_CHOICES", "Sampler", "sample"]
