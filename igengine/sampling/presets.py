"""The sampler settings the IG paper reports per family, and how a run's settings are resolved.

Resolution, per field: the user's explicit settings > the checkpoint's own recommendation
(``igengine.sampler_defaults`` metadata) > the paper's settings for the family.
"""

from __future__ import annotations

from igengine.config import Family, GuidanceConfig, Precision, SamplerConfig, SamplerSettings, Solver
from igengine.sampling.plan import raev2_default_shift

# RAEv2's latent (DINOv3-L, 1024 x 16 x 16): its paper preset's shift sqrt(262144 / 4096) = 8.
RAEV2_LATENT = (1024, 16, 16)


def paper_sampler(family: Family, latent_shape: tuple[int, int, int] | None = None) -> SamplerConfig:
    """The sampling settings the papers report for each family (docs/CONTRACTS.md, "Guidance").

    SiT-XL/2+IG: SDE Euler-Maruyama, 250 steps, CFG 1.35 for t <= 0.7, IG 1.4 always.
    LightningDiT-XL/1+IG: heun2 on 125 grid points, shift 0.3, CFG 1.45 for t >= 0.19, IG 1.4.
    RAEv2 DiT-DDT+IG (configs/stage2/sampling/imagenet-dinov3l-k7.yaml): Euler, 100 steps, shift
    sqrt(latent numel / 4096) (8 for ``latent_shape`` 1024 x 16 x 16, the default), IG 1.78 for
    0.10 <= t <= 1, CFG off.
    """
    if family == Family.RAEV2:
        return SamplerConfig(
            solver=Solver.EULER,
            steps=100,
            timestep_shift=raev2_default_shift(latent_shape or RAEV2_LATENT),
            guidance=GuidanceConfig(ig_scale=1.78, ig_interval=(0.10, 1.0), cfg_scale=1.0, cfg_interval=(0.0, 1.0)),
        )
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
                    user: SamplerSettings | None = None,
                    latent_shape: tuple[int, int, int] | None = None) -> SamplerConfig:
    """The run's SamplerConfig: ``user`` over ``checkpoint`` over ``paper_sampler(family, latent_shape)``, at
    ``precision``."""
    base = paper_sampler(Family(family), latent_shape)
    base = SamplerConfig(solver=base.solver, steps=base.steps, guidance=base.guidance,
                         timestep_shift=base.timestep_shift, precision=Precision(precision))
    if checkpoint is not None:
        base = checkpoint.over(base, "the checkpoint's sampler defaults")
    if user is not None:
        base = user.over(base, "sampler settings")
    return base


__all__ = ["paper_sampler", "resolve_sampler"]
