"""Sampling: plans, the guidance + solver maths, and the loops that run a plan with any network.

  plan        Plan / Step / Evaluation and build_plan (every scalar of a run, precomputed)
  updates     the per-element maths of one step (SDE drift and update, Euler, Heun)
  guidance    IG and CFG, in the official order
  randomness  the noise contract's generators (NumPy reference, kernel library on the device)
  loop        the reference loop (pure functions of network, plan, facts and randomness)
  launches    a plan as fused-kernel launches (the per-step scalars)
  fused       the fused loop (one kernel between network calls)
  captured    the captured loop (network + fused kernel replayed from CUDA graphs, one per row count)
  sampler     Sampler: binds network, plan, facts, precision and randomness; picks the loop, and falls
              back down the ladder captured -> fused -> reference when a fast loop fails
  preflight   each fast rung compared with the reference on a short plan before a run trusts it
  presets     the paper's settings per family, and how a run's settings are resolved

May import: igengine.config, errors, noise, precision, kernels. Never a backend, a job or a writer.
"""

from igengine.sampling.loop import ModelFacts, Network
from igengine.sampling.plan import Evaluation, Plan, Step, StepKind, build_plan
from igengine.sampling.presets import paper_sampler, resolve_sampler
from igengine.sampling.randomness import Randomness, default_randomness
from igengine.sampling.sampler import Fallback, FallbackWarning, Sampler, sample

__all__ = ["Evaluation", "Fallback", "FallbackWarning", "ModelFacts", "Network", "Plan", "Randomness", "Sampler", "Step",
           "StepKind", "build_plan", "default_randomness", "paper_sampler", "resolve_sampler", "sample"]
