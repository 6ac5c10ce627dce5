"""The captured fused loop: on CUDA every network evaluation and its fused step replay from a CUDA graph.

The fused loop (``igengine.sampling.fused``) still does per step what a CUDA graph cannot hold:
Python builds the time column, picks the buffers and passes the step's scalars by value. Here
everything a launch varies lives on the device, so one graph per network row count serves the
whole plan:
  * the plan's launch table (``launches.plan_launches``, packed by ``kernels.binding.pack_table``),
    the float32 network time of every launch (a row of R times per launch), the labels (N and 2N
    rows) and a launch counter;
  * static buffers: the state x (N, E), the network input (N or 2N rows), the Heun slope k1, the
    non-finite flags, a fault word.
One launch = ``t = t_rows[counter]`` by device-side indexing, the network on the static input of
R in {N, 2N} rows, then the indexed fused kernel, which runs ``table[counter]`` (writing x, k1 and
the next input as its kind requires) and advances the counter on the device.

On CUDA, ``capture`` warms every row count up on a side stream, captures one ``torch.cuda.CUDAGraph``
per row count R the plan uses (both in one private memory pool: nothing a graph allocates outlives
its replay, so they may share it whatever order they replay in) and restores the initial state.
``run`` then only picks, from the host-known plan, which graph to replay: it never waits for the
device. The non-finite flags, the fault word and the counter are read once, after the last launch
(``finish``). On the CPU the same launches run eagerly (the CPU twin reads the table on the host).

Capture once: a graph holds the raw addresses of the buffers it was captured on, so a loop serves
every later batch of the same N (and plan) by ``reset(seed, indices, labels)``, which copies the new
batch into those very buffers (the launch table when the seed changes, indices, labels, initial
state, counter, fault word and flags) and never reallocates one. The Sampler keeps one loop per row
count (``igengine.sampling.sampler``): a 50,000-sample run captures once per batch size it feeds.

The network must be capturable: no host synchronisation, no allocation that outlives the call, the
same kernels for the same shapes. The torch backend is (``capturable = True``); the ONNX Runtime and
TensorRT backends are not captured (their runtimes launch work on streams of their own), and the
Sampler gives them the fused loop. Results: equal to ``run_fused`` (the same kernel maths on the same
inputs; CPU twin: bit for bit, tests/test_captured.py; CUDA: within the kernel tolerance).
"""

from __future__ import annotations

import torch

from igengine.kernels.abi import Fault
from igengine.kernels.binding import fused_step_indexed, gaussian, pack_table
from igengine.kernels.library import KernelError, KernelLibrary
from igengine.noise import STREAM_INITIAL
from igengine.sampling.fused import kernel_ready
from igengine.sampling.launches import plan_launches
from igengine.sampling.loop import ModelFacts, Network, OnStep, cfg_labels, raise_if_nonfinite
from igengine.sampling.plan import Plan

PATH_CUDA_GRAPH = "cuda-graph"


def graphs_available(device: torch.device) -> bool:
    """Whether ``device`` can capture and replay CUDA graphs (a CUDA device; the one place that decides)."""
    return torch.device(device).type == "cuda"


