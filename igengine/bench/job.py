"""`igengine bench` as a library call: configurations side by side, timed in one run, interleaved.

Workload: a model (a checkpoint, or a named preset with EVERY parameter random, so that no layer is
the identity: the official initialisation zeroes adaLN and output layers) and sampler settings
(default: the checkpoint's own, else the family's paper settings). Rows: every combination of
precision x backend x batch size, plus the ``reference`` precision on the torch backend as the
anchor (accuracy is measured against it).

Method
  * The full run's plan is cut into classes of steps by their network rows (a step whose
    evaluations are all inside the CFG interval costs 2N rows per evaluation, one outside N). For
    every class a window of up to K consecutive steps of that class is timed (K = ``steps``).
  * After warm-up (compilation, capture, caches), the configurations are run in turn, A B C A B C,
    ``repeats`` times; each repeat times every window of every configuration. A window's time is
    its launches and the final read-back of its latents: a captured row (``cuda-graph``) is captured
    once, in warm-up, and its buffers are reset for each window before the clock starts
    (``Sampler.prepare``).
  * Throughput at the FULL run = N / sum over classes (steps of that class in the full plan x
    seconds per step of that class). The report says so (``throughput_basis``).
  * The network's own time: a forward of N and of 2N rows timed alone; ``outside_network_share``
    = 1 - network time / step time, over the windows.
  * MFU = analytic FLOPs (``igengine.bench.flops``, 2 x multiply-adds) / time / the matmul peak
    of the row's dtype measured in the same run, the same way (``igengine.bench.peak.MatmulPeaks``):
    in every repeat, after the rows, one pass of each dtype's products (``_time_peaks``), on a square
    and on the model's three largest block GEMMs at every row count of the run
    (``igengine.bench.flops.block_linear_shapes``), with the run's threads; the peak is the highest
    median over shapes and kernels. A row whose FLOP rate exceeds that peak gets no MFU: its ``mfu``
    is None and ``mfu_fault`` says why (the peak measurement is wrong, e.g. the machine was busy
    while it was timed); ``network_flops_per_s`` and ``mfu_peak_flops`` keep both rates.
  * Accuracy: final latents after the first window against the anchor's at the same batch size
    (max abs and relative L2).

Progress (``progress``, what ``--json`` writes): a report of the rows so far after every row's
warm-up and after every repeat, with ``"partial": true`` and, per row, ``repeats_done``; fields not
measured yet are None (throughput before the first repeat; the network's own time, peak memory and
MFU before the last). A run that is stopped keeps what it had finished; the last report has
``"partial": false``.
"""

from __future__ import annotations

import gc
import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from igengine.backends import network
from igengine.config import BackendName, ModelConfig, Precision, SamplerSettings
from igengine.errors import BackendUnavailable, JobError, RunError
from igengine.jobs.backend import build_backend, check_runtime
from igengine.jobs.sample import DEFAULT_CHECKPOINT, resolve_device
from igengine.models import build_model, preset
from igengine.models.checkpoint import LoadedCheckpoint, load_checkpoint
from igengine.precision import NETWORK_DTYPE
from igengine.sampling import ModelFacts, Plan, Sampler, build_plan, resolve_sampler

DEFAULT_STEPS = 4


class BenchError(RunError):
    """A benchmark that ran but broke one of its own rules (e.g. a recompilation after warm-up)."""


@dataclass(frozen=True)
class BenchJob:
    """Everything `igengine bench` was asked for."""

    ckpt: Path | None = None
    model: str | None = None
    precisions: tuple[Precision, ...] = (Precision.REFERENCE, Precision.FP32, Precision.BF16)
    backends: tuple[BackendName, ...] = (BackendName.TORCH,)
    batch_sizes: tuple[int, ...] = (1, 16)
    steps: int = DEFAULT_STEPS
    repeats: int = 3
    warmup: int = 1
    device: str = "auto"
    anchor: bool = True
    seed: int = 0
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    encoder_depth: int | None = None
    num_heads: int | None = None
    # Explicit (precision, backend) pairs instead of the precisions x backends cross product.
    pairs: tuple[tuple[Precision, BackendName], ...] | None = None

    def configurations(self) -> list[tuple[Precision, BackendName]]:
        """The (precision, backend) pairs to time: ``pairs``, else every precision with every backend."""
        if self.pairs is not None:
            return list(dict.fromkeys(self.pairs))
        return [(p, b) for p in self.precisions for b in self.backends]

    def validate(self) -> None:
        if self.ckpt is not None and self.model is not None:
            raise JobError("give `ckpt` (a checkpoint) or `model` (a preset with random weights), not both; "
                           "without either, the embedded digits model is timed")
        for name in ("steps", "repeats"):
            if getattr(self, name) < 1:
                raise JobError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise JobError(f"`warmup` must be >= 0, got {self.warmup}")
        bad = [b for b in self.batch_sizes if b < 1]
        if bad or not self.batch_sizes:
            raise JobError(f"`batch_size` values must be >= 1, got {list(self.batch_sizes)}")
        if not self.configurations():
            raise JobError("give at least one `precision` and one `backend`")


