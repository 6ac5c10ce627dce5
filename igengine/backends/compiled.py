"""The compiled backend: the IG DiT through ``torch.compile`` (Inductor) with static shapes.

One compiled graph per row count. The run declares the row counts it feeds (``row_counts``, e.g.
(N, 2N): a sampler batch and a CFG step's conditional + unconditional rows); ``warmup()`` compiles
each once (``dynamic=False``: every graph is specialised to its shape, which is what Inductor
optimises best and what a later CUDA-graph capture needs).

Row-count policy (``call_plan``), so that a call never needs a new graph:
  * n in row_counts: one call, as is.
  * n below the largest compiled count but not in the set: padded up to the smallest compiled
    count >= n. Pad rows are copies of row 0 (x, t and y), so they stay in the model's input
    distribution; rows never interact in the network (attention and normalisations act within a
    row), so the real rows' outputs do not depend on them, and the outputs are sliced back to n.
  * n above every compiled count: split into calls of the largest compiled count, the remainder
    handled as above (padded).
Padding changes the M dimension of every matmul, so a padded row may differ from the same row of
an unpadded call by floating-point reassociation only (fp32: ~1e-7 relative, see the tests).

Precision: the model is cast by ``apply_precision`` (bf16/fp16 only in attention and MLP; norms,
adaLN, embeddings, heads and the residual stream fp32), then compiled; outputs are float32.

Recompilation guard. The torch.compile backend is a thin wrapper of Inductor's ``compile_fx`` that
counts and times every graph it is asked to compile, for this backend instance only (attribution
does not depend on process-global counters, which other compiled code also moves). Every compile
after ``warmup()`` is a recompile: ``recompiles`` counts them and ``check_no_recompiles()`` raises
BackendError. Dynamo recompiles when a guard fails: a new input shape (prevented by the row-count
policy) or a change of the global state it guards between calls: ``torch.set_num_threads``, grad
mode, autocast, the default dtype, deterministic-algorithm mode, or the cuBLAS TF32 / reduced-precision
flags (TF32 is pinned by this backend during each call, see below; the fp16/bf16 reduced-precision
reduction flags are not: they are the caller's numerics choice, as for the eager backend).
Dynamo's per-function recompile limit (default 8, shared by every instance over ``IGDiT.forward``)
is raised to ``RECOMPILE_LIMIT`` for the duration of this backend's calls, and where torch has the
option, hitting it raises instead of silently falling back to eager.

CPU linears (``cpu_linear``): on CPU, every ``linear`` of the traced graph whose dtype has a route on this
CPU (``igengine.backends.cpu_linear.linear_route``: oneDNN for fp32 on AVX-512 CPUs, oneDNN for bf16 where
oneDNN has bf16, else the fp32 GEMM for bf16) is replaced by a custom op Inductor calls as an opaque kernel
(``route_cpu_linears``), and a linear feeding a GELU(tanh) (SiT's fc1) becomes one call with the GELU
fused: GEMMs are ~70-85% of a compiled CPU forward, oneDNN's fp32 GEMM ran the DiT's shapes 2.3x MKL's on
an AVX-512 EPYC, and Inductor's bf16 ``addmm`` takes torch's generic loop where oneDNN has no bf16 (4.4x
slower than the fp32-GEMM route). fp32 linears of AVX2-only CPUs stay Inductor's (MKL), which was faster
there. ``cpu_linear="aten"`` keeps Inductor's own path for every dtype.

Block regions (``regions``): the transformer block as a nested compile region
(``igengine.models.layers.compile_region``): Dynamo traces it once and Inductor compiles it once per
input shape, and every block of the network calls that code. The trade, measured on 2 CPU threads
(benchmarks/results/compile_start_cpu_20261202-072101.json, fp32, graphs of 2 and 4 rows):
  * cold compile: SiT-XL/2 28.7 s with regions vs 88.1 s inline; LightningDiT-B/1 33.3 s vs 68.2 s
    (the region's cost does not grow with depth); warm starts (FX graph cache hits) are the same;
  * steady state: regions 1-5% slower (interleaved: SiT-XL/2 at 2 rows 0.95x; B models 0.98-0.99x).
    Inline, the graph spans block boundaries and Inductor fuses across them, and the region's call
    boundary costs its own buffers.
Default (``regions=None``): on the CPU inline, since a bulk run's hours outweigh a compile that is
paid once per machine and torch version (the artifacts are cached); on CUDA regions, where a
whole-network compile of an XL model takes minutes per row count, and where the steady-state cost
is one extra elementwise pass per block in a step dominated by bf16 GEMMs (not yet measured on a GPU).

Freezing (``freezing=True``, off by default): Inductor then treats the weights as constants, folds
them and, on CPU, pre-packs every linear for MKL. Measured on our 2-core CPU (SiT-B/2 width,
1 thread, MKL linears) it gave no speed-up (the GEMMs dominate either way: 0.478 s vs 0.478 s at
batch 1, 3.02 s vs 3.09 s at batch 8), and it costs the warm start: packed MKL weights cannot be stored in the
FX graph cache, so every process recompiles from scratch. On CUDA it is untested here.

Cross-process cache. Inductor's FX graph cache (and AOTAutograd's cache, where it applies: not with
``freezing``, where Inductor bypasses it) are enabled, in
``cache_root()/inductor/<torch version>-<device kind>/`` (``inductor_cache_dir``). Inductor keys each
artifact by the graph, the input metadata, the torch version, its config and the device/compiler.
Without freezing the weights are graph inputs, never part of an artifact: a different checkpoint of
the same architecture reuses the artifact and runs its own weights (tested). With freezing the CPU
path bypasses the cache (above); on CUDA, Inductor keys frozen weights by their metadata and binds
them at load time (untested here). igengine adds the subfolder per torch version and device kind (CUDA capability and CUDA version)
so that a cache shared across machines or upgrades stays sorted and can be deleted per target.

Global state this backend touches, and how it is contained:
  * ``TORCHINDUCTOR_CACHE_DIR``: set to the igengine folder inside each compile (in the backend
    callable, so a recompile mid-run uses it too) and during ``warmup()`` (first calls may autotune
    and write there), then restored (or removed) again, with Inductor's in-memory path caches
    cleared on both sides.
    A compile subprocess pool that Inductor starts during warm-up keeps the environment it was
    started with (it compiles Triton kernels; their cache is bundled into the FX graph cache entry).
  * ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.backends.cudnn.allow_tf32``: set to
    ``allow_tf32`` (default False: fp32 means IEEE fp32) for the duration of each call, restored after.
  * Dynamo's recompile limit: raised during each call, restored after (``torch._dynamo.config.patch``).
  * ``igengine.models.layers.COMPILE_REGIONS``: set to ``regions`` during each call, restored after
    (Dynamo guards on it, so backends with different settings never share a graph).
  * Inductor options (``mode``'s options, caches on) are per-compile config patches, never set
    globally. ``freezing`` is read by Dynamo while tracing, so Inductor's ``freezing`` flag is
    patched for the duration of each call (and restored after it).
  * The custom op ``igengine::cpu_linear`` (registered once per process, on first use).
  * Dynamo's code cache on ``IGDiT.forward`` (process-global by design; entries of one instance
    are guarded by its own backend object and are not used by another instance).
  * Inductor's compile worker pool: subprocesses Inductor starts on its first compile and keeps
    for the life of the process.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from igengine.backends.cpu_linear import ROUTE_ATEN, cpu_linear, linear_route, routed
from igengine.backends.cpu_malloc import keep_freed_memory
from igengine.errors import BackendError, BackendUnavailable
from igengine.config import ModelConfig, Precision
from igengine.models import IGDiT, apply_precision
from igengine.models import layers as model_layers
from igengine.precision import NETWORK_DTYPE

# "default": Inductor's defaults. "max-autotune-no-cudagraphs": autotuned matmul/conv templates
# (CUDA; slow to compile). "reduce-overhead" and "max-autotune" also capture CUDA graphs inside
# Inductor: an option only, since CUDA-graph capture of the whole sampling step is done above.
MODES: tuple[str, ...] = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 64


def call_plan(rows: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """How ``rows`` input rows are run with graphs compiled for ``sizes`` (see the module docstring).

    Returns [(start, count, size), ...]: rows start..start+count-1 go through the graph of ``size``
    rows (padded when count < size). E.g. sizes (4, 8): 3 -> [(0, 3, 4)]; 11 -> [(0, 8, 8), (8, 3, 4)].
    """
    sizes = sorted(set(sizes))
    if rows < 1:
        raise BackendError(f"a call needs at least one row, got {rows}")
    plan = []
    start = 0
    while rows - start > sizes[-1]:
        plan.append((start, sizes[-1], sizes[-1]))
        start += sizes[-1]
    rest = rows - start
    plan.append((start, rest, min(s for s in sizes if s >= rest)))
    return plan


def inductor_cache_dir(device: torch.device, root: Path | None = None) -> Path:
    """``cache_root()/inductor/torch-<version>-<device kind>``: where this backend keeps Inductor's caches."""
    from igengine.export.cache import cache_root

    kind = device.type
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        kind = f"cuda{torch.version.cuda}-sm{major}{minor}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"torch-{torch.__version__}-{kind}")
    return (cache_root() if root is None else Path(root)) / "inductor" / name


