"""What an export is asked to produce: the frozen ``ExportConfig`` saved beside every artifact.

Opsets: graphs come from ``torch.onnx.export(dynamo=True)``, which emits opset 18 operators (e.g.
``Split`` with ``num_outputs``) even when asked for less, so opsets below 18 are refused rather than
written as invalid graphs. The upper bound is the newest opset the installed torch exporter knows.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch

from igengine.config import Precision
from igengine.errors import ExportError

MIN_OPSET = 18
MAX_OPSET: int = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 23)
# 18 is read by ONNX Runtime >= 1.14 and by the TensorRT 10.x and 11.x ONNX parsers.
DEFAULT_OPSET = 18
# Largest number of rows (samples, CFG rows included) per network call; see ``ExportConfig``.
DEFAULT_MAX_BATCH = 64

# Precisions a graph can be exported in. ``reference`` runs the fp32 graph (``graph_precision``).
GRAPH_PRECISIONS: tuple[Precision, ...] = (Precision.FP32, Precision.FP16, Precision.BF16)


class ExportFormat(str, enum.Enum):
    """ONNX: the graph only. TENSORRT: the graph, then a TensorRT engine built from it."""

    ONNX = "onnx"
    TENSORRT = "tensorrt"


def graph_precision(precision: Precision | str) -> Precision:
    """The precision of the graph a sampling precision runs: ``reference`` and ``fp32`` share the fp32 graph."""
    p = Precision(precision)
    return Precision.FP32 if p in (Precision.REFERENCE, Precision.TF32) else p


@dataclass(frozen=True)
class ExportConfig:
    """How a checkpoint is turned into a graph.

    precision: fp32 | fp16 | bf16. Low precision casts exactly what ``igengine.models.apply_precision``
        casts (attention and MLP weights); the exporter then moves every Softmax back to fp32.
    opset: ONNX default-domain opset, in [MIN_OPSET, MAX_OPSET].
    max_batch: the largest number of rows one network call may carry (a CFG call carries 2N rows for
        N samples). The ONNX graph itself is batch-dynamic; backends built from it report this value
        as ``max_batch`` and the sampler splits larger calls. TensorRT engines are built for it.
    """

    precision: Precision = Precision.FP32
    opset: int = DEFAULT_OPSET
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        try:
            precision = Precision(self.precision)
        except ValueError:
            raise ExportError(
                f"unknown `precision` {self.precision!r}; choose from {', '.join(p.value for p in GRAPH_PRECISIONS)}"
            ) from None
        if precision not in GRAPH_PRECISIONS:
            raise ExportError(
                f"`precision` {precision.value} has no graph of its own (it runs the fp32 graph); "
                f"export with `precision` {', '.join(p.value for p in GRAPH_PRECISIONS)}"
            )
        object.__setattr__(self, "precision", precision)
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(
                f"unsupported `opset` {self.opset}: the torch.onnx dynamo exporter needs opset >= {MIN_OPSET} and "
                f"torch {torch.__version__} writes at most {MAX_OPSET}; choose {MIN_OPSET}..{MAX_OPSET}"
            )
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ExportError(f"`max_batch` must be an integer >= 1, got {self.max_batch}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportConfig":
        return cls(precision=Precision(d["precision"]), opset=int(d["opset"]), max_batch=int(d["max_batch"]))
