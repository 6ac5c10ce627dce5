"""Export: ONNX graphs with both IG outputs, and TensorRT engines built from them.

  config       ExportConfig / ExportFormat (what to produce; saved beside every artifact)
  contract     the graph's files, inputs/outputs and self-description, and how runs check it
  onnx         the exporter (torch.onnx dynamo) and its post-processing   [needs onnx, onnxscript]
  graph_passes ONNX rewrites and the low-precision report                [needs onnx]
  cache        graphs exported on demand, keyed by checkpoint + config + precision + exporter
  integrity    a graph's files checked against the sizes and sha256s its export.json records
  tensorrt     optimization profiles, engine cache, timing cache, builder [needs tensorrt + GPU]
  job          `igengine export` as a library call

Importing this package imports neither onnx, onnxruntime nor tensorrt.
"""

from igengine.export.config import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportConfig, ExportFormat, graph_precision
from igengine.errors import ExportError, GraphMismatchError

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_OPSET", "ExportConfig", "ExportError", "ExportFormat", "GraphMismatchError",
           "graph_precision"]
