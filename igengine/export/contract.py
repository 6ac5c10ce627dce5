"""The contract of an exported graph: its files, what it records about itself, and how a run checks it.

An export folder holds
  model.onnx        the graph (inputs x [N,C,H,W] float32, t [N] float32, y [N] int64; outputs
                    v_final and v_inter, [N,C,H,W] float32; N is the symbolic dimension "N")
  model.onnx.data   the weights, as ONNX external data, always (every tensor above onnx_ir's 256-byte
                    threshold): the .onnx stays a few MB, far below protobuf's 2 GiB limit, for any model
  export.json       the sidecar: this record plus file digests, the precision report and timings
The record is also stored in the graph's own ``metadata_props`` (keys ``igengine.*``); the graph is
authoritative, the sidecar is for people and tools that do not read ONNX.

A backend refuses a graph whose record names another checkpoint (sha256 of the checkpoint file),
another architecture (every ModelConfig field except the ``*_source`` notes) or another precision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igengine.models.checkpoint import LoadedCheckpoint
from igengine.config import Precision
from igengine.export.config import ExportConfig, graph_precision
from igengine.errors import ExportError, GraphMismatchError

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SIDECAR = "export.json"
INPUT_NAMES = ("x", "t", "y")
OUTPUT_NAMES = ("v_final", "v_inter")
BATCH_DIM = "N"
# Bumped whenever the graph's inputs, outputs or numerics change meaning.
GRAPH_CONTRACT = 1

_PREFIX = "igengine."


def architecture(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ModelConfig dict that change the network (drops the ``*_source`` notes)."""
    return {k: v for k, v in config_dict.items() if not k.endswith("_source")}


@dataclass(frozen=True)
class GraphRecord:
    """What an exported graph says about itself."""

    contract: int
    model_config: dict[str, Any]
    checkpoint_sha256: str
    export: ExportConfig
    igengine_version: str
    exporter: str

    def to_metadata(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props``."""
        return {
            _PREFIX + "graph_contract": str(self.contract),
            _PREFIX + "model_config": json.dumps(self.model_config, sort_keys=True),
            _PREFIX + "checkpoint_sha256": self.checkpoint_sha256,
            _PREFIX + "precision": self.export.precision.value,
            _PREFIX + "opset": str(self.export.opset),
            _PREFIX + "max_batch": str(self.export.max_batch),
            _PREFIX + "version": self.igengine_version,
            _PREFIX + "exporter": self.exporter,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: Path) -> "GraphRecord":
        try:
            return cls(
                contract=int(meta[_PREFIX + "graph_contract"]),
                model_config=json.loads(meta[_PREFIX + "model_config"]),
                checkpoint_sha256=meta[_PREFIX + "checkpoint_sha256"],
                export=ExportConfig(precision=Precision(meta[_PREFIX + "precision"]), opset=int(meta[_PREFIX + "opset"]),
                                    max_batch=int(meta[_PREFIX + "max_batch"])),
                igengine_version=meta[_PREFIX + "version"],
                exporter=meta[_PREFIX + "exporter"],
            )
        except (KeyError, ValueError) as e:
            raise GraphMismatchError(
                f"{where} is not an igengine graph (its metadata lacks or garbles {e}); export it with `igengine export`"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph_contract": self.contract,
            "model_config": self.model_config,
            "checkpoint_sha256": self.checkpoint_sha256,
            "export": self.export.to_dict(),
            "igengine_version": self.igengine_version,
            "exporter": self.exporter,
        }


def import_onnx(exporter: bool = False):
    """The ``onnx`` module (and, with ``exporter``, a check for onnxscript), or ExportError naming what to install."""
    try:
        import onnx

        if exporter:
            import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter is built on it)
    except ImportError:
        raise ExportError("reading or writing ONNX graphs needs onnx (and onnxscript to export): "
                          "pip install 'igengine[onnx]'") from None
    return onnx


def graph_path(path: str | Path) -> Path:
    """The .onnx file of ``path``, which may name the file itself or an export folder."""
    path = Path(path)
    if path.is_dir():
        path = path / GRAPH_FILE
    if not path.is_file():
        raise ExportError(f"no ONNX graph at {path} (give a .onnx file or an export folder holding {GRAPH_FILE})")
    return path


def read_record(path: str | Path) -> GraphRecord:
    """The record stored in a graph's metadata (reads the graph structure only, not its weights)."""
    onnx = import_onnx()
    path = graph_path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... for a file that is not ONNX
        raise ExportError(f"cannot read ONNX graph {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return GraphRecord.from_metadata({p.key: p.value for p in proto.metadata_props}, path)


def mismatches(record: GraphRecord, loaded: LoadedCheckpoint, precision: Precision | str) -> list[str]:
    """What differs between a graph's record and the checkpoint, config and precision of a run."""
    problems = []
    if record.contract != GRAPH_CONTRACT:
        problems.append(f"graph contract v{record.contract} (this igengine reads v{GRAPH_CONTRACT})")
    if record.checkpoint_sha256 != loaded.sha256:
        problems.append(f"checkpoint sha256 {record.checkpoint_sha256[:16]}... but {loaded.path.name} has {loaded.sha256[:16]}...")
    want, have = architecture(loaded.config.to_dict()), architecture(record.model_config)
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            problems.append(f"{key}={have.get(key)!r} in the graph but {want.get(key)!r} for this run")
    if record.export.precision != graph_precision(precision):
        problems.append(f"precision {record.export.precision.value} but this run needs the "
                        f"{graph_precision(precision).value} graph")
    return problems


def verify_record(record: GraphRecord, loaded: LoadedCheckpoint, precision: Precision | str, where: Path) -> None:
    """Raise GraphMismatchError naming every difference between the graph and the run."""
    problems = mismatches(record, loaded, precision)
    if problems:
        raise GraphMismatchError(
            f"{where} does not match this run: " + "; ".join(problems)
            + " (export a graph for it with `igengine export`, or omit `onnx` to use the export cache)"
        )


def external_files(path: Path) -> list[Path]:
    """The external-data files a graph references, sorted by location."""
    onnx = import_onnx()
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in init.external_data if e.key == "location")
    return [path.parent / loc for loc in sorted(locations)]


def digest_files(path: Path, chunk: int = 1 << 22) -> tuple[str, dict[str, str]]:
    """(graph sha256, {file name: sha256}) of a graph and its external data, in one read of each file.

    The graph sha256 runs over the .onnx file followed by each external-data file (sorted by
    location): it identifies the whole graph, weights included. TensorRT engines are cached under it.
    """
    whole, per_file = hashlib.sha256(), {}
    for f in [path, *external_files(path)]:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
                whole.update(block)
        per_file[f.name] = h.hexdigest()
    return whole.hexdigest(), per_file


def graph_sha256(path: str | Path) -> str:
    """sha256 of a whole graph, weights included (see ``digest_files``)."""
    return digest_files(graph_path(path))[0]