@contextlib.contextmanager
def inductor_cache_env(directory: Path) -> Iterator[None]:
    """``TORCHINDUCTOR_CACHE_DIR=directory`` inside the block; the caller's value (or its absence) after.

    Inductor memoises some paths derived from the cache folder: those caches are cleared on entry
    and on exit, so neither side sees the other's folder.
    """
    from torch._inductor import utils as inductor_utils

    clear = getattr(inductor_utils, "clear_caches", None) or getattr(inductor_utils, "clear_inductor_caches", None)
    directory.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    if clear is not None:
        clear()
    try:
        yield
    finally:
        if clear is not None:
            clear()
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@contextlib.contextmanager
def tf32_flags(enabled: bool) -> Iterator[None]:
    """cuBLAS and cuDNN TF32 permissions set to ``enabled`` inside the block, restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def compile_regions(enabled: bool) -> Iterator[None]:
    """``igengine.models.layers.COMPILE_REGIONS`` set to ``enabled`` inside the block, restored after."""
    before = model_layers.COMPILE_REGIONS
    model_layers.COMPILE_REGIONS = enabled
    try:
        yield
    finally:
        model_layers.COMPILE_REGIONS = before


def _dynamo_limits():
    """A config patch raising Dynamo's recompile limit (and making a hit loud, where torch can)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    patch = {}
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    patch[name] = max(getattr(cfg, name), RECOMPILE_LIMIT)
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return cfg.patch(**patch)