# ----------------------------------------------------------------------------------------------
# The workload
# ----------------------------------------------------------------------------------------------


def random_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A named preset with every parameter random (std 0.02 around 0, norms around 1): no identity paths."""
    model = build_model(preset(name, **overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname == "pos_embed":
                continue
            base = 1.0 if pname.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else 0.0
            p.copy_(base + 0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def load_workload(job: BenchJob) -> LoadedCheckpoint:
    overrides = {"encoder_depth": job.encoder_depth, "num_heads": job.num_heads}
    if job.model is None:  # a checkpoint; none given: the embedded digits model, as `igengine sample` takes
        return load_checkpoint(job.ckpt if job.ckpt is not None else DEFAULT_CHECKPOINT, model_name=None,
                               overrides=overrides)
    try:
        model = random_model(job.model, job.seed, **{k: v for k, v in overrides.items() if v is not None})
    except KeyError as e:
        raise JobError(str(e).strip("'\"")) from None
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):  # identifies the random weights (export cache key)
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return LoadedCheckpoint(model, model.config, Path(f"<random {job.model} seed {job.seed}>"), "random", [], None,
                            digest.hexdigest())


@dataclass(frozen=True)
class StepClass:
    """Steps with the same network rows per evaluation (1 = N rows, 2 = 2N rows for CFG)."""

    rows: tuple[int, ...]
    count: int  # steps of this class in the full plan
    window: Plan  # up to K consecutive steps of this class


def step_classes(plan: Plan, k: int) -> list[StepClass]:
    """Group the full plan's steps by their rows signature; a timing window of <= k consecutive steps each."""
    sig = [tuple(2 if ev.cfg else 1 for ev in s.evals) for s in plan.steps]
    out = []
    for rows in sorted(set(sig), key=sig.index):
        start = sig.index(rows)
        stop = start
        while stop < len(sig) and sig[stop] == rows and stop - start < k:
            stop += 1
        window = Plan(plan.family, plan.solver, plan.guidance, plan.steps[start:stop])
        out.append(StepClass(rows, sig.count(rows), window))
    return out


# ----------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated during the row's run"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process peak RSS during the row's run (whole process)"
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS since start"


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------


@dataclass
class Config:
    precision: Precision
    backend: BackendName
    batch_size: int
    anchor: bool = False
    net: object = None
    backend_obj: object = None
    build_s: float = 0.0
    first_run_s: float = 0.0
    samplers: dict = field(default_factory=dict)  # class rows -> Sampler
    times: dict = field(default_factory=dict)  # class rows -> [seconds per window run]
    net_times: dict = field(default_factory=dict)  # rows multiplier -> seconds per forward
    latents: torch.Tensor | None = None
    peak_memory: tuple[int, str] = (0, "")

    @property
    def label(self) -> str:
        return f"{self.precision.value}/{self.backend.value}/N={self.batch_size}"


