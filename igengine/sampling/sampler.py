"""``Sampler``: a plan, a network and a generator bound together, and the one place that picks the loop.

    sampler = Sampler(net, plan, ModelFacts.of(config), precision=Precision.FP32, device="cpu")
    latents = sampler(seed=0, indices=torch.arange(8), labels=torch.arange(8))   # (8, C, H, W) float32

Everything the sampler uses is an argument: the network callable, the plan (times, guidance), the
model facts, the precision (``igengine.precision.policy``: state dtype, fused kernels or not) and
the randomness (default: the kernel library's device generator where one is loaded, NumPy
otherwise; the same numbers). Which loop runs (``path``):
  * ``cuda-graph``: the captured loop (``igengine.sampling.captured``): network and fused step
    replayed from CUDA graphs, when the fused loop would run on CUDA, ``capture`` is 'auto' and the
    network declares ``capturable = True`` (the torch backend does; ONNX Runtime and TensorRT do not);
  * ``cuda`` / ``cpu-twin``: the fused loop (``igengine.sampling.fused``), for precisions with a
    float32 state when a kernel library is loaded for the device and the default randomness is used;
  * ``reference``: the plain loop (``igengine.sampling.loop``) otherwise.
A network that declares ``precision`` (every igengine backend does) must have been built for the
sampler's precision: a mismatch is a PrecisionMismatchError, never a silently mislabelled run.

The ladder. Those loops, in that order, are the rungs a sampler may run (``ladder``); it starts on
the first one its arguments allow (``kernels='off'`` starts on ``reference``, ``capture='off'`` below
``cuda-graph``; ``demote`` moves it down from outside, e.g. after a check). When a fast rung fails
while it runs (a capture, a replay, a kernel launch, the fault word or the launch counter, any
error of the loop's own that is not the request's or the result's), the batch is computed again on
the next rung from the same noise (a sample is a pure function of (seed, index), the noise
contract: the same samples, up to that rung's rounding), the sampler stays there for every later
batch, and ONE warning names the cause and the argument that starts a run on that rung
(``on_fallback``, else a ``FallbackWarning``; ``fallbacks`` keeps them).
What the ladder leaves alone: errors in the request (``igengine.errors.InputError``, ValueError
preconditions), NaN/Inf in the result (``NonFiniteError``: every rung computes the same function, so
it would come back, only later), running out of memory (the lower rungs need no less), interrupts.
When the last rung fails too, ``SamplingError`` (one line) names every loop tried and its error.
A network that replaces itself by an equivalent one (``igengine.errors.NetworkReplaced``: a compiled
backend that could not compile, now eager) has its batch computed again on the same rung.

Captured loops are kept, one per batch size N, and reset in place for each batch
(``CapturedLoop.reset``): a run captures once per N it feeds, not once per batch.
``prepare(seed, indices, labels)`` does everything of a call but its launches (a capture or a reset
on the ``cuda-graph`` rung) and returns the function that launches them, for timings of the
launches alone (``igengine bench``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from igengine.config import Precision
from igengine.errors import IgengineError, NetworkReplaced, SamplingError, interruption
from igengine.kernels import library as kernel_library
from igengine.kernels import trusted
from igengine.noise import check_indices, check_seed
from igengine.precision import PrecisionPolicy, check_network_precision, policy
from igengine.sampling.captured import PATH_CUDA_GRAPH, CapturedLoop, graphs_available
from igengine.sampling.fused import run_fused
from igengine.sampling.loop import ModelFacts, Network, OnStep, run_reference
from igengine.sampling.plan import Plan
from igengine.sampling.randomness import NUMPY, Randomness, default_randomness, kernel_randomness

KERNEL_CHOICES = ("auto", "off")
CAPTURE_CHOICES = ("auto", "off")

# What each rung is called in messages, and what starts a run below it (library argument names in
# backquotes, which the CLI turns into its flags; IGENGINE_KERNELS is an environment variable).
RUNG_NAMES = {
    PATH_CUDA_GRAPH: "the captured loop",
    kernel_library.PATH_CUDA: "the fused loop",
    kernel_library.PATH_CPU: "the fused loop",
    kernel_library.PATH_REFERENCE: "the reference loop",
}
STARTS_BELOW = {
    PATH_CUDA_GRAPH: "`capture` off",
    kernel_library.PATH_CUDA: "IGENGINE_KERNELS=off in the environment",
    kernel_library.PATH_CPU: "IGENGINE_KERNELS=off in the environment",
}
MAX_CAPTURED_LOOPS = 4  # batch sizes whose captured loops are kept (a run feeds one to three)
_MAX_REPLACEMENTS = 4  # a network replaces itself once; more in one call is a loop, not a fallback


class FallbackWarning(RuntimeWarning):
    """A sampler (or its network) fell back to a slower, equivalent implementation; the message says why."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of an exception, at most ``limit`` characters."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_runtime_failure(e: BaseException) -> bool:
    """Whether an exception raised while a loop (or a network) runs is that implementation failing.

    True for the loop's own failures: KernelError and other RuntimeErrors (a CUDA or cuBLAS error, a
    capture refused), a missing API (AttributeError, NotImplementedError), ... False for what a
    slower implementation would not change: igengine's own errors (a bad request, NaN/Inf in the
    result), ValueError (a precondition), running out of memory, and interrupts: BaseExceptions such
    as ``Interrupted`` and KeyboardInterrupt (never caught as an Exception), and any exception a
    library raised from one (``igengine.errors.interruption``: e.g. a compiler's wrapper of it).
    """
    if isinstance(e, (IgengineError, ValueError)) or not isinstance(e, Exception) or interruption(e) is not None:
        return False
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return not (oom is not None and isinstance(e, oom))


