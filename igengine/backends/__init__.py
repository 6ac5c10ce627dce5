"""Backends: run the IG DiT and return (v_final, v_inter). See ``base`` (the contract) and ``factory``.

May import: igengine.config, errors, precision, models, export.contract / export.tensorrt (to read
graphs and engines). Never the sampler, a job or a writer.
"""

from igengine.backends.base import Backend, network
from igengine.backends.factory import BACKENDS, Artifacts, BackendName, create_backend
from igengine.backends.torch_backend import TorchBackend
from igengine.errors import BackendError, BackendUnavailable

__all__ = ["Artifacts", "BACKENDS", "Backend", "BackendError", "BackendName", "BackendUnavailable", "TorchBackend",
           "create_backend", "network"]
