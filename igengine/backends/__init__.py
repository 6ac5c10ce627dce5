"""Backends: run the IG DiT and return (v_final, v_inter). See ``base.Backend`` and ``factory.create_backend``."""

from igengine.backends.base import Backend
from igengine.backends.errors import BackendError, BackendUnavailable
from igengine.backends.factory import BACKENDS, create_backend
from igengine.backends.torch_backend import TorchBackend

__all__ = ["BACKENDS", "Backend", "BackendError", "BackendUnavailable", "TorchBackend", "create_backend"]
