"""ONNX export and the ONNX Runtime backend: graph contract, precision placement, parity with torch, refusals.

Tiny models of both families with every block type (SiT: shifted adaLN, LayerNorm qk-norm, GELU MLP,
learn_sigma head; LightningDiT: RoPE, SwiGLU, RMSNorm + RMS qk-norm, no-shift adaLN), weights drawn
with std 0.2 so that both outputs have std of a few units: an absolute bound of 1e-4 is not met by
outputs that are merely small. Each (family, precision) is exported once per module (about 4 s each).
A tiny RAEv2 (condition tokens, DDT head, base head) is exported at fp32 and checked for parity too.

Tolerances (STYLE.md): fp32 graph vs fp32 torch: max abs <= 1e-4. fp16 graph: its error against
the fp32 torch model may be at most twice the error of the plain torch fp16 model (the same maths
done naively in fp16), in max and in mean abs. bf16: ONNX Runtime's CPU provider has no bf16
MatMul, so bf16 graphs are checked for structure only and the backend's refusal is tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is the optional 'onnx' extra (in 'test')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter) is the optional 'onnx' extra")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the optional 'onnx' extra")

from igengine.backends import BackendError, BackendUnavailable, TorchBackend  # noqa: E402
from igengine.jobs.backend import build_backend as create_backend  # noqa: E402
from igengine.models.checkpoint import LoadedCheckpoint, load_checkpoint, save_safetensors  # noqa: E402
from igengine.cli import main  # noqa: E402
from igengine.config import GuidanceConfig, Precision, SamplerConfig, Solver  # noqa: E402
from igengine.export import ExportConfig, ExportError, GraphMismatchError  # noqa: E402
from igengine.export.contract import GRAPH_FILE, SIDECAR, read_record  # noqa: E402
from igengine.export.graph_passes import node_module, value_dtypes  # noqa: E402
from igengine.export.onnx import export_onnx  # noqa: E402
from igengine.models import IGDiT, RAEv2DiT, apply_precision, preset  # noqa: E402
from tests.conftest import sampler_for as make_sampler  # noqa: E402
from tests.conftest import TINY, randomize_  # noqa: E402

CONFIGS = {
    "sit": TINY["sit"].replace(learn_sigma=True),
    "lightningdit": TINY["lightningdit"].replace(wo_shift=True),
}
FAMILIES = tuple(CONFIGS)
BATCHES = (1, 3, 8)
FP32_TOL = 1e-4
FLOAT, LOW = onnx.TensorProto.FLOAT, (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def fresh_model(family: str, seed: int = 0) -> IGDiT:
    return randomize_(IGDiT(CONFIGS[family]), seed, scale=0.2)


def inputs(family: str, n: int, seed: int = 1):
    cfg = CONFIGS[family]
    g = torch.Generator().manual_seed(seed + n)
    return (torch.randn(n, *cfg.latent_shape, generator=g), torch.rand(n, generator=g),
            torch.randint(0, cfg.num_classes + 1, (n,), generator=g))  # the null class row too


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    """family -> path of a safetensors checkpoint of its tiny model (seed 0)."""
    paths = {}
    for family in FAMILIES:
        paths[family] = workdir / f"{family}.safetensors"
        save_safetensors(fresh_model(family), paths[family])
    return paths


@pytest.fixture(scope="module")
def graph(workdir, checkpoint):
    """graph(family, precision) -> export folder; each exported once per module."""
    done = {}

    def get(family: str, precision: str):
        if (family, precision) not in done:
            out = workdir / f"{family}-{precision}"
            export_onnx(load_checkpoint(checkpoint[family]), ExportConfig(precision=Precision(precision)), out)
            done[family, precision] = out
        return done[family, precision]

    return get


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().mean())


# ----------------------------------------------------------------------------------------------
# The graph contract
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_contract_names_dtypes_dynamic_batch_metadata_and_sidecar(family, graph, checkpoint):
    folder = graph(family, "fp32")
    path = folder / GRAPH_FILE
    onnx.checker.check_model(str(path), full_check=True)  # by path: external data included
    proto = onnx.load(str(path), load_external_data=False)
    c, h, w = CONFIGS[family].latent_shape
    io = {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in [*proto.graph.input, *proto.graph.output]}
    assert io == {"x": (FLOAT, ["N", c, h, w]), "t": (FLOAT, ["N"]), "y": (onnx.TensorProto.INT64, ["N"]),
                  "v_final": (FLOAT, ["N", c, h, w]), "v_inter": (FLOAT, ["N", c, h, w])}
    meta = {p.key: p.value for p in proto.metadata_props}
    loaded = load_checkpoint(checkpoint[family])
    assert meta["igengine.checkpoint_sha256"] == loaded.sha256
    assert json.loads(meta["igengine.model_config"])["encoder_depth"] == CONFIGS[family].encoder_depth
    assert (meta["igengine.precision"], meta["igengine.opset"]) == ("fp32", "18")
    assert meta["igengine.version"] and meta["igengine.exporter"].startswith("torch.onnx.export(dynamo=True)")
    assert {op.domain: op.version for op in proto.opset_import}[""] == 18
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["record"] == read_record(path).to_dict()
    # Weights live in the external data file; the .onnx holds only small constants.
    inline = [i for i in proto.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(onnx.numpy_helper.to_array(i).tobytes()) <= 1024 for i in inline)
    assert (folder / "model.onnx.data").stat().st_size > 100_000
    assert sidecar["files"]["model.onnx.data"]["bytes"] == (folder / "model.onnx.data").stat().st_size
    assert not any(n.op_type == "Einsum" for n in proto.graph.node)  # permutations became Transpose
    assert not [p for n in proto.graph.node for p in n.metadata_props if "stack_trace" in p.key]


def test_same_checkpoint_exports_the_same_bytes(graph, checkpoint, tmp_path):
    again = export_onnx(load_checkpoint(checkpoint["sit"]), ExportConfig(), tmp_path / "again")
    first = json.loads((graph("sit", "fp32") / SIDECAR).read_text())
    assert again.sidecar["graph_sha256"] == first["graph_sha256"]


@pytest.mark.parametrize("family,precision", [("sit", "fp16"), ("lightningdit", "fp16"), ("lightningdit", "bf16")])
def test_low_precision_graph_keeps_norms_softmax_adaln_and_heads_fp32(family, precision, graph):
    proto = onnx.load(str(graph(family, precision) / GRAPH_FILE), load_external_data=False)
    types = value_dtypes(proto)
    low_matmuls = 0
    for node in proto.graph.node:
        dtype, module = types.get(node.output[0]), node_module(node)
        leaf = module.rsplit(".", 1)[-1]
        if node.op_type in ("Softmax", "ReduceMean", "LayerNormalization"):  # softmax and norm statistics
            assert dtype == FLOAT, (node.op_type, module)
        if "adaLN_modulation" in module or leaf in ("norm1", "norm2", "q_norm", "k_norm", "norm_final") or \
                module.split(".")[0] in ("final_layer", "final_layer_xr", "t_embedder", "y_embedder", "x_embedder",
                                         "feat_rope"):
            assert dtype not in LOW, (node.op_type, module)
        if node.op_type == "MatMul" and dtype in LOW:
            assert ".attn" in module or ".mlp" in module, module
            low_matmuls += 1
    depth = CONFIGS[family].depth
    # qkv, proj, QK^T, PV and two MLP matmuls per block.
    assert low_matmuls == 6 * depth
    for out in proto.graph.output:
        assert out.type.tensor_type.elem_type == FLOAT


# ----------------------------------------------------------------------------------------------
# Parity with torch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_fp32_matches_torch_at_batch_1_3_8_from_one_graph(family, graph, checkpoint):
    backend = create_backend("onnxruntime", load_checkpoint(checkpoint[family]), "fp32", "cpu",
                             onnx=graph(family, "fp32"))
    model = fresh_model(family)
    for n in BATCHES:
        x, t, y = inputs(family, n)
        with torch.no_grad():
            ref = model(x, t, y)
        got = backend(x, t, y)
        for r, g in zip(ref, got):
            assert g.dtype == torch.float32 and g.shape == r.shape
            assert float(r.std()) > 0.5  # outputs of a few units: the bound below is not met by smallness
            assert max_abs(g, r) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_fp16_error_at_most_twice_the_torch_fp16_error(family, graph, checkpoint):
    backend = create_backend("onnxruntime", load_checkpoint(checkpoint[family]), "fp16", "cpu",
                             onnx=graph(family, "fp16"))
    ref32, naive16 = fresh_model(family), apply_precision(fresh_model(family), Precision.FP16)
    for n in BATCHES:
        x, t, y = inputs(family, n)
        with torch.no_grad():
            ref, naive = ref32(x, t, y), naive16(x, t, y)
        got = backend(x, t, y)
        for r, a, g in zip(ref, naive, got):
            assert max_abs(a, r) > 0  # the torch fp16 model really ran in fp16
            assert max_abs(g, r) <= 2 * max_abs(a, r)
            assert mean_abs(g, r) <= 2 * mean_abs(a, r)


def test_bf16_graph_is_refused_by_the_cpu_provider_with_a_clear_reason(graph, checkpoint):
    # ONNX Runtime's CPU provider has no bf16 MatMul kernel: bf16 parity can only run on the CUDA provider.
    from igengine.backends.onnxruntime_backend import OnnxRuntimeBackend

    path = graph("lightningdit", "bf16")
    config = load_checkpoint(checkpoint["lightningdit"]).config
    with pytest.raises(BackendUnavailable, match="cannot run the bf16 graph .*model.onnx"):  # the session's own refusal
        OnnxRuntimeBackend(path / GRAPH_FILE, read_record(path / GRAPH_FILE), config, "cpu")
    with pytest.raises(BackendUnavailable, match="cannot run a bf16 graph"):  # the job's, before opening the graph
        create_backend("onnxruntime", load_checkpoint(checkpoint["lightningdit"]), "bf16", "cpu", onnx=path)


def test_cli_bf16_on_the_cpu_provider_is_refused_before_any_export_or_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "cache"))
    code, _, err = cli(capsys, "sample", "--n", 2, "--steps", 2, "--backend", "onnxruntime", "--precision", "bf16",
                       "--device", "cpu", "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "cannot run a bf16 graph" in lines[0], err
    assert "--precision fp16 or fp32" in lines[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def sampler_for(family: str, precision: str) -> SamplerConfig:
    if family == "sit":
        g = GuidanceConfig(ig_scale=1.4, cfg_scale=1.5, cfg_interval=(0.0, 0.7))
        return SamplerConfig(solver=Solver.SDE, steps=5, guidance=g, precision=Precision(precision))
    g = GuidanceConfig(ig_scale=1.4, cfg_scale=1.5, cfg_interval=(0.19, 1.0))
    return SamplerConfig(solver=Solver.HEUN2, steps=4, guidance=g, timestep_shift=0.3, precision=Precision(precision))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_through_onnxruntime_matches_the_torch_backend(family, precision, graph, checkpoint):
    """IG + CFG for a few steps; 3 samples with CFG make 6-row calls, split by the sampler at max_batch 4."""
    idx, labels = torch.arange(3), torch.tensor([1, 5, 9])
    ort_backend = create_backend("onnxruntime", load_checkpoint(checkpoint[family]), precision, "cpu",
                                 onnx=graph(family, precision), max_batch=4)
    got = make_sampler(ort_backend, sampler_for(family, precision))(7, idx, labels)
    ref = make_sampler(TorchBackend(fresh_model(family), Precision.FP32), sampler_for(family, "fp32"))(7, idx, labels)
    assert float(ref.std()) > 0.5
    if precision == "fp32":
        assert max_abs(got, ref) <= FP32_TOL
    else:
        naive = make_sampler(TorchBackend(fresh_model(family), Precision.FP16), sampler_for(family, "fp16"))(7, idx, labels)
        assert 0 < max_abs(naive, ref)
        assert max_abs(got, ref) <= 2 * max_abs(naive, ref)
        assert mean_abs(got, ref) <= 2 * mean_abs(naive, ref)


def test_a_call_above_the_graph_maximum_is_refused(graph, checkpoint):
    backend = create_backend("onnxruntime", load_checkpoint(checkpoint["sit"]), "fp32", "cpu",
                             onnx=graph("sit", "fp32"), max_batch=4)
    with pytest.raises(BackendError, match="above the graph's maximum of 4"):
        backend(*inputs("sit", 5))
    assert backend.describe()["providers"] == ["CPUExecutionProvider"]


def test_reference_precision_runs_the_fp32_graph(graph, checkpoint):
    backend = create_backend("onnxruntime", load_checkpoint(checkpoint["sit"]), "reference", "cpu",
                             onnx=graph("sit", "fp32"))
    assert backend.describe()["graph_precision"] == "fp32"


# ----------------------------------------------------------------------------------------------
# RAEv2: the same contract, x_full and x_base as the outputs v_final and v_inter
# ----------------------------------------------------------------------------------------------

# Trunk 2 blocks (the base head after the first), a 1-block DDT head wider than the trunk (so s_projector
# is a linear): every module type of RAEv2DiT, small enough for an export of a few seconds.
RAEV2 = preset("RAEv2-B").replace(name="RAEv2-tiny", input_size=4, in_channels=8, hidden_size=32, depth=2,
                                  num_heads=2, decoder_hidden_size=64, head_depth=1, head_num_heads=4, encoder_depth=1,
                                  num_classes=10)


def raev2_model() -> RAEv2DiT:
    return randomize_(RAEv2DiT(RAEV2), 0, scale=0.2)


@pytest.fixture(scope="module")
def raev2_graph(workdir):
    """(graph path, loaded checkpoint) of the tiny RAEv2 exported at fp32 (the checkpoint loader builds SiT and
    LightningDiT networks only, so the loaded checkpoint is assembled here)."""
    path = workdir / "raev2.safetensors"
    save_safetensors(raev2_model(), path)
    loaded = LoadedCheckpoint(raev2_model(), RAEV2, path, "safetensors")
    result = export_onnx(loaded, ExportConfig(), workdir / "raev2-fp32")
    return result.graph, loaded


def test_raev2_onnxruntime_fp32_matches_torch_with_both_outputs(raev2_graph):
    graph_path, loaded = raev2_graph
    onnx.checker.check_model(str(graph_path), full_check=True)
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["v_final", "v_inter"]
    assert read_record(graph_path).model_config == RAEV2.to_dict()
    model = raev2_model()
    for n in BATCHES:
        g = torch.Generator().manual_seed(n)
        x, t = torch.randn(n, *RAEV2.latent_shape, generator=g), torch.rand(n, generator=g)
        y = torch.randint(0, RAEV2.num_classes + 1, (n,), generator=g)  # the null class row too
        with torch.no_grad():
            ref = model(x, t, y)  # (x_full, x_base)
        got = session.run(["v_final", "v_inter"], {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
        assert not torch.allclose(ref[0], ref[1])
        for r, g in zip(ref, got):
            g = torch.from_numpy(g)
            assert g.dtype == torch.float32 and g.shape == r.shape
            assert float(r.std()) > 0.5  # outputs of a few units: the bound below is not met by smallness
            assert max_abs(g, r) <= FP32_TOL


# ----------------------------------------------------------------------------------------------
# Graphs that do not belong to the run
# ----------------------------------------------------------------------------------------------


def test_graphs_for_another_checkpoint_config_or_precision_are_refused(graph, checkpoint, tmp_path):
    other = tmp_path / "other.safetensors"
    save_safetensors(fresh_model("sit", seed=3), other)
    sit32 = graph("sit", "fp32")
    cases = [
        (load_checkpoint(other), "fp32", sit32, "checkpoint sha256"),
        (load_checkpoint(checkpoint["sit"], overrides={"encoder_depth": 2}), "fp32", sit32,
         "encoder_depth=1 in the graph but 2 for this run"),
        (load_checkpoint(checkpoint["sit"]), "fp16", sit32, "precision fp32 but this run needs the fp16 graph"),
        (load_checkpoint(checkpoint["lightningdit"]), "fp32", sit32, "family='sit' in the graph"),
    ]
    for loaded, precision, folder, expect in cases:
        with pytest.raises(GraphMismatchError, match=expect):
            create_backend("onnxruntime", loaded, precision, "cpu", onnx=folder)

    plain = tmp_path / "plain"
    shutil.copytree(sit32, plain)
    proto = onnx.load(str(plain / GRAPH_FILE), load_external_data=False)
    del proto.metadata_props[:]
    onnx.save_model(proto, str(plain / GRAPH_FILE))
    (tmp_path / "junk.onnx").write_text("not a graph")
    for path, expect in [(plain, "is not an igengine graph"), (tmp_path / "junk.onnx", "cannot read ONNX graph"),
                         (tmp_path / "missing", "no ONNX graph at")]:
        with pytest.raises(ExportError, match=expect):
            create_backend("onnxruntime", load_checkpoint(checkpoint["sit"]), "fp32", "cpu", onnx=path)


def test_a_failed_export_leaves_the_earlier_export_untouched(graph, checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    shutil.copytree(graph("sit", "fp32"), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise ExportError("simulated exporter failure")

    monkeypatch.setattr("igengine.export.onnx.torch_to_onnx", broken)
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(load_checkpoint(checkpoint["sit"]), ExportConfig(), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # and no temporary folder is left


def test_export_cache_exports_once_and_keys_by_precision(graph, checkpoint, tmp_path, monkeypatch):
    from igengine.export.cache import graph_folder, locate_graph

    loaded = load_checkpoint(checkpoint["sit"])
    seeded = graph_folder(loaded, ExportConfig(), tmp_path)
    seeded.parent.mkdir(parents=True)
    shutil.copytree(graph("sit", "fp32"), seeded)  # as if exported on an earlier run
    monkeypatch.setattr("igengine.export.onnx.export_onnx", lambda *a, **k: pytest.fail("re-exported a cached graph"))
    path, record = locate_graph(loaded, "reference", root=tmp_path)
    assert path == seeded / GRAPH_FILE and record.export.precision == Precision.FP32
    assert graph_folder(loaded, ExportConfig(precision=Precision.FP16), tmp_path) != seeded
    other = load_checkpoint(checkpoint["sit"], overrides={"encoder_depth": 2})
    assert graph_folder(other, ExportConfig(), tmp_path) != seeded


def test_an_export_into_the_cache_announces_itself_and_is_timed(graph, checkpoint, tmp_path, monkeypatch):
    from igengine.export.cache import SetupLog, graph_folder, locate_graph

    loaded = load_checkpoint(checkpoint["sit"])
    made = graph("sit", "fp32")
    exported = []

    def export(loaded, config, out):  # the real export's files, made in no time by a fake clock
        exported.append(out)
        for p in made.iterdir():
            shutil.copy(p, out / p.name)

    monkeypatch.setattr("igengine.export.onnx.export_onnx", export)
    monkeypatch.setattr("igengine.export.cache.perf_counter", iter([100.0, 136.24]).__next__)
    lines = []
    setup = SetupLog(lines.append)
    path, _ = locate_graph(loaded, "reference", root=tmp_path, setup=setup)
    folder = graph_folder(loaded, ExportConfig(), tmp_path)
    assert path == folder / GRAPH_FILE and len(exported) == 1
    assert lines == [f"exporting {loaded.config.name} (fp32) to the ONNX cache at {folder}: first use, this takes "
                     "a while", "exported in 36.2 s"]
    assert setup.timing() == {"export_s": 36.24}
    # A cache hit says nothing and takes no export time.
    again = SetupLog(lines.append)
    assert locate_graph(loaded, "reference", root=tmp_path, setup=again)[0] == path
    assert len(lines) == 2 and again.timing() == {} and len(exported) == 1


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def cli(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, expect):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1, err
    assert lines[0].startswith("igengine: error:") and expect in lines[0], lines[0]


def test_cli_export_then_sample_with_onnxruntime_matches_torch(tmp_path, capsys, checkpoint):
    ckpt, out = checkpoint["lightningdit"], tmp_path / "exp"
    code, stdout, err = cli(capsys, "export", "--ckpt", ckpt, "--format", "onnx", "--max-batch", 8, "--out", out)
    assert code == 0, err
    summary = json.loads(stdout)
    start, done = err.splitlines()  # what it does, then how long it took
    assert start == f"igengine: exporting {summary['model']} (fp32) to {out}: this takes a while"
    assert done == f"igengine: exported in {summary['export_s']:.1f} s"
    assert summary["max_batch"] == 8 and summary["files"]["model.onnx"]["bytes"] > 0
    common = ["sample", "--ckpt", ckpt, "--n", 5, "--steps", 3, "--precision", "fp32", "--no-decode", "--device", "cpu"]
    assert cli(capsys, *common, "--backend", "onnxruntime", "--onnx", out, "--out", tmp_path / "a")[0] == 0
    assert cli(capsys, *common, "--out", tmp_path / "b")[0] == 0
    a, b = np.load(tmp_path / "a" / "latents.npy"), np.load(tmp_path / "b" / "latents.npy")
    assert np.abs(a - b).max() <= FP32_TOL
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["backend"]["backend"] == "onnxruntime" and manifest["backend"]["max_batch"] == 8

    # Bad inputs to `sample` that concern graphs: one line each, earlier outputs untouched.
    before = (tmp_path / "a" / "latents.npy").read_bytes()
    cases = [
        (["--encoder-depth", 1, "--onnx", out], "encoder_depth=2 in the graph but 1 for this run"),
        (["--precision", "fp16", "--onnx", out], "precision fp32 but this run needs the fp16 graph"),
        (["--onnx", tmp_path / "nowhere"], "no ONNX graph at"),
    ]
    for args, expect in cases:
        code, _, err = cli(capsys, "sample", "--ckpt", ckpt, "--n", 5, "--steps", 3, "--no-decode",
                           "--backend", "onnxruntime", *args, "--out", tmp_path / "c")
        assert_one_line_error(code, err, expect)
    code, _, err = cli(capsys, "sample", "--backend", "nope", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "'nope' is not one of")
    assert code == 2  # a bad request; a missing runtime exits 1
    assert (tmp_path / "a" / "latents.npy").read_bytes() == before


def test_cli_sample_without_onnx_exports_into_the_cache_once(tmp_path, capsys, checkpoint, monkeypatch):
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "cache"))
    args = ["sample", "--ckpt", checkpoint["sit"], "--n", 2, "--steps", 3, "--no-decode", "--device", "cpu",
            "--backend", "onnxruntime"]
    code, stdout, err = cli(capsys, *args, "--out", tmp_path / "first")
    assert code == 0, err
    graphs = list((tmp_path / "cache" / "onnx").glob(f"*/{GRAPH_FILE}"))
    assert len(graphs) == 1 and "-fp32-" in graphs[0].parent.name
    # The export says so on the progress log, and its time is kept apart from the sampling loop's.
    timing = json.loads((tmp_path / "first" / "manifest.json").read_text())["timing"]
    summary = json.loads(stdout)
    lines = err.splitlines()
    start = lines.index(f"igengine: exporting {summary['model']} (fp32) to the ONNX cache at {graphs[0].parent}: "
                        "first use, this takes a while")
    assert re.fullmatch(r"igengine: exported in \d+\.\d s", lines[start + 1]), lines
    assert lines[start + 1] == f"igengine: exported in {timing['export_s']:.1f} s"
    assert 0 < timing["export_s"] <= timing["setup_s"] and timing["wall_s"] < timing["setup_s"]
    assert (summary["wall_s"], summary["setup_s"], summary["export_s"]) == (
        timing["wall_s"], timing["setup_s"], timing["export_s"])
    monkeypatch.setattr("igengine.export.onnx.export_onnx", lambda *a, **k: pytest.fail("re-exported a cached graph"))
    code, stdout, err = cli(capsys, *args, "--out", tmp_path / "second")
    assert code == 0 and "export" not in err, err
    assert "export_s" not in json.loads(stdout) and "setup_s" in json.loads(stdout)
    assert "export_s" not in json.loads((tmp_path / "second" / "manifest.json").read_text())["timing"]
    first, second = (np.load(tmp_path / d / "latents.npy") for d in ("first", "second"))
    assert np.array_equal(first, second)
    assert json.loads((tmp_path / "second" / "manifest.json").read_text())["backend"]["graph"] == str(graphs[0])


def test_cli_export_bad_inputs(tmp_path, capsys, checkpoint, graph):
    import importlib.util

    ckpt = checkpoint["sit"]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    cases = [
        (["--opset", 17], "unsupported --opset 17: the torch.onnx dynamo exporter needs opset >= 18"),
        (["--opset", 99], "unsupported --opset 99"),
        (["--precision", "reference"], "'reference' is not one of 'fp32', 'fp16', 'bf16'"),
        (["--precision", "fp8"], "'fp8' is not one of"),
        (["--format", "tflite"], "'tflite' is not one of"),
        (["--max-batch", 0], "--max-batch must be an integer >= 1"),
        (["--ckpt", tmp_path / "missing.pt"], "checkpoint not found"),
        (["--ckpt", tmp_path / "bad.pt"], "not a PyTorch checkpoint"),
        (["--out", tmp_path / "a_file"], "is not a folder"),
        (["--out", tmp_path / "a_file" / "sub"], "cannot create output folder"),
    ]
    if importlib.util.find_spec("tensorrt") is None:
        cases.append((["--format", "tensorrt"], "TensorRT is not installed: pip install tensorrt"))
    for args, expect in cases:
        args = list(args)
        if "--ckpt" not in args:
            args += ["--ckpt", ckpt]
        if "--out" not in args:
            args += ["--out", tmp_path / "o"]
        code, _, err = cli(capsys, "export", *args)
        assert_one_line_error(code, err, expect)
    assert not (tmp_path / "o" / GRAPH_FILE).exists() and (tmp_path / "a_file").read_text() == "x"

    # An export folder of another precision is refused, untouched, unless --overwrite.
    folder = tmp_path / "existing"
    shutil.copytree(graph("sit", "fp32"), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = cli(capsys, "export", "--ckpt", ckpt, "--precision", "fp16", "--out", folder)
    assert_one_line_error(code, err, "holds an export of another checkpoint")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_missing_onnxruntime_is_one_line_naming_the_install(tmp_path, capsys, checkpoint, graph, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    code, _, err = cli(capsys, "sample", "--ckpt", checkpoint["sit"], "--n", 1, "--steps", 2, "--no-decode",
                       "--backend", "onnxruntime", "--onnx", graph("sit", "fp32"), "--out", tmp_path / "o")
    assert_one_line_error(code, err, "needs ONNX Runtime, which is not installed: pip install onnxruntime")
    assert code == 1
    assert not os.path.exists(tmp_path / "o" / "latents.npy")
