"""Shared fixtures: tiny IG models of both families with every parameter random (no identity layers)."""

from __future__ import annotations

import pytest
import torch

from igengine.config import Family, ModelConfig
from igengine.models import IGDiT

TINY = {
    "sit": ModelConfig(family=Family.SIT, name="SiT-tiny", input_size=8, patch_size=2, in_channels=4,
                       hidden_size=64, depth=3, num_heads=4, encoder_depth=1, num_classes=10, qk_norm=True),
    "lightningdit": ModelConfig(family=Family.LIGHTNINGDIT, name="LightningDiT-tiny", input_size=4, patch_size=1,
                                in_channels=8, hidden_size=64, depth=3, num_heads=4, encoder_depth=2, num_classes=10,
                                qk_norm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True),
}


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return model.eval()


def assert_low_precision_rule(want, got, naive) -> None:
    """Each output of a low-precision network (``got``) is float32 and no worse than twice the naive
    autocast run of the same weights (``naive``), on the max and on the mean, against fp32 (``want``)."""
    for w, g, n in zip(want, got, naive):
        assert g.dtype == torch.float32
        err, naive_err = (g.double() - w).abs(), (n.double() - w).abs()
        assert naive_err.max() > 0
        assert err.max() <= 2 * naive_err.max() and err.mean() <= 2 * naive_err.mean()


def tiny_model(family: str, seed: int = 0, **overrides) -> IGDiT:
    cfg = TINY[family].replace(**overrides) if overrides else TINY[family]
    return randomize_(IGDiT(cfg), seed)


@pytest.fixture(params=["sit", "lightningdit"])
def family_name(request):
    return request.param


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same torch RNG state, so unseeded draws are reproducible too."""
    torch.manual_seed(0)
    yield


from igengine.jobs.backend import sampler_for  # noqa: E402,F401  (the one helper runs and tests share)


@pytest.fixture(scope="session")
def twin():
    """The CPU twin of the fused kernels, built (incrementally) from csrc/ for the tests and loaded."""
    from igengine.kernels.build import BuildError
    from tests import kernel_parity as P

    missing = P.twin_tools_missing()
    if missing:
        pytest.skip(missing)
    try:
        return P.build_twin()
    except BuildError as exc:
        pytest.fail(f"building the CPU twin failed: {exc}")


@pytest.fixture
def twin_discovered(twin, monkeypatch):
    """The library search finds the test build (the Sampler and the custom ops look their library up)."""
    from igengine.kernels import library

    monkeypatch.setenv(library.ENV_DIR, str(twin.path.parent))
    monkeypatch.delenv(library.ENV_SWITCH, raising=False)
    library._reset_for_tests()
    yield twin
    library._reset_for_tests()