def inductor_options(mode: str, freezing: bool, use_cache: bool) -> dict:
    """The Inductor config patches of one compile: ``mode``'s options, freezing, the caches."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode, False)) if mode != "default" else {}
    options["freezing"] = freezing
    options["fx_graph_cache"] = use_cache
    known = inductor_config.get_config_copy()
    unknown = [k for k in options if k not in known]
    if unknown:  # an older torch without one of these options: drop it rather than fail the compile
        options = {k: v for k, v in options.items() if k not in unknown}
    return options


_CPU_LINEAR = None


def cpu_linear_op():
    """``torch.ops.igengine.cpu_linear(x, w, b, activation)``: a CPU linear layer on its dtype's route, registered once.

    fp32 or bf16; ``activation`` "none" or "gelu_tanh" (fused, see ``igengine.backends.cpu_linear``). A
    custom op, so that Inductor calls it as an opaque kernel (Inductor's own oneDNN lowering requires
    frozen, pre-packed weights). None where this torch has no ``torch.library.custom_op``.
    """
    global _CPU_LINEAR
    if _CPU_LINEAR is None:
        if not (hasattr(torch, "library") and hasattr(torch.library, "custom_op")):
            _CPU_LINEAR = False
            return None

        @torch.library.custom_op("igengine::cpu_linear", mutates_args=())
        def cpu_linear_custom(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
            return cpu_linear(x, w, b, activation)

        @cpu_linear_custom.register_fake
        def _(x, w, b, activation):
            return x.new_empty((*x.shape[:-1], w.shape[0]))

        _CPU_LINEAR = torch.ops.igengine.cpu_linear.default
    return _CPU_LINEAR or None


def route_cpu_linears(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Replace every CPU ``linear(x, w, b)`` of a Dynamo graph whose dtype has a route here
    (``cpu_linear.routed``) by ``cpu_linear_op()``, a linear whose only use is a GELU(tanh) by the op with
    the GELU fused; returns (linears, GELUs fused).

    Why: see ``igengine.backends.cpu_linear`` (each dtype's fastest correct GEMM on this CPU, GEMMs are
    ~70-85% of a compiled forward, and a fused GELU saves a pass over the MLP's widest activation).
    """
    op = cpu_linear_op()
    if op is None:
        return 0, 0
    # The graph and its subgraphs: a nested compile region (the transformer block, see
    # ``igengine.models.layers.DiTBlock``) is traced once into a subgraph module of its own.
    counts = [_route_graph_linears(g, op) for g in gm.modules() if isinstance(g, torch.fx.GraphModule)]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_GELUS = (torch._C._nn.gelu, torch.nn.functional.gelu)