def _samples(indices: torch.Tensor) -> str:
    idx = indices.reshape(-1)
    if idx.numel() == 0:
        return "no samples"
    first, last = int(idx[0]), int(idx[-1])
    if idx.numel() == 1:
        return f"sample {first}"
    if last - first + 1 == idx.numel():
        return f"samples {first}..{last}"
    return f"{idx.numel()} samples from index {first}"


@dataclass(frozen=True)
class Fallback:
    """One step down: ``source`` failed (or was set aside) and ``target`` runs from then on.

    kind: 'loop' (a rung of the sampler's ladder: ``source``/``target`` are paths such as
    'cuda-graph') or 'network' (the network replaced itself: backend names). cause: the error, one
    line (or the reason given to ``Sampler.demote``). starts_there: what starts a run on ``target``
    (e.g. "`capture` off"). samples: the batch that was computed again ("samples 256..319"), None
    when the sampler was moved between batches.
    """

    kind: str
    source: str
    target: str
    cause: str
    starts_there: str | None = None
    samples: str | None = None

    @property
    def message(self) -> str:
        if self.kind == "loop":
            src = f"{RUNG_NAMES.get(self.source, self.source)} ({self.source})"
            dst = f"{RUNG_NAMES.get(self.target, self.target)} ({self.target})"
        else:
            src, dst = f"the {self.source} network", f"the {self.target} network"
        if self.samples is not None:
            text = (f"{src} failed on {self.samples} ({self.cause}); computed them again on {dst}, "
                    "which the rest of the run uses")
        else:
            text = f"{self.cause}: the run uses {dst} from here on instead of {src}"
        return text + (f"; {self.starts_there} starts a run there" if self.starts_there else "")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "from": self.source, "to": self.target, "cause": self.cause,
                "samples": self.samples, "starts_there": self.starts_there}


class _Ladder:
    """A sampler's mutable part: the rung it is on, what made it move, and its captured loops."""

    def __init__(self, rungs: tuple[str, ...]):
        self.rungs = rungs
        self.at = 0
        self.fallbacks: list[Fallback] = []
        self.loops: OrderedDict[int, CapturedLoop] = OrderedDict()


