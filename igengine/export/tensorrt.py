"""TensorRT engines from an exported graph: optimization profiles, engine cache, timing cache, builder.

TensorRT versions: 10.x and 11.x, through the same code. The network is always *strongly typed*:
every tensor keeps the dtype the ONNX graph gives it, so the precision policy of the graph
(``igengine.export.graph_passes``: fp16/bf16 attention and MLP, fp32 norms, Softmax, adaLN and
heads) is what runs. TensorRT 11 removed the weak-typing builder flags (FP16, BF16, INT8, FP8,
OBEY_PRECISION_CONSTRAINTS) and is strongly typed always, so no precision flag is ever set; in 10.x
strong typing is asked for with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (deprecated and
ignored in 11, so it is passed to 10.x only). TF32 is switched off where the flag exists, so fp32
tensors get fp32 arithmetic, as in the torch backend.

Nothing here imports ``tensorrt`` at module import; every entry point that needs it calls
``import_tensorrt`` and raises ``BackendUnavailable`` (naming what to install) when it is missing,
as does ``require_gpu`` without a CUDA GPU.

Caches, under ``cache_root()/tensorrt``:
  engines/<digest>.engine + <digest>.json   one engine per ``EngineKey`` (graph sha256, TensorRT
                                            version, GPU name and compute capability, precision,
                                            batch profiles, builder settings); the JSON holds the
                                            key and is compared in full before an engine is used.
  timing/<trt>-<gpu>-sm<cc>.cache           the persistent builder timing cache, one per TensorRT
                                            version and GPU (timings are only valid there).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from igengine.errors import BackendUnavailable
from igengine.export.cache import SetupLog, cache_root
from igengine.export.contract import GraphRecord, graph_sha256
from igengine.errors import ExportError
from igengine.store.atomic import atomic_write_bytes, atomic_write_json

SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = ("pip install tensorrt-cu12 (or tensorrt-cu13 to match your CUDA; TensorRT 10.x or 11.x) "
                "on a machine with a CUDA GPU and a CUDA build of torch")
ENGINE_FILE = "model.engine"
ENGINE_SIDECAR = "engine.json"
# Part of every EngineKey: bump when the builder settings below change meaning.
BUILDER_SETTINGS = "strongly-typed;tf32-off;v1"


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string ('10.13.0.35' -> 10)."""
    return int(version.split(".")[0])


def import_tensorrt():
    """The ``tensorrt`` module, or BackendUnavailable naming what to install (missing, or not 10.x/11.x)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from None
    if trt_major(trt.__version__) not in SUPPORTED_MAJORS:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is not supported: igengine drives TensorRT 10.x and "
                                 f"11.x ({INSTALL_HINT})")
    return trt


def require_gpu(device: str | torch.device | None = None) -> torch.device:
    """The CUDA device TensorRT will use, or BackendUnavailable when there is none."""
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU and torch sees none: {INSTALL_HINT}")
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise BackendUnavailable(f"TensorRT runs on CUDA devices only, not on {dev}: use `device` cuda")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------
# Optimization profiles
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchProfile:
    """Row counts (min, opt, max) of one optimization profile; kernels are tuned for ``opt``."""

    min: int
    opt: int
    max: int

    def shapes(self, latent_shape: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input name: (min shape, opt shape, max shape)} for x [N,C,H,W], t [N], y [N]."""
        rows = (self.min, self.opt, self.max)
        return {"x": tuple((r, *latent_shape) for r in rows), "t": tuple((r,) for r in rows),
                "y": tuple((r,) for r in rows)}


