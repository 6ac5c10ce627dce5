"""TensorRT support without TensorRT: profiles, engine keys, cache look-ups, version branching, error paths.

The builder is driven against a recording stand-in of the ``tensorrt`` module to pin what is asked of
TensorRT 10.x and 11.x (strong typing, no precision flags, profiles, timing cache). The real engine
test at the end needs TensorRT and a CUDA GPU and skips without them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from dataclasses import replace

import pytest
import torch

from igengine.backends import BackendUnavailable
from igengine.export import ExportError
from igengine.export.tensorrt import (
    BatchProfile,
    EngineKey,
    batch_profiles,
    build_engine,
    engine_paths,
    ensure_engine,
    find_engine,
    import_tensorrt,
    make_engine_key,
    require_gpu,
    select_profile,
    timing_cache_path,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()


def test_profiles_cover_conditional_and_cfg_calls_up_to_max_batch():
    assert batch_profiles(64) == (BatchProfile(1, 32, 64), BatchProfile(1, 64, 64))
    assert batch_profiles(7) == (BatchProfile(1, 3, 7), BatchProfile(1, 6, 7))
    assert batch_profiles(16, opt_batch=5) == (BatchProfile(1, 5, 16), BatchProfile(1, 10, 16))
    assert batch_profiles(1) == (BatchProfile(1, 1, 1),)  # CFG calls of 2 rows are split by the sampler
    assert batch_profiles(8, opt_batch=8) == (BatchProfile(1, 8, 8),)  # both optima equal: one profile
    for bad in (dict(max_batch=0), dict(max_batch=8, opt_batch=9), dict(max_batch=8, opt_batch=0)):
        with pytest.raises(ExportError):
            batch_profiles(**bad)


def test_profile_shapes_follow_the_graph_inputs():
    assert BatchProfile(1, 4, 8).shapes((4, 32, 32)) == {
        "x": ((1, 4, 32, 32), (4, 4, 32, 32), (8, 4, 32, 32)),
        "t": ((1,), (4,), (8,)),
        "y": ((1,), (4,), (8,)),
    }


def test_each_call_runs_in_the_profile_tuned_closest_to_it():
    profiles = batch_profiles(64)
    assert [select_profile(profiles, n) for n in (1, 32, 40, 47, 49, 64)] == [0, 0, 0, 0, 1, 1]
    for n in range(1, 65):
        p = profiles[select_profile(profiles, n)]
        assert p.min <= n <= p.max
    with pytest.raises(ExportError, match="65 rows fall outside every optimization profile"):
        select_profile(profiles, 65)


KEY = make_engine_key("ab" * 32, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", "bf16", batch_profiles(64))


def test_engine_key_digest_changes_with_every_field():
    assert EngineKey.from_dict(json.loads(json.dumps(KEY.to_dict()))) == KEY
    assert make_engine_key(KEY.graph_sha256, KEY.tensorrt, KEY.gpu, KEY.compute_capability, KEY.precision,
                           batch_profiles(64)).digest() == KEY.digest()
    variants = [
        replace(KEY, graph_sha256="cd" * 32),
        replace(KEY, tensorrt="11.0.0.1"),
        replace(KEY, gpu="NVIDIA H200"),
        replace(KEY, compute_capability="8.0"),
        replace(KEY, precision="fp16"),
        replace(KEY, profiles=((1, 32, 64),)),
        replace(KEY, profiles=((1, 32, 128), (1, 64, 128))),
        replace(KEY, builder="other-settings"),
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and KEY.digest() not in digests


def test_timing_cache_is_shared_per_tensorrt_version_and_gpu_only(tmp_path):
    assert timing_cache_path(KEY, tmp_path) == timing_cache_path(replace(KEY, graph_sha256="cd" * 32, precision="fp32"),
                                                                  tmp_path)
    assert timing_cache_path(KEY, tmp_path) != timing_cache_path(replace(KEY, tensorrt="10.14.1"), tmp_path)
    assert timing_cache_path(KEY, tmp_path) != timing_cache_path(replace(KEY, gpu="NVIDIA A100-SXM4-80GB",
                                                                          compute_capability="8.0"), tmp_path)


def write_engine(engine, sidecar, key, payload=b"engine"):
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(payload)
    sidecar.write_text(json.dumps({"key": key.to_dict()}))


def test_an_engine_is_found_only_under_a_key_equal_in_every_field(tmp_path):
    mine = (tmp_path / "a.engine", tmp_path / "a.json")
    other = (tmp_path / "b.engine", tmp_path / "b.json")
    write_engine(*other, replace(KEY, gpu="NVIDIA A100-SXM4-80GB"))
    assert find_engine(KEY, [other]) is None
    write_engine(*mine, KEY)
    assert find_engine(KEY, [other, mine]) == mine[0]
    mine[1].write_text("{not json")
    assert find_engine(KEY, [mine]) is None
    write_engine(*mine, KEY)
    mine[0].unlink()
    assert find_engine(KEY, [mine]) is None


class FakeTRT(types.ModuleType):
    """A stand-in for the ``tensorrt`` module that records what the builder is asked for."""

    def __init__(self, version: str):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list = []
        rec = self.calls

        class Flag:
            STRONGLY_TYPED = 0

        class BuilderFlag:
            TF32 = "TF32"

        self.NetworkDefinitionCreationFlag = Flag
        self.BuilderFlag = BuilderFlag
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Cache:
            def serialize(self):
                return b"timings"

        class Config:
            def clear_flag(self, flag):
                rec.append(("clear_flag", flag))

            def set_flag(self, flag):
                rec.append(("set_flag", flag))

            def add_optimization_profile(self, p):
                rec.append(("profile", p.shapes))

            def create_timing_cache(self, blob):
                rec.append(("timing_cache_in", bytes(blob)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                rec.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized-engine"

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.append(("parse_from_file", path))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser


@pytest.mark.parametrize("version,flags", [("10.13.0.35", 1 << 0), ("11.0.0.14", 0)])
def test_builder_is_strongly_typed_without_precision_flags_on_10_and_11(version, flags, tmp_path, monkeypatch):
    fake = FakeTRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    timing = tmp_path / "timing" / "t.cache"
    timing.parent.mkdir()
    timing.write_bytes(b"earlier")
    blob = build_engine(tmp_path / "model.onnx", KEY, (4, 32, 32), timing)
    assert blob == b"serialized-engine" and timing.read_bytes() == b"timings"
    calls = dict((c[0], c[1]) for c in fake.calls if c[0] != "profile")
    assert calls["create_network"] == flags  # STRONGLY_TYPED only where it exists and means something (10.x)
    assert calls["parse_from_file"] == str(tmp_path / "model.onnx")  # by path: external data resolves
    assert not [c for c in fake.calls if c[0] == "set_flag"]  # no FP16/BF16: precision comes from the graph
    assert ("clear_flag", "TF32") in fake.calls
    assert calls["timing_cache_in"] == b"earlier" and calls["set_timing_cache"] is False
    profiles = [c[1] for c in fake.calls if c[0] == "profile"]
    assert profiles == [p.shapes((4, 32, 32)) for p in KEY.batch_profiles]


def test_unsupported_or_missing_tensorrt_is_refused_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT("8.6.1"))
    with pytest.raises(BackendUnavailable, match="TensorRT 8.6.1 is not supported: igengine drives TensorRT 10.x and 11.x"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed: pip install tensorrt"):
        import_tensorrt()


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU refusal; this machine has a GPU")
def test_no_gpu_is_refused_naming_the_need():
    with pytest.raises(BackendUnavailable, match="TensorRT needs a CUDA GPU"):
        require_gpu("cuda")


def test_ensure_engine_reuses_only_a_matching_engine_and_builds_otherwise(tmp_path, monkeypatch):
    """Same graph on another GPU: the cached engine of the first GPU is not used, a new one is built and cached."""
    import igengine.export.tensorrt as trtmod
    from igengine.config import Precision
    from igengine.export import ExportConfig
    from igengine.export.cache import SetupLog
    from igengine.export.contract import GraphRecord

    record = GraphRecord(1, {}, "0" * 64, ExportConfig(precision=Precision.BF16, max_batch=64), "0.1.0", "test")
    gpu = {"identity": ("NVIDIA H100 80GB HBM3", "9.0")}
    built = []
    monkeypatch.setattr(trtmod, "import_tensorrt", lambda: FakeTRT("10.13.0.35"))
    monkeypatch.setattr(trtmod, "require_gpu", lambda device=None: torch.device("cpu"))
    monkeypatch.setattr(trtmod, "gpu_identity", lambda device: gpu["identity"])
    monkeypatch.setattr(trtmod, "graph_sha256", lambda graph: "ab" * 32)
    monkeypatch.setattr(trtmod, "build_engine", lambda graph, key, shape, timing: built.append(key) or b"built")
    monkeypatch.setattr(torch.cuda, "device", lambda dev: __import__("contextlib").nullcontext())
    graph = tmp_path / "export" / "model.onnx"
    graph.parent.mkdir()

    lines = []
    setup = SetupLog(lines.append)
    write_engine(*engine_paths(KEY, tmp_path), KEY, payload=b"cached-h100")
    path, key = ensure_engine(graph, record, (4, 32, 32), root=tmp_path, setup=setup)
    assert key == KEY and path.read_bytes() == b"cached-h100" and not built
    assert lines == [] and setup.seconds == {}  # a cached engine is used silently

    gpu["identity"] = ("NVIDIA H200", "9.0")
    path, key = ensure_engine(graph, record, (4, 32, 32), root=tmp_path, setup=setup)
    assert key.gpu == "NVIDIA H200" and built == [key] and path.read_bytes() == b"built"
    assert len(lines) == 2 and "building a TensorRT 10.13.0.35 engine for NVIDIA H200" in lines[0]
    assert lines[1].startswith("built the engine in ") and set(setup.seconds) == {"engine_build_s"}
    assert json.loads(engine_paths(key, tmp_path)[1].read_text())["key"] == key.to_dict()
    assert engine_paths(KEY, tmp_path)[0].read_bytes() == b"cached-h100"  # the H100 engine is still there


def test_cli_tensorrt_without_tensorrt_is_one_line(tmp_path, capsys, monkeypatch):
    from igengine.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = main(["sample", "--n", "1", "--steps", "2", "--backend", "tensorrt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "TensorRT is not installed: pip install tensorrt" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason="needs TensorRT 10.x/11.x and a CUDA GPU (neither in CI)")
@pytest.mark.parametrize("family", ["sit", "lightningdit"])
def test_tensorrt_engine_matches_torch_on_the_gpu(family, tmp_path):
    pytest.importorskip("onnx", reason="onnx is the optional 'onnx' extra")
    from igengine.jobs.backend import build_backend
    from igengine.models.checkpoint import load_checkpoint, save_safetensors
    from tests.conftest import tiny_model

    model = tiny_model(family)
    save_safetensors(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    backend = build_backend("tensorrt", loaded, "fp32", "cuda", cache_root=tmp_path / "cache", max_batch=8)
    ref = model.cuda()
    for n in (1, 3, 8):
        x = torch.randn(n, *loaded.config.latent_shape, device="cuda")
        t, y = torch.rand(n, device="cuda"), torch.randint(0, 10, (n,), device="cuda")
        with torch.no_grad():
            want = ref(x, t, y)
        got = backend(x, t, y)
        torch.cuda.synchronize()
        for w, g in zip(want, got):
            assert float((w - g).abs().max()) <= 1e-4
