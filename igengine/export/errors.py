"""Errors of the export layer. Every message names the file or flag at fault and what would fix it."""

from __future__ import annotations


class ExportError(ValueError):
    """An export request that cannot be carried out as given (bad flag, unusable output folder, ...)."""


class GraphMismatchError(ExportError):
    """An exported graph or engine was made for another checkpoint, model config, precision or device."""