def batch_profiles(max_batch: int, opt_batch: int | None = None) -> tuple[BatchProfile, ...]:
    """Profiles for a sampler that calls the network with n rows (conditional) or 2n rows (CFG).

    ``max_batch`` is the most rows one call may carry; ``opt_batch`` is the sampler batch n the
    engine is tuned for (default ``max_batch // 2``, so that a CFG call of 2n rows still fits).
    Profile 0 (conditional calls) is tuned for n, profile 1 (CFG calls) for min(2n, max_batch);
    both accept [1, max_batch] rows, so any call up to ``max_batch`` runs. When both optima are
    equal a single profile is returned.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"`max_batch` must be an integer >= 1, got {max_batch}")
    n = max(1, max_batch // 2) if opt_batch is None else opt_batch
    if not 1 <= n <= max_batch:
        raise ExportError(f"the tuned batch must lie in [1, max_batch={max_batch}], got {n}")
    cond = BatchProfile(1, n, max_batch)
    cfg = BatchProfile(1, min(2 * n, max_batch), max_batch)
    return (cond,) if cfg == cond else (cond, cfg)


def select_profile(profiles: tuple[BatchProfile, ...], rows: int) -> int:
    """Index of the profile to run ``rows`` rows with: among those accepting it, the one tuned closest."""
    fits = [i for i, p in enumerate(profiles) if p.min <= rows <= p.max]
    if not fits:
        top = max(p.max for p in profiles)
        raise ExportError(f"{rows} rows fall outside every optimization profile (engine built for 1..{top} rows)")
    return min(fits, key=lambda i: (abs(profiles[i].opt - rows), i))


# ----------------------------------------------------------------------------------------------
# Engine identity and caches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine is only valid for. Two engines with equal keys are interchangeable."""

    graph_sha256: str
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profiles: tuple[tuple[int, int, int], ...]
    builder: str = BUILDER_SETTINGS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [list(p) for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineKey":
        d = dict(d)
        d["profiles"] = tuple(tuple(int(v) for v in p) for p in d["profiles"])
        return cls(**d)

    def digest(self) -> str:
        """32 hex digits naming this key's engine in the cache."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:32]

    @property
    def batch_profiles(self) -> tuple[BatchProfile, ...]:
        return tuple(BatchProfile(*p) for p in self.profiles)


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def make_engine_key(graph_digest: str, trt_version: str, gpu: str, compute_capability: str, precision: str,
                    profiles: tuple[BatchProfile, ...]) -> EngineKey:
    return EngineKey(graph_digest, trt_version, gpu, compute_capability, precision,
                     tuple((p.min, p.opt, p.max) for p in profiles))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def engine_paths(key: EngineKey, root: Path | None = None) -> tuple[Path, Path]:
    """(engine file, its JSON sidecar) of ``key`` in the engine cache."""
    folder = (root or cache_root()) / "tensorrt" / "engines"
    return folder / f"{key.digest()}.engine", folder / f"{key.digest()}.json"


def timing_cache_path(key: EngineKey, root: Path | None = None) -> Path:
    """The persistent timing cache for ``key``'s TensorRT version and GPU."""
    name = f"{_slug(key.tensorrt)}-{_slug(key.gpu)}-sm{key.compute_capability.replace('.', '')}.cache"
    return (root or cache_root()) / "tensorrt" / "timing" / name


def read_engine_key(sidecar: Path) -> EngineKey | None:
    """The key recorded beside an engine, or None when the sidecar is missing or unreadable."""
    try:
        return EngineKey.from_dict(json.loads(sidecar.read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_engine(key: EngineKey, candidates: list[tuple[Path, Path]]) -> Path | None:
    """The first (engine, sidecar) candidate whose recorded key equals ``key`` in every field."""
    for engine, sidecar in candidates:
        if engine.is_file() and read_engine_key(sidecar) == key:
            return engine
    return None


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def build_engine(graph: Path, key: EngineKey, latent_shape: tuple[int, int, int], timing_cache: Path,
                 workspace_bytes: int | None = None) -> bytes:
    """Build a serialized engine for ``key`` from ``graph`` (TensorRT 10.x or 11.x, strongly typed).

    The timing cache file is read before and rewritten after the build (so later builds for the same
    TensorRT version and GPU skip the kernel timing they already did).
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if trt_major(trt.__version__) < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):  # from the path: resolves model.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {graph}: {errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for profile in key.batch_profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes(latent_shape).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {graph} (see its log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def ensure_engine(graph: Path, record: GraphRecord, latent_shape: tuple[int, int, int],
                  device: str | torch.device | None = None, max_batch: int | None = None,
                  opt_batch: int | None = None, root: Path | None = None,
                  setup: SetupLog | None = None) -> tuple[Path, EngineKey]:
    """An engine for ``graph`` on this TensorRT and GPU: found beside the graph, in the cache, or built.

    ``max_batch`` defaults to the graph's recorded maximum. Returns (engine path, its key). An
    engine is only ever used when its recorded key equals the wanted one in every field. A build
    (minutes for an XL model) is announced and timed through ``setup`` (``seconds["engine_build_s"]``).
    """
    trt = import_tensorrt()
    dev = require_gpu(device)
    profiles = batch_profiles(max_batch or record.export.max_batch, opt_batch)
    key = make_engine_key(graph_sha256(graph), trt.__version__, *gpu_identity(dev), record.export.precision.value,
                          profiles)
    engine, sidecar = engine_paths(key, root)
    found = find_engine(key, [(graph.parent / ENGINE_FILE, graph.parent / ENGINE_SIDECAR), (engine, sidecar)])
    if found is not None:
        return found, key
    setup = SetupLog() if setup is None else setup
    t0 = time.perf_counter()
    with setup.step(f"building a TensorRT {trt.__version__} engine for {key.gpu} from {graph} into {engine.parent}: "
                    "this takes minutes, once per graph and GPU", "engine_build_s", "built the engine"):
        with torch.cuda.device(dev):
            blob = build_engine(graph, key, latent_shape, timing_cache_path(key, root))
    engine.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine, blob)
    atomic_write_json(sidecar, {"key": key.to_dict(), "graph": str(graph), "record": record.to_dict(),
                                "build_s": round(time.perf_counter() - t0, 3),
                                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return engine, key


def copy_engine_to(folder: Path, engine: Path, key: EngineKey) -> Path:
    """Place an engine and its key beside an exported graph (``model.engine``, ``engine.json``)."""
    tmp = Path(tempfile.mkdtemp(prefix=".engine-", dir=folder))
    try:
        shutil.copyfile(engine, tmp / ENGINE_FILE)
        atomic_write_json(tmp / ENGINE_SIDECAR, {"key": key.to_dict(), "digest": key.digest()})
        os.replace(tmp / ENGINE_FILE, folder / ENGINE_FILE)
        os.replace(tmp / ENGINE_SIDECAR, folder / ENGINE_SIDECAR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / ENGINE_FILE


__all__ = ["BatchProfile", "EngineKey", "batch_profiles", "build_engine", "copy_engine_to", "engine_paths",
           "ensure_engine", "find_engine", "import_tensorrt", "require_gpu", "select_profile", "timing_cache_path"]