def _gelu_tanh_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The GELU(tanh) call that is ``node``'s only use, if it is."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op != "call_function" or user.target not in _GELUS or user.args[:1] != (node,):
        return None
    approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
    return user if approximate == "tanh" and len(user.args) <= 2 else None


def _route_graph_linears(gm: torch.fx.GraphModule, op) -> tuple[int, int]:
    """``route_cpu_linears`` on the nodes of one graph (not its subgraphs)."""
    replaced = fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEARS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], args[1], node.kwargs.get("bias", args[2])
        vals = [getattr(a, "meta", {}).get("example_value") for a in (x, w, b)]
        if any(not isinstance(v, torch.Tensor) or v.device.type != "cpu" for v in vals):
            continue
        if len({v.dtype for v in vals}) != 1 or not routed(vals[1].dtype):
            continue
        gelu = _gelu_tanh_user(node)
        last = gelu if gelu is not None else node
        with gm.graph.inserting_after(last):
            new = gm.graph.call_function(op, (x, w, b, "gelu_tanh" if gelu is not None else "none"))
        new.meta = dict(last.meta)
        last.replace_all_uses_with(new)
        if gelu is not None:
            gm.graph.erase_node(gelu)
            fused += 1
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced, fused


@contextlib.contextmanager
def autograd_cache(enabled: bool) -> Iterator[None]:
    """AOTAutograd's cache on (or off) inside the block, where this torch has it; restored after.

    Inductor's FX graph cache is switched per compile through the backend's options instead.
    """
    from torch._functorch import config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        with functorch_config.patch(enable_autograd_cache=enabled):
            yield
    else:
        yield


