"""Errors of the backend layer."""

from __future__ import annotations


class BackendError(RuntimeError):
    """A backend cannot be built or called as asked (unknown name, batch above its maximum, ...)."""


class BackendUnavailable(BackendError):
    """A backend's runtime (ONNX Runtime, TensorRT, a CUDA GPU) is missing here; the message says what to install."""
