"""The one error type of the metrics package (defined with every other user-facing error in igengine.errors)."""

from igengine.errors import MetricsError

__all__ = ["MetricsError"]