def _configs(job: BenchJob) -> list[Config]:
    out = []
    seen = set()
    pairs = job.configurations()
    for n in job.batch_sizes:
        if job.anchor and (Precision.REFERENCE, BackendName.TORCH) not in pairs:
            out.append(Config(Precision.REFERENCE, BackendName.TORCH, n, anchor=True))
        for p, b in pairs:
            key = (p, b, n)
            if key not in seen:
                seen.add(key)
                out.append(Config(p, b, n, anchor=(p == Precision.REFERENCE and b == BackendName.TORCH)))
    return out


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class BenchClock:
    """The work of a benchmark in network rows per row (configuration), and the time it has left.

    Every window run (warm-up, timed repeats, the peak-memory run) and every forward of the network
    timed alone is a unit of known network rows. A unit's seconds are estimated as its rows times its
    configuration's seconds per row, measured on that configuration's last unit (its first one, which
    may compile or capture, only until a later one is measured; a configuration not measured yet takes
    the mean of those that are); the ETA is the sum over the units not done, plus the matmul peak
    passes still to come (one per repeat, ``tick_pass``) at the last pass's seconds (none counted before
    the first: about 1.5% of a run).
    """

    def __init__(self, rows: dict[int, int], units: int, passes: int = 0):
        self.remaining = dict(rows)  # configuration -> network rows still to run
        self.units, self.done = units + passes, 0
        self.passes_left = passes
        self._pass_s = 0.0  # seconds of the last matmul peak pass
        self._steady: dict[int, float] = {}  # seconds per row, from a unit after the first
        self._first: dict[int, float] = {}  # seconds per row, from the first unit (compile, capture)

    def tick(self, config: int, rows: int, seconds: float) -> None:
        """One unit of ``rows`` network rows of ``config`` took ``seconds``."""
        (self._steady if config in self._first else self._first)[config] = seconds / max(rows, 1)
        self.remaining[config] = max(0, self.remaining.get(config, 0) - rows)
        self.done += 1

    def tick_pass(self, seconds: float) -> None:
        """One pass of the matmul peaks took ``seconds``."""
        self._pass_s = seconds
        self.passes_left = max(0, self.passes_left - 1)
        self.done += 1

    def eta(self) -> float | None:
        """Seconds left, or None before anything was measured."""
        rate = {**self._first, **self._steady}
        if not rate:
            return None
        mean = sum(rate.values()) / len(rate)
        return sum(r * rate.get(c, mean) for c, r in self.remaining.items()) + self.passes_left * self._pass_s

    def eta_text(self) -> str:
        eta = self.eta()
        return "" if eta is None else f" (ETA {hms(eta)})"


def run_bench(job: BenchJob, log: Callable[[str], None] = lambda line: None,
              progress: Callable[[dict], None] | None = None,
              clock: Callable[[int, int, float | None], None] | None = None) -> dict:
    """Run the benchmark; returns the report (``rows`` and provenance), see the module docstring.

    ``progress(report)``: called with a partial report (``"partial": true``) after each row's warm-up
    and after each repeat, and once more with ``"partial": true`` and ``"error"`` if the run raises.
    ``clock(done, total, eta_s)``: called after every unit of work (a window run, a forward timed
    alone; ``BenchClock``) with the units done, their total and the seconds left (None until known);
    the log's warm-up and repeat lines carry the ETA too.
    """
    from igengine.bench.flops import forward_flops
    from igengine.bench.provenance import provenance

    job.validate()
    device = resolve_device(job.device)
    loaded = load_workload(job)
    cfg: ModelConfig = loaded.config
    sampler_cfg = resolve_sampler(cfg.family, Precision.REFERENCE, loaded.sampler_settings, job.settings,
                                  cfg.latent_shape)
    full = build_plan(cfg.family, sampler_cfg)
    classes = step_classes(full, job.steps)
    facts = ModelFacts.of(cfg)
    facts.check_plan(full)
    configs = _configs(job)
    log(f"workload: {cfg.name} ({loaded.weights} weights), {sampler_cfg.solver.value} {sampler_cfg.steps} steps, "
        f"{len(full.steps)} plan steps in {len(classes)} classes, windows of <= {job.steps} steps; "
        f"{len(configs)} rows on {device}")

    # Every (precision, backend) must be able to run here before anything is exported or built.
    for precision, backend in dict.fromkeys((c.precision, c.backend) for c in configs):
        try:
            check_runtime(backend, precision, device)
        except BackendUnavailable as e:
            raise JobError(f"{precision.value}/{backend.value}: {e}") from None

    # Build every backend (one per precision x backend; compiled backends know every batch's row counts).
    built: dict[tuple[Precision, BackendName], tuple[object, float]] = {}
    row_counts = tuple(sorted({m * n for n in job.batch_sizes for m in (1, 2)}))
    for c in configs:
        key = (c.precision, c.backend)
        if key not in built:
            log(f"building {c.precision.value}/{c.backend.value} ...")
            t0 = time.perf_counter()
            try:
                backend = _build(c.backend, loaded, c.precision, device, row_counts)
            except BackendUnavailable as e:
                raise JobError(str(e)) from None
            built[key] = (backend, time.perf_counter() - t0)
        backend, build_s = built[key]
        c.backend_obj, c.build_s = backend, build_s
        c.net = network(backend)
        for sc in classes:
            c.samplers[sc.rows] = Sampler(c.net, sc.window, facts, c.precision, device)

    prov = provenance()
    peaks: dict = {}

    def report(done: list[Config], partial: bool, stage: str) -> dict:
        out = {
            "provenance": prov,
            "partial": partial,
            "stage": stage,
            "workload": {
                "model": cfg.name, "weights": loaded.weights, "checkpoint": str(loaded.path),
                "sampler": sampler_cfg.to_dict(), "plan_steps": len(full.steps), "nfe_per_sample": full.nfe,
                "network_rows_per_sample": full.network_rows,
                "classes": [{"rows_per_eval": list(sc.rows), "steps_in_full_run": sc.count,
                             "window_steps": len(sc.window.steps)} for sc in classes],
                "throughput_basis": "the full run, from per-class step times measured on windows of at most "
                                    f"{job.steps} steps and the plan's exact step counts per class",
                "device": str(device), "repeats": job.repeats, "warmup": job.warmup, "seed": job.seed,
            },
            "peaks": {_peak_name(k): v for k, v in peaks.items()},
            "rows": [_row(c, classes, full, cfg, peaks, configs, forward_flops) for c in done],
        }
        return out

    def snapshot(done: list[Config], stage: str) -> None:
        if progress is not None:
            progress(report(done, True, stage))

    try:
        return _measure(job, device, cfg, classes, configs, peaks, report, snapshot, log, clock)
    except BaseException as exc:  # a stopped or failed run: its last report says why
        if progress is not None:
            failed = report([c for c in configs if c.latents is not None], True, "stopped")
            failed["error"] = f"{type(exc).__name__}: {exc}".strip()
            progress(failed)
        raise


