"""Export an IG DiT checkpoint to an ONNX graph with both outputs (see ``contract`` for the files).

Every family exports the same graph contract: an IGDiT's v_final / v_inter and a RAEv2DiT's x_full /
x_base (x-predictions) are the outputs "v_final" and "v_inter", the final and the intermediate head.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). The TorchScript exporter
(``dynamo=False``) cannot trace the model as written: ``unpatchify`` turns a token count into a
Python int (``int(round(t ** 0.5))``), which under tracing is a Tensor and fails; working around it
would mean changing the model or exporting a fixed batch size. The dynamo exporter traces it with a
symbolic batch dimension, decomposes SDPA into MatMul / Softmax / MatMul with q and k pre-scaled by
sqrt(1/sqrt(d)) (the pattern TensorRT's attention fusion expects), keeps RoPE as element-wise maths
and names the batch dimension "N". It needs opset >= 18.

After the export the graph is rewritten (``graph_passes``): Softmax in fp32 for low-precision
graphs, axis-permuting Einsums as Transpose, exporter debug metadata stripped; then the record is
stored in its metadata, ``onnx.checker`` runs a full check by path (external data included), and
only then do the files replace anything in the output folder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper

import igengine
from igengine.models.checkpoint import LoadedCheckpoint
from igengine.config import ModelConfig, Precision
from igengine.export.config import ExportConfig
from igengine.export.contract import (
    BATCH_DIM,
    DATA_FILE,
    GRAPH_CONTRACT,
    GRAPH_FILE,
    INPUT_NAMES,
    OUTPUT_NAMES,
    SIDECAR,
    GraphRecord,
    digest_files,
    external_files,
)
from igengine.errors import ExportError, interruption
from igengine.export.graph_passes import (
    einsum_permutations_to_transpose,
    precision_report,
    softmax_in_fp32,
    strip_debug_metadata,
)
from igengine.models import apply_precision
from igengine.store.atomic import atomic_write_json
from igengine.store.manifest import prepare_output_folder

_IO_TYPES = {"x": TensorProto.FLOAT, "t": TensorProto.FLOAT, "y": TensorProto.INT64,
             "v_final": TensorProto.FLOAT, "v_inter": TensorProto.FLOAT}


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it recorded (``sidecar`` is the content of export.json)."""

    folder: Path
    graph: Path
    sidecar: dict[str, Any]
    seconds: float


def exporter_name() -> str:
    import onnxscript

    return f"torch.onnx.export(dynamo=True), torch {torch.__version__}, onnxscript {onnxscript.__version__}"


def make_record(loaded: LoadedCheckpoint, config: ExportConfig) -> GraphRecord:
    """The record a graph of ``loaded`` exported with ``config`` carries."""
    return GraphRecord(contract=GRAPH_CONTRACT, model_config=loaded.config.to_dict(), checkpoint_sha256=loaded.sha256,
                       export=config, igengine_version=igengine.__version__, exporter=exporter_name())


def network_for(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """The network to export: ``model`` itself for fp32, else a copy cast by ``apply_precision``.

    The checkpoint's model is never modified (the copy costs one more model in memory for a moment).
    """
    model = model.eval().requires_grad_(False)
    if precision == Precision.FP32:
        return model
    return apply_precision(copy.deepcopy(model), precision)


def example_inputs(config: ModelConfig, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n,C,H,W] float32, t [n] float32, y [n] int64): the tracing inputs (n = 2 so N stays symbolic)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *config.latent_shape, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, config.num_classes, (n,), generator=g)
    return x, t, y


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout and logs optional-op warnings: keep stdout for results."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torch_to_onnx(model: torch.nn.Module, opset: int, path: Path) -> None:
    """Trace ``model`` with a dynamic batch "N" and save it to ``path`` with external data beside it."""
    batch = torch.export.Dim(BATCH_DIM)
    shapes = {name: {0: batch} for name in INPUT_NAMES}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(model, example_inputs(model.config), None, input_names=list(INPUT_NAMES),
                                        output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=True,
                                        dynamic_shapes=shapes, optimize=True)
            program.save(str(path), external_data=True)
    except Exception as e:  # the exporter raises many types; all mean the same to the caller
        if (stop := interruption(e)) is not None:  # a stop (no Exception itself) that the exporter wrapped
            raise stop from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed for {model.config.name} at opset {opset}: {first}") from None