class CountingInductor:
    """A ``torch.compile`` backend: Inductor's ``compile_fx`` with fixed options; counts and times each compile.

    Every compile runs with Inductor's cache folder set to ``cache_dir`` (``inductor_cache_env``) and
    AOTAutograd's cache switched to ``use_cache``, so the scope of both is exactly the compile.
    ``compiles`` counts the graphs this object compiled (each call is one graph: the model is
    compiled with ``fullgraph=True``); ``compile_seconds`` lists the wall time of each, ``shapes``
    the row counts of the latent inputs (shape [N, *latent_shape]) each was compiled for.
    """

    compiler_name = "inductor"

    def __init__(self, options: dict, cache_dir: Path, latent_shape: tuple[int, ...], use_cache: bool = True,
                 route_linears: bool = False):
        self.options = dict(options)
        self.route_linears = route_linears
        self.routed_linears: list[int] = []
        self.gelus_fused: list[int] = []
        self.latent_shape = tuple(latent_shape)
        self.cache_dir = Path(cache_dir)
        self.use_cache = use_cache
        self.compiles = 0
        self.compile_seconds: list[float] = []
        self.rows: list[list[int]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        self.rows.append(sorted({a.shape[0] for a in example_inputs
                                 if isinstance(a, torch.Tensor) and tuple(a.shape[1:]) == self.latent_shape}))
        t0 = time.perf_counter()
        if self.route_linears:
            linears, gelus = route_cpu_linears(gm)
            self.routed_linears.append(linears)
            self.gelus_fused.append(gelus)
        try:
            with inductor_cache_env(self.cache_dir), autograd_cache(self.use_cache):
                return compile_fx(gm, example_inputs, config_patches=dict(self.options))
        finally:
            self.compile_seconds.append(time.perf_counter() - t0)


def _inference_tensor(a: torch.Tensor) -> torch.Tensor:
    """``a`` as a contiguous inference tensor (call inside ``torch.inference_mode``)."""
    if a.is_inference():
        return a.contiguous()
    return a.clone(memory_format=torch.contiguous_format)


class CompiledBackend:
    """Backend over ``torch.compile(model, dynamic=False, fullgraph=True)`` with Inductor.

    model: an IGDiT; cast in place by ``apply_precision`` and moved to ``device`` (the backend owns it:
        with ``freezing`` the weights are folded into the compiled graphs, so they must not change).
    row_counts: the row counts the run feeds, e.g. (N, 2N); each gets one static-shape graph.
    precision: the run's Precision. mode: one of ``MODES`` (default "default"; the CUDA-graph modes
        need a CUDA device). freezing: Inductor's freezing (weights as constants, constant folding,
        packed CPU GEMM weights); default False, see the module docstring. allow_tf32: fp32 matmuls and convolutions may use TF32
        on CUDA (not with ``reference`` precision). max_batch: most rows the sampler should feed in
        one call (None: any, larger calls are split here). cpu_linear: "routed" (default on CPU
        without freezing) gives each linear dtype its route on this CPU (``cpu_linear.linear_route``),
        GELU(tanh) fused (``route_cpu_linears``), "aten" leaves every linear to Inductor (MKL addmm). cache_dir: Inductor's cache folder
        (default ``inductor_cache_dir(device)``, under $IGENGINE_CACHE); use_cache: False disables
        Inductor's FX graph and AOTAutograd caches (for cold-start measurements). regions: trace
        the transformer block as a nested compile region, compiled once and reused by every block
        (True; only where torch has ``torch.compiler.nested_compile_region``), or every block inline
        (False); None (default): regions on CUDA, inline on the CPU (see the module docstring).
    """

    name = "compiled"

    def __init__(
        self,
        model: IGDiT,
        row_counts: Sequence[int],
        precision: Precision | str = Precision.REFERENCE,
        device: str | torch.device = "cpu",
        mode: str | None = None,
        freezing: bool = False,
        allow_tf32: bool = False,
        max_batch: int | None = None,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        cpu_linear: str | None = None,
        regions: bool | None = None,
    ):
        self.precision = Precision(precision)
        self.device = torch.device(device)
        self.config: ModelConfig = model.config
        self.max_batch = max_batch
        counts = tuple(row_counts) if isinstance(row_counts, (tuple, list)) else None
        if not counts or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
            raise BackendError(f"row_counts must be a non-empty sequence of ints >= 1, got {row_counts!r}")
        self.row_counts: tuple[int, ...] = tuple(sorted(set(counts)))
        self.mode = "default" if mode is None else mode
        if self.mode not in MODES:
            raise BackendError(f"unknown compile mode {mode!r} (available: {', '.join(MODES)})")
        if self.mode in CUDAGRAPH_MODES and self.device.type != "cuda":
            raise BackendError(f"compile mode {self.mode!r} captures CUDA graphs and needs a CUDA device, got {self.device}")
        if allow_tf32 and self.precision == Precision.REFERENCE:
            raise BackendError("allow_tf32 contradicts precision 'reference' (the official numerics have TF32 off)")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {self.device} asked for, but torch sees no CUDA GPU")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise BackendError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        default_linear = "routed" if self.device.type == "cpu" and not freezing and cpu_linear_op() else "aten"
        self.cpu_linear = cpu_linear or default_linear
        if self.cpu_linear not in ("routed", "aten"):
            raise BackendError(f"cpu_linear must be 'routed' or 'aten', got {cpu_linear!r}")
        if self.cpu_linear == "routed" and (self.device.type != "cpu" or cpu_linear_op() is None):
            raise BackendError(f"cpu_linear='routed' needs a CPU device and torch.library.custom_op, got {self.device}")
        if self.cpu_linear == "routed" and freezing:
            raise BackendError("cpu_linear='routed' and freezing exclude each other (freezing packs linears for MKL)")
        self.allow_tf32 = bool(allow_tf32)
        self.freezing = bool(freezing)
        self.use_cache = bool(use_cache)
        if regions is None:
            regions = self.device.type == "cuda"
        self.regions = bool(regions) and model_layers.regions_available()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else inductor_cache_dir(self.device)
        self.model = apply_precision(model.eval().requires_grad_(False), self.precision).to(self.device)
        self.cpu_malloc = keep_freed_memory() if self.device.type == "cpu" else None
        self._backend = CountingInductor(inductor_options(self.mode, self.freezing, self.use_cache), self.cache_dir,
                                         self.config.latent_shape, self.use_cache,
                                         route_linears=self.cpu_linear == "routed")
        self._compiled = torch.compile(self.model, backend=self._backend, dynamic=False, fullgraph=True)
        self._compiles_at_warmup: int | None = None
        self.first_call_seconds: dict[int, float] = {}
        self.warmup_seconds: float | None = None

    # ----------------------------------------------------------------------------------------- calls

    @contextlib.contextmanager
    def _call_context(self) -> Iterator[None]:
        from torch._inductor import config as inductor_config

        # Freezing must be visible to Dynamo while it traces (it then lifts the parameters as
        # constants), not only to Inductor's compile: the config is patched for the call.
        with torch.inference_mode(), tf32_flags(self.allow_tf32), _dynamo_limits(), \
                inductor_config.patch(freezing=self.freezing), compile_regions(self.regions):
            yield

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One compiled call of exactly a compiled row count (inside ``_call_context``)."""
        if self.mode in CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            v_final, v_inter = self._compiled(x, t, y)
        except Exception as e:  # noqa: BLE001 - a recompile-limit hit is Dynamo's own exception type
            if type(e).__name__ == "FailOnRecompileLimitHit":
                raise BackendError(f"Dynamo's recompile limit was hit at {x.shape[0]} rows: {str(e).splitlines()[0]}") from e
            raise
        if self.mode in CUDAGRAPH_MODES:  # Inductor's CUDA graphs reuse their output buffers
            v_final, v_inter = v_final.clone(), v_inter.clone()
        return v_final, v_inter

    def warmup(self) -> dict[int, float]:
        """Compile (or load from the cache) the graph of every row count; returns seconds to first call per count.

        Each count is called twice, so that a guard the first call itself might invalidate (none is
        known) is settled here rather than counted as a recompile later; every compile after this
        is a recompile.
        Called by the first ``__call__`` if not called before.
        """
        c = self.config
        t_start = time.perf_counter()
        # The cache folder also covers what runs lazily at a graph's first call (Triton autotuning).
        with inductor_cache_env(self.cache_dir), self._call_context():
            for n in self.row_counts:
                x = torch.zeros(n, *c.latent_shape, device=self.device)
                t = torch.full((n,), 0.5, device=self.device)
                y = torch.zeros(n, dtype=torch.int64, device=self.device)
                self._sync()
                t0 = time.perf_counter()
                self._run(x, t, y)
                self._sync()
                if n not in self.first_call_seconds:
                    self.first_call_seconds[n] = time.perf_counter() - t0
                self._run(x, t, y)
        self._sync()
        self.warmup_seconds = time.perf_counter() - t_start
        self._compiles_at_warmup = self._backend.compiles
        return dict(self.first_call_seconds)

    @property
    def warm(self) -> bool:
        return self._compiles_at_warmup is not None

    @property
    def compiles(self) -> int:
        """Graphs compiled (or loaded from the cache) by this backend, warm-up included."""
        return self._backend.compiles

    @property
    def recompiles(self) -> int:
        """Graphs compiled after ``warmup()`` (0 before it): each one means a guard failed mid-run."""
        return 0 if self._compiles_at_warmup is None else self._backend.compiles - self._compiles_at_warmup

    def check_no_recompiles(self) -> None:
        """Raise BackendError if anything was recompiled after ``warmup()``."""
        if self.recompiles:
            rows = self._backend.rows[self._compiles_at_warmup:]
            raise BackendError(
                f"the compiled backend recompiled {self.recompiles} time(s) after warm-up (graphs for rows {rows}); "
                "a row count outside row_counts cannot cause this, a change of guarded global state between "
                "calls can (torch.set_num_threads, grad mode, autocast, default dtype, deterministic mode, "
                "cuBLAS reduced-precision flags)"
            )

    def _check(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> int:
        n = x.shape[0] if x.dim() else 0
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.latent_shape or t.shape != (n,) or y.shape != (n,):
            raise BackendError(f"expected x [N,{','.join(map(str, self.config.latent_shape))}], t [N], y [N]; got "
                               f"x {list(x.shape)}, t {list(t.shape)}, y {list(y.shape)}")
        if n < 1:
            raise BackendError("x has no rows: a call needs N >= 1")
        if not x.is_floating_point() or not t.is_floating_point():
            raise BackendError(f"x and t must be floating point, got {x.dtype} and {t.dtype}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise BackendError(f"y must hold integer class labels, got {y.dtype}")
        if self.max_batch is not None and n > self.max_batch:
            raise BackendError(f"batch of {n} rows is above max_batch={self.max_batch} (let the sampler split the call)")
        return n

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N,C,H,W], t [N], y [N] int64) -> (v_final, v_inter), float32 [N,C,H,W] on ``device``."""
        n = self._check(x, t, y)
        if not self.warm:
            self.warmup()
        finals, inters = [], []
        with self._call_context():
            # Dynamo guards on a tensor's dispatch keys: an inference tensor and a normal one take
            # different graphs. Inside inference mode every input is made an inference tensor (a
            # copy only when it is not one already), the kind warm-up compiled for.
            x, t, y = (_inference_tensor(a.to(self.device, dtype))
                       for a, dtype in ((x, torch.float32), (t, torch.float32), (y, torch.int64)))
            for start, count, size in call_plan(n, self.row_counts):
                xs, ts, ys = x[start:start + count], t[start:start + count], y[start:start + count]
                if count < size:  # pad with copies of the chunk's first row
                    pad = size - count
                    xs = torch.cat([xs, xs[:1].expand(pad, *xs.shape[1:])])
                    ts = torch.cat([ts, ts[:1].expand(pad)])
                    ys = torch.cat([ys, ys[:1].expand(pad)])
                v_final, v_inter = self._run(xs.contiguous(), ts.contiguous(), ys.contiguous())
                finals.append(v_final[:count])
                inters.append(v_inter[:count])
        if len(finals) == 1:
            return finals[0].float(), inters[0].float()
        return torch.cat(finals).float(), torch.cat(inters).float()

    def _linear_routes(self) -> dict[str, str]:
        """The route each linear dtype of the model takes on this CPU (as the eager backend reports it)."""
        dtypes = {m.weight.dtype for m in self.model.modules() if isinstance(m, torch.nn.Linear)}
        return {str(d).replace("torch.", ""): linear_route(d) if self.cpu_linear == "routed" else ROUTE_ATEN
                for d in sorted(dtypes, key=str)}

    def describe(self) -> dict:
        """JSON-able facts for the manifest and the benchmarks."""
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        return {
            "backend": self.name,
            "device": str(self.device),
            "network_dtype": str(NETWORK_DTYPE[self.precision]).replace("torch.", ""),
            "precision": self.precision.value,
            "torch": torch.__version__,
            "triton": triton_version,
            "compile_mode": self.mode,
            "inductor_options": dict(self._backend.options),
            "freezing": self.freezing,
            "block_regions": self.regions,
            "cpu_linear": self._linear_routes() if self.device.type == "cpu" else None,
            "cpu_malloc": self.cpu_malloc,
            "routed_linears_per_graph": list(self._backend.routed_linears),
            "gelus_fused_per_graph": list(self._backend.gelus_fused),
            "tf32": self.allow_tf32 and self.device.type == "cuda",
            "cache_dir": str(self.cache_dir) if self.use_cache else None,
            "row_counts": list(self.row_counts),
            "max_batch": self.max_batch,
            "warmup_seconds": self.warmup_seconds,
            "first_call_seconds": {str(k): v for k, v in self.first_call_seconds.items()},
            "compile_seconds": list(self._backend.compile_seconds),
            "compiles": self.compiles,
            "recompiles": self.recompiles,
        }