class CapturedLoop:
    """One run over N samples: device tables, static buffers and, on CUDA, one graph per row count.

    Phases: the constructor (tables, buffers, initial state; may copy to the device and wait),
    ``capture()`` (CUDA only), ``run(on_step)`` (the launches, never waiting for the device) and
    ``finish()`` (one read of the flags: raises NonFiniteError / KernelError, or returns a copy of the
    latents). ``run_captured`` does all four. ``reset(seed, indices, labels)`` makes the loop ready for
    another batch of the same N in the same buffers: its graphs replay it without a new capture.
    """

    def __init__(self, net: Network, plan: Plan, facts: ModelFacts, seed: int, indices: torch.Tensor,
                 labels: torch.Tensor, *, device: torch.device, library: KernelLibrary):
        facts.check_plan(plan)
        steps = plan_launches(plan, seed)
        params = [p for sl in steps for p in sl.launches]
        # Launch j consumes network evaluation j: a step's only evaluation, or its predictor's and corrector's.
        evals = [ev for sl in steps for ev in sl.step.evals]
        if len(params) != len(evals):
            raise AssertionError(f"{len(params)} launches for {len(evals)} network evaluations")
        self.net, self.library, self.device = net, library, torch.device(device)
        self.shape = tuple(facts.latent_shape)
        self.rows = tuple(2 if ev.cfg else 1 for ev in evals)  # network rows of launch j, as a multiple of N
        self.step_ends: dict[int, int] = {}  # the last launch of step k -> k
        j = -1
        for k, sl in enumerate(steps):
            j += len(sl.launches)
            self.step_ends[j] = k
        self.num_steps = len(steps)
        self.plan = plan

        dev = self.device
        n = self.n = int(indices.numel())
        self.seed = seed
        self.table = pack_table(params, dev)
        # The network time of every launch, rounded from float64 as loop.time_column rounds it, one
        # column per network row: t_rows[m][counter] is launch counter's time input of m * N rows.
        t_table = torch.tensor([ev.t for ev in evals], dtype=torch.float64).float()
        self.t_rows = {m: t_table[:, None].expand(-1, m * n).contiguous().to(dev) for m in set(self.rows)}
        self.counter = torch.zeros(1, dtype=torch.int64, device=dev)
        self.fault = torch.zeros(2, dtype=torch.int64, device=dev)
        self.first_bad = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.idx = torch.empty(n, dtype=torch.int64, device=dev)
        e = 1
        for d in self.shape:
            e *= int(d)
        m = max(self.rows)
        self.x = torch.empty((n, e), dtype=torch.float32, device=dev)
        self.net_in = torch.empty((m * n, e), dtype=torch.float32, device=dev)
        self.k1 = torch.empty_like(self.x)
        self.t = torch.empty(m * n, dtype=torch.float32, device=dev)
        self.null_class = facts.null_class
        self.labels = {1: torch.empty(n, dtype=torch.int64, device=dev)}
        if m == 2:
            self.labels[2] = torch.empty(2 * n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.reset(seed, indices, labels)

    def reset(self, seed: int, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """Make the loop ready for samples ``indices`` (N of them, as before) of ``seed`` with ``labels``.

        Everything a batch changes is copied into the buffers the graphs were captured on (never a
        new tensor: a graph replays raw addresses): the launch table when the seed changes (its
        noise keys), the indices, the label rows, the initial state (both network-input halves), and
        the counter, fault word and non-finite flags are cleared. Enqueued on the current stream, so
        it is ordered after the previous batch's replays and before the next ones.
        """
        n = self.n
        if indices.numel() != n or labels.numel() != n:
            raise ValueError(f"this captured loop runs batches of {n} samples, got {indices.numel()} indices and "
                             f"{labels.numel()} labels")
        if seed != self.seed:
            self.table.copy_(pack_table([p for sl in plan_launches(self.plan, seed) for p in sl.launches]))
            self.seed = seed
        self.host_indices = indices  # for the messages of finish(); the graphs read self.idx
        self.idx.copy_(indices)
        y = labels.to(self.device)
        self.labels[1].copy_(y)
        if 2 in self.labels:
            self.labels[2].copy_(cfg_labels(y, self.null_class))
        self.x.copy_(gaussian(seed, self.idx, STREAM_INITIAL, self.shape, device=self.device,
                              library=self.library).reshape(n, -1))
        m, e = max(self.rows), self.x.shape[1]
        self.net_in.view(m, n, e).copy_(self.x.expand(m, n, e))  # both halves: the warm-up reads them too
        self.counter.zero_()
        self.fault.zero_()
        self.first_bad.fill_(-1)

    @property
    def num_launches(self) -> int:
        return len(self.rows)

    def _launch(self, m: int) -> None:
        """Launch ``counter`` on m * N network rows: time, network, indexed fused step (+ counter advance)."""
        r = m * self.n
        t = self.t[:r]
        torch.index_select(self.t_rows[m], 0, self.counter, out=t.view(1, r))
        v_final, v_inter = self.net(self.net_in[:r].view(r, *self.shape), t, self.labels[m])
        fused_step_indexed(self.table, self.counter, self.x, kernel_ready(v_final), kernel_ready(v_inter),
                           self.idx, self.k1, self.x, self.net_in, self.first_bad, fault=self.fault,
                           library=self.library)

    def capture(self) -> None:
        """CUDA: warm up and capture one graph per row count the plan uses, then restore the initial state."""
        if not graphs_available(self.device):
            raise ValueError(f"CUDA graphs need a CUDA device, the run is on {self.device}")
        first = {m: self.rows.index(m) for m in sorted(set(self.rows))}
        x0, net0 = self.x.clone(), self.net_in.clone()
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, kernels) happens outside a capture
                for m, j in first.items():
                    self.counter.fill_(j)  # a real launch of that row count, so its scalars fit
                    self._launch(m)
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            for m in first:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):  # recorded, not run
                    self._launch(m)
                self.graphs[m] = graph
            self.x.copy_(x0)
            self.net_in.copy_(net0)
            self.counter.zero_()
            self.first_bad.fill_(-1)
            self.fault.zero_()

    def run(self, on_step: OnStep | None = None) -> None:
        """Every launch of the plan, in order: graph replays (after ``capture``) or eager launches."""
        graphs = self.graphs
        if graphs:
            with torch.cuda.device(self.device):
                for j, m in enumerate(self.rows):
                    graphs[m].replay()
                    self._after(j, on_step)
        else:
            for j, m in enumerate(self.rows):
                self._launch(m)
                self._after(j, on_step)

    def _after(self, j: int, on_step: OnStep | None) -> None:
        if on_step is not None and j in self.step_ends:
            on_step(self.step_ends[j] + 1, self.num_steps)

    def finish(self) -> torch.Tensor:
        """The final states (N, C, H, W) float32, after one read of the fault word, counter and flags.

        A copy: the loop's own state buffer is the next batch's after ``reset``."""
        flags = torch.cat([self.fault, self.counter, self.first_bad]).cpu()
        code, launch, count = (int(v) for v in flags[:3])
        if code != Fault.NONE:
            name = Fault(code).name if code in tuple(Fault) else str(code)
            raise KernelError(f"launch {launch} of {self.num_launches} was refused on the device ({name}: its "
                              "scalars do not fit the captured buffers); the run has no result")
        if count != self.num_launches:
            raise KernelError(f"the launch counter reads {count} after {self.num_launches} launches")
        raise_if_nonfinite(flags[3:], self.host_indices)
        return self.x.view(self.n, *self.shape).clone()


def run_captured(net: Network, plan: Plan, facts: ModelFacts, seed: int, indices: torch.Tensor, labels: torch.Tensor,
                 *, device: torch.device, library: KernelLibrary, on_step: OnStep | None = None) -> torch.Tensor:
    """Final states (N, C, H, W) float32, as ``fused.run_fused`` computes them, with captured launches.

    On CUDA the launches replay from CUDA graphs (``net`` must be capturable: see the module
    docstring); on the CPU they run eagerly with the same structure.
    """
    loop = CapturedLoop(net, plan, facts, seed, indices, labels, device=device, library=library)
    if graphs_available(loop.device):
        loop.capture()
    loop.run(on_step)
    return loop.finish()


__all__ = ["PATH_CUDA_GRAPH", "CapturedLoop", "graphs_available", "run_captured"]
