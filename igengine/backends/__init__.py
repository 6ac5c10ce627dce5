"""Backends: run the IG DiT and return (v_final, v_inter). See ``base.Backend``."""

from igengine.backends.base import Backend
from igengine.backends.torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend"]