def check_io(proto: onnx.ModelProto, config: ModelConfig, where: Path) -> None:
    """Assert the graph's inputs and outputs are exactly the contract's (names, dtypes, shapes)."""
    c, h, w = config.latent_shape
    want_shape = {"x": [BATCH_DIM, c, h, w], "t": [BATCH_DIM], "y": [BATCH_DIM],
                  "v_final": [BATCH_DIM, c, h, w], "v_inter": [BATCH_DIM, c, h, w]}
    got = {}
    for vi in [*proto.graph.input, *proto.graph.output]:
        tt = vi.type.tensor_type
        got[vi.name] = (tt.elem_type, [d.dim_param or d.dim_value for d in tt.shape.dim])
    want = {name: (_IO_TYPES[name], want_shape[name]) for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    if got != want:
        raise ExportError(f"exported graph {where} breaks the graph contract: inputs/outputs {got}, expected {want}")


def prepare_export_folder(out: Path, record: GraphRecord, overwrite: bool) -> None:
    """Check ``out`` can take this export; refuse one holding an export of something else unless ``overwrite``."""
    prepare_output_folder(out, {"export": record.to_dict()}, overwrite)
    sidecar = out / SIDECAR
    if sidecar.exists() and not overwrite:
        try:
            existing = json.loads(sidecar.read_text()).get("record")
        except (OSError, ValueError):
            existing = None
        if existing != record.to_dict():
            raise ExportError(
                f"{out} holds an export of another checkpoint, config, precision, opset or igengine version "
                f"({SIDECAR}); choose another `out` or pass `overwrite`"
            )


def export_onnx(loaded: LoadedCheckpoint, config: ExportConfig, out: str | Path, overwrite: bool = False) -> ExportResult:
    """Export ``loaded`` as ``out/model.onnx`` (+ ``model.onnx.data``, ``export.json``).

    Graph: x [N,C,H,W] float32, t [N] float32, y [N] int64 -> v_final, v_inter [N,C,H,W] float32,
    N dynamic. Everything is written to a temporary folder inside ``out`` and checked before it
    replaces any file there, so a failed export leaves earlier files untouched. ``loaded.model`` is
    not modified.
    """
    out = Path(out)
    record = make_record(loaded, config)
    prepare_export_folder(out, record, overwrite)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        graph = tmp / GRAPH_FILE
        network = network_for(loaded.model, config.precision)
        torch_to_onnx(network, config.opset, graph)
        del network
        export_s = time.perf_counter() - t0

        proto = onnx.load(str(graph), load_external_data=False)
        strip_debug_metadata(proto)
        passes = {"softmax_fp32": softmax_in_fp32(proto), "einsum_to_transpose": einsum_permutations_to_transpose(proto)}
        check_io(proto, loaded.config, graph)
        helper.set_model_props(proto, record.to_metadata())
        proto.doc_string = (f"igengine IG DiT {loaded.config.name} ({config.precision.value}): x [N,C,H,W] float32, "
                            "t [N] float32, y [N] int64 -> v_final, v_inter [N,C,H,W] float32")
        report = precision_report(proto)
        onnx.save_model(proto, str(graph))
        del proto
        try:
            onnx.checker.check_model(str(graph), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported graph fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
        data = external_files(graph)
        if [p.name for p in data] not in ([DATA_FILE], []):
            raise ExportError(f"exported graph references unexpected external data files {[p.name for p in data]}")
        whole, per_file = digest_files(graph)
        sidecar = {
            "record": record.to_dict(),
            "graph_sha256": whole,
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha} for name, sha in per_file.items()},
            "graph": {
                "inputs": {"x": "[N,C,H,W] float32", "t": "[N] float32", "y": "[N] int64"},
                "outputs": {"v_final": "[N,C,H,W] float32", "v_inter": "[N,C,H,W] float32"},
                "latent_shape": list(loaded.config.latent_shape),
                "external_data": f"every initializer above 256 bytes lives in {DATA_FILE}",
            },
            "passes": passes,
            "precision_report": report,
            "checkpoint": {"path": str(loaded.path), "weights": loaded.weights, "resolution_notes": loaded.notes},
            "timing": {"torch_export_s": round(export_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(tmp / SIDECAR, sidecar)
        # Weights first, the graph that points at them next, the sidecar last.
        for name in (DATA_FILE, GRAPH_FILE, SIDECAR):
            if (tmp / name).exists():
                os.replace(tmp / name, out / name)
            elif name == DATA_FILE and (out / name).exists():
                (out / name).unlink()  # a stale weights file of an earlier export
        return ExportResult(out, out / GRAPH_FILE, sidecar, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