@dataclass(frozen=True)
class Sampler:
    """Draws final latents for given (seed, sample indices, labels); no state changes a result.

    net: ``(x, t, y) -> (v_final, v_inter)``; plan: ``igengine.sampling.plan.build_plan``; facts:
    ``ModelFacts``; precision: the run's precision; device: where the state lives; randomness: a
    ``Randomness`` (None = ``default_randomness(device)``); kernels: 'auto' (fused loop where
    possible) or 'off' (always the reference loop, for A/B comparisons); capture: 'auto' (CUDA
    graphs where the fused loop runs on CUDA and ``net.capturable`` is True) or 'off'; on_fallback:
    called with each ``Fallback`` when the sampler moves down its ladder (None: a FallbackWarning).

    What it keeps between calls never changes a sample: the rung it runs on (see the module
    docstring) and its captured loops (buffers and graphs, reset for every batch).
    """

    net: Network
    plan: Plan
    facts: ModelFacts
    precision: Precision
    device: torch.device
    randomness: Randomness | None = None
    kernels: str = "auto"
    capture: str = "auto"
    on_fallback: Callable[[Fallback], None] | None = field(default=None, compare=False, repr=False)
    numerics: PrecisionPolicy = field(init=False)
    _library: kernel_library.KernelLibrary | None = field(init=False, repr=False)
    _reference_randomness: Randomness = field(init=False, repr=False)
    _ladder: _Ladder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "precision", Precision(self.precision))
        set_(self, "device", _resolve_device(self.device))
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"`kernels` must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.capture not in CAPTURE_CHOICES:
            raise ValueError(f"`capture` must be one of {', '.join(CAPTURE_CHOICES)}, got {self.capture!r}")
        self.facts.check_plan(self.plan)
        set_(self, "numerics", policy(self.precision, self.facts.family))
        check_network_precision(getattr(self.net, "precision", None), self.numerics)
        lib = None
        if self.kernels == "auto" and self.numerics.fused_kernels and self.randomness is None:
            lib = trusted.library_for(self.device)  # a CUDA build self-tested on this device first
        set_(self, "_library", lib)
        rungs = []
        if (self.capture == "auto" and lib is not None and graphs_available(self.device)
                and getattr(self.net, "capturable", False) is True):
            rungs.append(PATH_CUDA_GRAPH)
        if lib is not None:
            rungs.append(kernel_library.PATH_CUDA if lib.kind == "cuda" else kernel_library.PATH_CPU)
        rungs.append(kernel_library.PATH_REFERENCE)
        set_(self, "_ladder", _Ladder(tuple(rungs)))
        # The fused loops draw in the kernel library they run on. The reference loop takes the
        # argument; below a kernel rung it draws with NumPy (the same numbers), never with the
        # library it fell back from.
        set_(self, "_reference_randomness", self.randomness if self.randomness is not None else
             NUMPY if lib is not None else default_randomness(self.device))

    # -- where it stands ----------------------------------------------------------------------------
    @property
    def ladder(self) -> tuple[str, ...]:
        """Every rung this sampler may run, fastest first (its start, then what it falls back to)."""
        return self._ladder.rungs

    @property
    def path(self) -> str:
        """'cuda-graph', 'cuda', 'cpu-twin' or 'reference': the loop the next batch runs on (the last
        batch's, once computed)."""
        return self._ladder.rungs[self._ladder.at]

    @property
    def fallbacks(self) -> tuple[Fallback, ...]:
        """Every move down the ladder (and every network replacement) so far, in order."""
        return tuple(self._ladder.fallbacks)

    @property
    def kernel_build(self) -> dict | None:
        """Which build of the kernels the fused step runs ({'build': 'cmake' or 'nvrtc', 'path', 'info'}),
        None on the reference path."""
        if self._library is None or self.path == kernel_library.PATH_REFERENCE:
            return None
        return self._library.build_facts(self.device)

    @property
    def generator(self) -> str:
        """Which generator of the noise contract draws the numbers ('cuda-kernel', 'cpu-twin' or 'numpy')."""
        return self._randomness_on(self.path).name

    def describe(self) -> dict:
        return {"step": self.path, "noise_generator": self.generator, **self.numerics.describe()}

    def _randomness_on(self, path: str) -> Randomness:
        if path == kernel_library.PATH_REFERENCE:
            return self._reference_randomness
        return kernel_randomness(self._library)

    def release(self) -> None:
        """Drop the captured loops (their graphs, memory pools and buffers); the next call captures again."""
        self._ladder.loops.clear()

    # -- moving down ----------------------------------------------------------------------------------
    def demote(self, to: str, cause: str, starts_there: str | None = None) -> Fallback | None:
        """Move down the ladder to rung ``to`` for every later batch, between batches (e.g. when a check
        finds a fast rung wrong); recorded and reported like a fallback. None if already there.

        ``starts_there`` defaults to the argument that starts a run below the current rung.
        """
        rungs = self._ladder.rungs
        if to not in rungs:
            raise ValueError(f"`to` {to!r} is not a rung of this sampler ({', '.join(rungs)})")
        if rungs.index(to) < self._ladder.at:
            raise ValueError(f"`to` {to!r} is above the rung the sampler is on ({self.path}): "
                             "a sampler only moves down")
        if to == self.path:
            return None
        return self._move(to, cause, samples=None, starts_there=starts_there)

    def _move(self, to: str, cause: str, samples: str | None, starts_there: str | None = None) -> Fallback:
        ladder = self._ladder
        source = self.path
        if starts_there is None:  # what starts a run below the rung just above ``to`` (and so on ``to``)
            starts_there = STARTS_BELOW.get(ladder.rungs[ladder.rungs.index(to) - 1])
        ladder.at = ladder.rungs.index(to)
        if to != PATH_CUDA_GRAPH:
            ladder.loops.clear()  # their graphs and buffers go with the rung
        event = Fallback("loop", source, to, cause, starts_there, samples)
        self._report(event)
        return event

    def _report(self, event: Fallback) -> None:
        self._ladder.fallbacks.append(event)
        if self.on_fallback is not None:
            self.on_fallback(event)
        else:
            warnings.warn(event.message, FallbackWarning, stacklevel=2)

    # -- calls ------------------------------------------------------------------------------------------
    def __call__(self, seed: int, indices: Sequence[int] | np.ndarray | torch.Tensor,
                 labels: Sequence[int] | np.ndarray | torch.Tensor, on_step: OnStep | None = None) -> torch.Tensor:
        """Final latents (N, C, H, W) float32 on ``device`` for samples ``indices`` of ``seed`` with class ``labels``."""
        return self.prepare(seed, indices, labels, on_step)()

    def prepare(self, seed: int, indices: Sequence[int] | np.ndarray | torch.Tensor,
                labels: Sequence[int] | np.ndarray | torch.Tensor,
                on_step: OnStep | None = None) -> Callable[[], torch.Tensor]:
        """Everything of ``self(seed, indices, labels)`` but the launches; returns the function that runs them.

        On the ``cuda-graph`` rung: the loop of this batch size, captured the first time and reset in
        place for this batch; the returned function replays the graphs and reads the result back.
        On the other rungs the returned function is the whole call. A failure on either side falls
        back as a call does. Call the returned function once.
        """
        seed = check_seed(seed)
        indices = check_indices(indices)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != indices.shape[0]:
            raise ValueError(f"{labels.shape[0]} `labels` for {indices.shape[0]} sample `indices`")
        call = _Call(self, seed, indices, labels, on_step)
        call.prepare()
        return call.run

    def run_on(self, path: str, seed: int, indices: Sequence[int] | np.ndarray | torch.Tensor,
               labels: Sequence[int] | np.ndarray | torch.Tensor, on_step: OnStep | None = None) -> torch.Tensor:
        """The final latents of rung ``path`` alone (one of ``ladder``), whatever rung the sampler is on:
        no fallback, nothing recorded; its errors are raised as they are (for checks of one rung)."""
        if path not in self._ladder.rungs:
            raise ValueError(f"`path` {path!r} is not a rung of this sampler ({', '.join(self._ladder.rungs)})")
        seed = check_seed(seed)
        indices = check_indices(indices)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != indices.shape[0]:
            raise ValueError(f"{labels.shape[0]} `labels` for {indices.shape[0]} sample `indices`")
        return self._prepare_on(path, seed, indices, labels, on_step)()

    def _prepare_on(self, path: str, seed: int, indices: torch.Tensor, labels: torch.Tensor,
                    on_step: OnStep | None) -> Callable[[], torch.Tensor]:
        """Rung ``path``'s preparation for one batch, and the function that computes it."""
        if path == PATH_CUDA_GRAPH:
            loop = self._captured_loop(seed, indices, labels)

            def replay() -> torch.Tensor:
                loop.run(on_step)
                return loop.finish()

            return replay
        if path == kernel_library.PATH_REFERENCE:
            return lambda: run_reference(self.net, self.plan, self.facts, seed, indices, labels,
                                         state_dtype=self.numerics.state_dtype, device=self.device,
                                         randn=self._reference_randomness, on_step=on_step)
        return lambda: run_fused(self.net, self.plan, self.facts, seed, indices, labels, device=self.device,
                                 library=self._library, on_step=on_step)

    def _captured_loop(self, seed: int, indices: torch.Tensor, labels: torch.Tensor) -> CapturedLoop:
        """The captured loop of this batch size, reset for this batch; built and captured the first time."""
        loops = self._ladder.loops
        n = int(indices.numel())
        loop = loops.get(n)
        if loop is not None:
            loops.move_to_end(n)
            loop.reset(seed, indices, labels)
            return loop
        loop = CapturedLoop(self.net, self.plan, self.facts, seed, indices, labels, device=self.device,
                            library=self._library)
        loop.capture()
        loops[n] = loop  # only once captured: a failed capture leaves nothing behind
        while len(loops) > MAX_CAPTURED_LOOPS:
            loops.popitem(last=False)
        return loop


