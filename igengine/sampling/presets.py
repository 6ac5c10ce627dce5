"""The sampler settings the IG paper reports per family, and how a run's settings are resolved.

Resolution, per field: the user's explicit settings > the checkpoint's own recommendation
(``igengine.sampler_defaults`` metadata) > the paper's settings for the family.
"""

from __future__ import annotations

from igengine.config import Family, GuidanceConfig, Precision, SamplerConfig, SamplerSettings, Solver


def paper_sampler(family: Family) -> SamplerConfig:
    """The sampling settings the IG paper reports for each family (docs/CONTRACTS.md, "Guidance").

    SiT-XL/2+IG: SDE Euler-Maruyama, 250 steps, CFG 1.35 for t <= 0.7, IG 1.4 always.
    LightningDiT-XL/1+IG: heun2 on 125 grid points, shift 0.3, CFG 1.45 for t >= 0.19, IG 1.4.
    """
    if family == Family.SIT:
        return SamplerConfig(
            solver=Solver.SDE,
            steps=250,
            guidance=GuidanceConfig(ig_scale=1.4, ig_interval=(0.0, 1.0), cfg_scale=1.35, cfg_interval=(0.0, 0.7)),
        )
    return SamplerConfig(
        solver=Solver.HEUN2,
        steps=125,
        timestep_shift=0.3,
        guidance=GuidanceConfig(ig_scale=1.4, ig_interval=(0.0, 1.0), cfg_scale=1.45, cfg_interval=(0.19, 1.0)),
    )


def resolve_sampler(family: Family, precision: Precision | str, checkpoint: SamplerSettings | None = None,
                    user: SamplerSettings | None = None) -> SamplerConfig:
    """The run's SamplerConfig: ``user`` over ``checkpoint`` over ``paper_sampler(family)``, at ``precision``."""
    base = paper_sampler(Family(family))
    base = SamplerConfig(solver=base.solver, steps=base.steps, guidance=base.guidance,
                         timestep_shift=base.timestep_shift, precision=Precision(precision))
    if checkpoint is not None:
        base = checkpoint.over(base, "the checkpoint's sampler defaults")
    if user is not None:
        base = user.over(base, "sampler settings")
    return base


__all__ = ["paper_sampler", "resolve_sampler"]
