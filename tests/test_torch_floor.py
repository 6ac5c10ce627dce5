"""The torch floor: every torch API igengine calls beyond the everyday tensor ops, when it appeared,
and whether igengine runs without it.

The floor stated in pyproject.toml and README is the newest release among the APIs igengine calls
unconditionally. Guarded APIs (looked up with hasattr/getattr or imported in a try) are used where
torch has them and skipped otherwise. The checks here are by inspection (nothing is compiled or run),
so the device check runs this file against the GPU image's torch too (benchmarks/device_check.sh, env).
Releases are given only where they were checked (PyTorch's docs, pull requests); None: older than the
floor, not pinned down.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FLOOR = (2, 5)

# (name, release that added it or None, file that uses it, guarded, why it matters / source)
# A name "a|b" is a rename: either spelling serves. "fn(kw)" is a call with keyword kw.
APIS = [
    # -- unconditional: these set the floor --
    ("torch.serialization.safe_globals", (2, 5), "igengine/safeload.py", False,
     "every .pt checkpoint is read inside this context manager (pytorch/pytorch#127939, merged 2024-07-12, "
     "after 2.4 branched; 2.4 had only add_safe_globals)"),
    ("torch.onnx.export(dynamo)", (2, 5), "igengine/export/onnx.py", False,
     "the torch.export-based ONNX exporter by keyword (PyTorch's ONNX tutorial: 2.5.0 or newer)"),
    ("torch.library.custom_op", (2, 4), "igengine/kernels/ops.py", False,
     "new-style custom ops with .register_fake: the fused step inside captured graphs (docs of 2.4)"),
    ("torch.library.register_fake", (2, 4), "igengine/kernels/ops.py", False, "with custom_op"),
    ("torch.load(mmap)", None, "igengine/safeload.py", False, "memory-mapped checkpoints"),
    ("torch.load(weights_only)", None, "igengine/safeload.py", False, "no code runs while unpickling"),
    ("torch.export.Dim", None, "igengine/export/onnx.py", False, "the ONNX graph's dynamic batch"),
    ("torch.cuda.CUDAGraph", None, "igengine/sampling/captured.py", False, "captured sampling steps"),
    ("torch.cuda.graph", None, "igengine/sampling/captured.py", False, "captured sampling steps"),
    ("torch.cuda.graph_pool_handle", None, "igengine/sampling/captured.py", False, "one pool for all row counts"),
    ("torch._inductor.compile_fx.compile_fx", None, "igengine/backends/compiled.py", False, "the compiled backend"),
    ("torch._inductor.list_mode_options", None, "igengine/backends/compiled.py", False, "compile modes"),
    ("torch._inductor.config.get_config_copy", None, "igengine/backends/compiled.py", False,
     "unknown Inductor options are dropped, not passed"),
    ("torch._inductor.config.freezing", None, "igengine/backends/compiled.py", False, "patched around each call"),
    ("torch._dynamo.config.patch", None, "igengine/backends/compiled.py", False, "recompile limit per call"),
    ("torch.utils.flop_counter.FlopCounterMode", None, "tests/test_flops.py", False, "checks the analytic FLOPs"),
    ("torch.utils.weak.WeakIdKeyDictionary", None, "igengine/backends/cpu_linear.py", False, "packed weights"),
    # -- guarded: used where torch has them --
    ("torch.compiler.nested_compile_region", None, "igengine/models/layers.py", True,
     "blocks compiled once (pytorch/pytorch#156449, June 2025); without it every block is traced inline"),
    ("torch.compiler.is_compiling", None, "igengine/models/layers.py", True, "only with nested_compile_region"),
    ("torch.compiler.is_exporting", None, "igengine/models/layers.py", True, "only with nested_compile_region"),
    ("torch.compiler.cudagraph_mark_step_begin", None, "igengine/backends/compiled.py", True,
     "only in Inductor's own CUDA-graph modes"),
    ("torch._dynamo.config.recompile_limit|cache_size_limit", None, "igengine/backends/compiled.py", True,
     "renamed; the present name is used"),
    ("torch._dynamo.config.fail_on_recompile_limit_hit", None, "igengine/backends/compiled.py", True, "hasattr"),
    ("torch._functorch.config.enable_autograd_cache", None, "igengine/backends/compiled.py", True, "hasattr"),
    ("torch._inductor.utils.clear_caches|clear_inductor_caches", None, "igengine/backends/compiled.py", True,
     "getattr; the cache folder switch then clears nothing"),
    ("torch._inductor.config.fx_graph_cache", None, "igengine/backends/compiled.py", True,
     "dropped by inductor_options where unknown"),
    ("torch.ops.mkldnn._linear_pointwise", None, "igengine/backends/cpu_linear.py", True, "onednn_available()"),
    ("torch.ops.mkldnn._reorder_linear_weight", None, "igengine/backends/cpu_linear.py", True, "getattr"),
    ("torch._utils._element_size", None, "igengine/safeload.py", True, "try/except ImportError"),
    ("torch._weights_only_unpickler.Unpickler", None, "igengine/safeload.py", True, "try/except ImportError"),
    ("torch._inductor.async_compile.AsyncCompile", None, "igengine/jobs/signals.py", True,
     "sys.modules and getattr: a stop cancels Inductor's queued compiles; without it the exit only waits for them"),
]
# Names the scan below finds that are not calls into torch: a metadata key and a docstring's example.
NOT_CALLS = {"torch.onnx.name_scopes", "torch.nn.attention.sdpa_kernel"}


def _resolve(dotted: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _present(name: str) -> bool:
    call = re.fullmatch(r"(.+)\((\w+)\)", name)
    if call:
        fn, kw = call.groups()
        return kw in inspect.signature(_resolve(fn)).parameters
    head, _, last = name.rpartition(".")
    for alt in last.split("|"):
        try:
            _resolve(f"{head}.{alt}")
            return True
        except (ImportError, AttributeError):
            continue
    return False


@pytest.mark.parametrize("name, since, where, guarded, why", APIS, ids=[a[0] for a in APIS])
def test_api_exists_in_this_torch(name, since, where, guarded, why):
    if _present(name):
        return
    if guarded:
        pytest.skip(f"torch {torch.__version__} has no {name}; igengine runs without it ({why})")
    pytest.fail(f"torch {torch.__version__} has no {name}, which {where} calls unconditionally ({why}): "
                f"igengine needs torch >= {'.'.join(map(str, FLOOR))}")


def test_every_listed_api_is_used_where_it_says():
    for name, _, where, _, _ in APIS:
        text = (ROOT / where).read_text()
        leaf = re.sub(r"\(.*\)$", "", name).rpartition(".")[2]
        assert any(alt in text for alt in leaf.split("|")), f"{where} does not mention {leaf} ({name})"


def _torch_names_used() -> set[str]:
    """Dotted torch names igengine's source mentions in the areas this floor is about (compiler, custom
    ops, CUDA graphs, serialization, export), including ``from torch.x import y``."""
    pattern = re.compile(r"torch\.(?:library|compiler|_inductor|_dynamo|_functorch|ops\.mkldnn|serialization|export"
                         r"|onnx|utils\.flop_counter|utils\.weak|nn\.attention|cuda\.(?:graph_pool_handle|graph|CUDAGraph)"
                         r")(?:\.[A-Za-z_]\w*)*")
    found = set()
    for path in (ROOT / "igengine").rglob("*.py"):
        text = path.read_text()
        found.update(pattern.findall(text))
        for module, names in re.findall(r"^\s*from (torch\.[\w.]+) import ([\w, ]+)", text, re.M):
            found.update(f"{module}.{n.split(' as ')[0].strip()}" for n in names.split(",") if n.strip())
    return found


def test_the_list_covers_every_such_api_igengine_uses():
    listed = [re.sub(r"\(.*\)$", "", a[0]) for a in APIS]
    expanded = {f"{n.rpartition('.')[0]}.{alt}" for n in listed for alt in n.rpartition(".")[2].split("|")}
    missing = []
    for used in sorted(_torch_names_used() - NOT_CALLS):
        # a module or config object is covered by any listed name beneath it
        if used not in expanded and not any(e.startswith(used + ".") for e in expanded):
            missing.append(used)
    assert not missing, f"torch APIs used but not in tests/test_torch_floor.py's APIS (add them, with their release): {missing}"


def test_the_floor_is_the_newest_unconditional_api_and_pyproject_and_readme_state_it():
    newest = max(since for _, since, _, guarded, _ in APIS if since is not None and not guarded)
    assert newest == FLOOR
    floor = ".".join(map(str, FLOOR))
    deps = re.findall(r'"torch\s*[<>=!~][^"]*"', (ROOT / "pyproject.toml").read_text())
    assert deps == [f'"torch>={floor}"'], deps  # the one torch requirement (no extra narrows it)
    readme = (ROOT / "README.md").read_text()
    assert f"torch >= {floor}" in readme and "tests/test_torch_floor.py" in readme
    assert not re.search(r"torch >= ?2\.[0-4]\b", readme), "README states an older floor somewhere"