class _Call:
    """One batch through the ladder: prepared on the sampler's rung, run, and on a rung's failure
    computed again from the start on the next one."""

    def __init__(self, sampler: Sampler, seed: int, indices: torch.Tensor, labels: torch.Tensor,
                 on_step: OnStep | None):
        self.s, self.seed, self.indices, self.labels, self.on_step = sampler, seed, indices, labels, on_step
        self.path: str | None = None
        self.launch: Callable[[], torch.Tensor] | None = None
        self.failures: list[tuple[str, BaseException]] = []
        self.replaced = 0
        self.earlier = [f.source for f in sampler.fallbacks if f.kind == "loop"]  # moves before this call

    def prepare(self) -> None:
        while self.launch is None:
            path = self.s.path
            try:
                self.launch = self.s._prepare_on(path, self.seed, self.indices, self.labels, self.on_step)
                self.path = path
            except Exception as e:  # noqa: BLE001 - sorted by is_runtime_failure in _failed
                self._failed(path, e)

    def run(self) -> torch.Tensor:
        while True:
            if self.launch is None or self.path != self.s.path:  # moved down since it was prepared
                self.launch = None
                self.prepare()
            try:
                return self.launch()
            except Exception as e:  # noqa: BLE001 - sorted by is_runtime_failure in _failed
                self.launch = None
                self._failed(self.path, e)

    def _failed(self, path: str, e: Exception) -> None:
        """Record the failure of rung ``path`` and move down, or re-raise what the ladder does not handle."""
        s = self.s
        if (stop := interruption(e)) is not None:  # a stop that a library wrapped is still a stop
            raise stop from None
        if isinstance(e, NetworkReplaced) and self.replaced < _MAX_REPLACEMENTS:
            self.replaced += 1
            s._report(Fallback("network", e.source, e.target, e.cause, e.starts_there, _samples(self.indices)))
            return  # the same rung again, with the network's replacement
        if not is_runtime_failure(e):
            raise e
        self.failures.append((path, e))
        rungs = s.ladder
        if path != s.path:  # another call moved the sampler down meanwhile: try where it is now
            return
        if rungs.index(path) + 1 >= len(rungs):
            tried = "; ".join(f"{RUNG_NAMES.get(p, p)} ({p}): {one_line(err)}" for p, err in self.failures)
            before = f" (earlier batches had fallen back from {', '.join(self.earlier)})" if self.earlier else ""
            raise SamplingError(f"{_samples(self.indices)} could not be computed on any loop{before}: {tried}") from e
        s._move(rungs[rungs.index(path) + 1], one_line(e), samples=_samples(self.indices))


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def sample(net: Network, plan: Plan, facts: ModelFacts, seed: int, indices, labels, *, precision: Precision | str,
           device: torch.device | str = "cpu", randomness: Randomness | None = None, kernels: str = "auto",
           capture: str = "auto", on_step: OnStep | None = None) -> torch.Tensor:
    """One call of a ``Sampler`` built from the same arguments (see its docstring)."""
    return Sampler(net, plan, facts, Precision(precision), torch.device(device), randomness, kernels, capture)(
        seed, indices, labels, on_step)


__all__ = ["CAPTURE_CHOICES", "KERNEL_CHOICES", "Fallback", "FallbackWarning", "Sampler", "is_runtime_failure",
           "one_line", "sample"]