def _measure(job: BenchJob, device: torch.device, cfg: ModelConfig, classes: list[StepClass], configs: list[Config],
             peaks: dict, report, snapshot, log, clock=None) -> dict:
    """Warm-up, interleaved timing with the matmul peaks, the network alone and peak memory (``run_bench``)."""
    idx_for = {n: torch.arange(n) for n in job.batch_sizes}
    labels_for = {n: torch.arange(n) % cfg.num_classes for n in job.batch_sizes}
    alone = sorted({r for sc in classes for r in sc.rows})  # the row multipliers timed alone
    window_rows = {sc.rows: sc.window.network_rows for sc in classes}  # network rows per sample of a window
    runs = max(1, job.warmup) + job.repeats  # window runs of each class, then one more for peak memory
    timer = BenchClock({i: c.batch_size * (runs * sum(window_rows.values()) + window_rows[classes[0].rows]
                                           + 4 * sum(alone)) for i, c in enumerate(configs)},
                       units=len(configs) * (runs * len(classes) + 1 + len(alone)), passes=job.repeats)

    def ticked(i: int | None, rows: int, t0: float) -> None:  # i None: a pass of the matmul peaks
        if i is None:
            timer.tick_pass(time.perf_counter() - t0)
        else:
            timer.tick(i, rows, time.perf_counter() - t0)
        if clock is not None:
            clock(timer.done, timer.units, timer.eta())

    def run_window(c: Config, sc: StepClass, with_setup: bool = False) -> tuple[float, torch.Tensor]:
        """Seconds of one window's launches and final read-back, and its latents. A captured row's
        setup (its capture, the first time; then the reset of its buffers for the batch) is done
        before the clock starts, as every uncaptured row's compile is done in its warm-up;
        ``with_setup`` adds it (a row's time to first sample)."""
        n = c.batch_size
        setup_s, launch = _timed(lambda: c.samplers[sc.rows].prepare(job.seed, idx_for[n], labels_for[n]), device)
        dt, out = _timed(launch, device)
        return (setup_s + dt if with_setup else dt), out

    # Warm-up: the first run of each configuration is its time to first sample (compile, capture, caches).
    for i, c in enumerate(configs):
        log(f"warm-up {c.label}{timer.eta_text()}")
        first = 0.0
        for w in range(max(1, job.warmup)):
            for sc in classes:
                t0 = time.perf_counter()
                dt, out = run_window(c, sc, with_setup=w == 0)
                ticked(i, c.batch_size * window_rows[sc.rows], t0)
                if w == 0:
                    first += dt
                if sc is classes[0]:
                    c.latents = out.detach().float().cpu()
        c.first_run_s = first
        snapshot([x for x in configs if x.latents is not None], f"warm-up {configs.index(c) + 1}/{len(configs)}")

    peak_products = _peak_products(job, device, cfg, classes, configs, log)
    # Interleaved timing: A B C A B C ..., each repeat followed by one pass of the matmul peaks.
    for r in range(job.repeats):
        log(f"repeat {r + 1}/{job.repeats}{timer.eta_text()}")
        for i, c in enumerate(configs):
            for sc in classes:
                t0 = time.perf_counter()
                dt, _ = run_window(c, sc)
                ticked(i, c.batch_size * window_rows[sc.rows], t0)
                c.times.setdefault(sc.rows, []).append(dt)
        t0 = time.perf_counter()
        _time_peaks(peak_products)
        ticked(None, 0, t0)
        snapshot(configs, f"repeat {r + 1}/{job.repeats}")

    # The peaks over every repeat's pass (the rows' MFU needs them: it is reported at the end, like the
    # network's own time); their operands are freed before the peak memory is measured.
    for key, products in peak_products.items():
        peaks[key] = products.result()
        products.release()

    # The network alone, and the peak memory of each row.
    log(f"the network alone and each row's peak memory{timer.eta_text()}")
    for i, c in enumerate(configs):
        n = c.batch_size
        for m in alone:
            t0 = time.perf_counter()
            x = torch.randn(m * n, *cfg.latent_shape, device=device)
            t = torch.full((m * n,), 0.5, device=device)
            y = torch.arange(m * n, device=device) % cfg.num_classes
            c.net(x, t, y)
            c.net_times[m] = statistics.median(_timed(lambda: c.net(x, t, y), device)[0] for _ in range(3))
            ticked(i, 4 * m * n, t0)
        for s in c.samplers.values():  # a captured row's peak includes its capture (graphs and their pool)
            s.release()
        gc.collect()
        _reset_peak(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        t0 = time.perf_counter()
        run_window(c, classes[0])
        ticked(i, n * window_rows[classes[0].rows], t0)
        peak, how = _peak_bytes(device)
        if device.type == "cuda":
            own = sum(p.numel() * p.element_size() for p in _parameters(c.backend_obj))
            c.peak_memory = (peak - before + own, how + " minus other rows' resident tensors, plus this row's weights")
        else:
            c.peak_memory = (peak, how)

    final = report(configs, False, "done")
    bad = [r for r in final["rows"] if r["recompiles"]]
    if bad:
        final["error"] = "recompilation after warm-up: " + ", ".join(f"{r['precision']}/{r['backend']}/N={r['batch_size']}"
                                                                    for r in bad)
    return final


def _peak_products(job: BenchJob, device: torch.device, cfg: ModelConfig, classes: list[StepClass],
                   configs: list[Config], log) -> dict:
    """The matmul products whose pass follows the rows in every repeat: per (dtype, tf32) the rows run, a
    square and the model's three largest block GEMMs at every row count of the run (N and 2N rows)."""
    from igengine.bench.flops import block_linear_shapes
    from igengine.bench.peak import MatmulPeaks, square_size

    model_shapes = {}
    for rows in sorted({m * n for n in job.batch_sizes for sc in classes for m in sc.rows}):
        for name, (m, k, n) in list(block_linear_shapes(cfg, rows).items())[:3]:
            model_shapes.setdefault(f"{name} {m}x{k}x{n}", (m, k, n))
    out = {}
    for key in sorted({_peak_key(c.precision) for c in configs}, key=_peak_name):
        size = square_size(key[0], device)
        shapes = {f"square {size}": (size, size, size)} | model_shapes
        out[key] = MatmulPeaks(key[0], device, shapes, allow_tf32=key[1])
        log(f"matmul peak {_peak_name(key)} on {device}: {len(out[key].products)} products (shapes x kernels), "
            "timed after the rows in every repeat")
    return out


def _time_peaks(peak_products: dict) -> None:
    """One pass of every dtype's peak products: called once per repeat, after the rows, so the peak is timed
    under the load the rows were timed under."""
    for products in peak_products.values():
        products.run_pass()


def _peak_key(precision: Precision) -> tuple[torch.dtype, bool]:
    """The matmul a row's network runs: its dtype, and whether TF32 is allowed (the tf32 precision)."""
    return NETWORK_DTYPE[precision], precision == Precision.TF32


def _peak_name(key: tuple[torch.dtype, bool]) -> str:
    return str(key[0]).replace("torch.", "") + ("+tf32" if key[1] else "")


def _parameters(backend) -> list[torch.Tensor]:
    model = getattr(backend, "model", None)
    return list(model.parameters()) if isinstance(model, torch.nn.Module) else []


def _build(name: BackendName, loaded: LoadedCheckpoint, precision: Precision, device: torch.device,
           row_counts: tuple[int, ...]):
    import copy

    fresh = copy.copy(loaded)
    fresh.model = copy.deepcopy(loaded.model)  # each backend casts and moves its own copy
    return build_backend(name, fresh, precision, device, row_counts=row_counts)


def _row(c: Config, classes: list[StepClass], full: Plan, cfg: ModelConfig, peaks: dict, configs: list[Config],
         forward_flops) -> dict:
    n = c.batch_size
    # A row of a partial report (see the module docstring) may lack its timed repeats, its network
    # time and its dtype's peak: those fields are None until they are measured.
    repeats_done = min((len(c.times.get(sc.rows, ())) for sc in classes), default=0)
    per_repeat = []  # seconds of the full run per repeat
    for r in range(repeats_done):
        per_repeat.append(sum(sc.count * c.times[sc.rows][r] / len(sc.window.steps) for sc in classes))
    full_s = statistics.median(per_repeat) if per_repeat else None
    rates = sorted(n / s for s in per_repeat) or [None]
    steps_total = len(full.steps)
    evals_total = full.nfe
    window_s = sum(statistics.median(c.times[sc.rows]) for sc in classes) if per_repeat else None
    net_s = (sum(c.net_times[m] for sc in classes for s in sc.window.steps for m in sc.rows)
             if all(m in c.net_times for sc in classes for m in sc.rows) else None)
    flops_full = sum(forward_flops(cfg, rows=(2 if ev.cfg else 1) * n) for s in full.steps for ev in s.evals)
    rate = flops_full / full_s if full_s else None  # the row's FLOP/s over the full run
    peak = peaks.get(_peak_key(c.precision))
    mfu = mfu_fault = None
    if rate is not None and peak is not None:
        if rate > peak["flop_per_s"]:
            mfu_fault = (f"network rate {rate / 1e9:.4g} GFLOP/s exceeds the measured peak "
                         f"{peak['flop_per_s'] / 1e9:.4g} GFLOP/s ({peak['shape']}, {peak['kernel']}): the peak "
                         "measurement is wrong, e.g. the machine was busy while it was timed")
        else:
            mfu = rate / peak["flop_per_s"]
    anchor = next((a for a in configs if a.anchor and a.batch_size == n), None)
    max_abs = rel_l2 = None
    if anchor is not None and anchor.latents is not None and c.latents is not None:
        d = (c.latents.double() - anchor.latents.double())
        max_abs = float(d.abs().max())
        rel_l2 = float(d.norm() / anchor.latents.double().norm().clamp_min(1e-30))
    backend = c.backend_obj
    describe = backend.describe() if hasattr(backend, "describe") else {}
    return {
        "precision": c.precision.value,
        "backend": c.backend.value,
        "batch_size": n,
        "anchor": c.anchor,
        "repeats_done": repeats_done,
        "samples_per_s": n / full_s if full_s else None,
        "samples_per_s_min": rates[0],
        "samples_per_s_max": rates[-1],
        "full_run_s_per_batch": full_s,
        "ms_per_step": 1e3 * full_s / steps_total if full_s else None,
        "ms_per_nfe": 1e3 * full_s / evals_total if full_s else None,
        "outside_network_share": max(0.0, 1.0 - net_s / window_s) if net_s is not None and window_s else None,
        "network_ms_per_forward": {f"{m}N": 1e3 * s for m, s in c.net_times.items()},
        "build_s": c.build_s,
        "first_sample_s": c.build_s + c.first_run_s,
        "peak_memory_bytes": c.peak_memory[0] if c.peak_memory[1] else None,
        "peak_memory_how": c.peak_memory[1] or None,
        "flops_per_sample_full_run": flops_full / n,
        "network_flops_per_s": rate,
        "mfu": mfu,
        "mfu_fault": mfu_fault,
        "mfu_peak_flops": peak["flop_per_s"] if peak else None,
        "mfu_peak_product": f"{peak['shape']}, {peak['kernel']}" if peak else None,
        "max_abs_vs_reference": max_abs,
        "rel_l2_vs_reference": rel_l2,
        "recompiles": int(getattr(backend, "recompiles", 0) or 0),
        "step_path": c.samplers[classes[0].rows].path,
        "backend_facts": describe,
    }


__all__ = ["BenchClock", "BenchError", "BenchJob", "random_model", "run_bench", "step_classes"]
