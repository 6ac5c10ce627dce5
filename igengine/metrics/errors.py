"""The one error type of the metrics package: bad input (a file, a member, a shape), with a one-line message."""

from __future__ import annotations


class MetricsError(ValueError):
    """Input that the metrics cannot use; the message names the file and what would fix it."""


__all__ = ["MetricsError"]
