"""Capture once (issue 18): a Sampler captures one loop per batch size and resets it in place for
every batch; `igengine bench` times a captured row's replays and read-back only.

The CUDA-graph API is replaced by ``tests.fake_graphs`` (a capture records which launch it held, a
replay runs that launch again on the same buffers), so the captured path runs on the CPU twin,
where it is bit-equal to the fused loop (tests/test_captured.py): a reset that forgot a buffer, or
one that wrote a new tensor instead of the captured one, shows as a different result.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from igengine.backends import network
from igengine.config import BackendName, Precision, Solver
from igengine.sampling import ModelFacts, Sampler, build_plan

from tests import kernel_parity as P
from tests.fake_graphs import CountingNet, FakeGraphs


def _sampler(fake, name="SiT-S/2", solver=Solver.SDE, cfg_interval=(0.0, 0.7), shift=0.0, steps=6):
    backend = P.tiny_backend(name)
    cfg = P.e2e_sampler(solver, cfg_interval, shift, steps=steps)
    net = CountingNet(network(backend), fake)
    s = Sampler(net, build_plan(backend.config.family, cfg), ModelFacts.of(backend.config), Precision.FP32, "cpu")
    # The same maths uncaptured, on its own network (its calls are not counted).
    fused = replace(s, net=network(backend), capture="off")
    return s, fused, net


@pytest.mark.parametrize("name, solver, cfg_interval, shift", [
    ("SiT-S/2", Solver.SDE, (0.0, 0.7), 0.0),
    ("LightningDiT-B/1", Solver.HEUN2, (0.19, 1.0), 0.3),
], ids=["sit-sde", "lightningdit-heun2"])
def test_one_capture_per_batch_size_and_every_batch_equals_the_fused_loop(twin_discovered, monkeypatch, name, solver,
                                                                          cfg_interval, shift):
    fake = FakeGraphs(monkeypatch)
    s, fused, net = _sampler(fake, name, solver, cfg_interval, shift)
    assert s.path == "cuda-graph" and fused.path == "cpu-twin"
    row_counts = {2 if ev.cfg else 1 for st in s.plan.steps for ev in st.evals}
    assert row_counts == {1, 2}, "the plan must use both graphs (CFG switches inside it)"
    # Batches of 4 with new seeds (a new launch table), indices and labels, a smaller one, then 4 again.
    batches = [(5, [0, 1, 2, 3], [1, 2, 3, 4]), (5, [4, 5, 6, 7], [9, 9, 0, 1]),
               (2**40 + 3, [2**33, 8, 9, 1], [0, 1, 2, 3]), (7, [10, 11], [5, 6]), (5, [0, 1, 2, 3], [1, 2, 3, 4])]
    results = []
    pointers = None
    for k, (seed, idx, lab) in enumerate(batches):
        got = s(seed, torch.tensor(idx), torch.tensor(lab))
        want = fused(seed, torch.tensor(idx), torch.tensor(lab))
        assert torch.equal(got, want), f"batch {k}: {P.rel_err(got, want)}"
        results.append((got, got.clone()))
        loop = s._ladder.loops[4]
        ptrs = {name: t.data_ptr() for name, t in vars(loop).items()
                if isinstance(t, torch.Tensor) and name != "host_indices"}  # the rest is what graphs read
        ptrs.update({f"labels{m}": t.data_ptr() for m, t in loop.labels.items()})
        if pointers is None:
            pointers = ptrs
        assert ptrs == pointers, "a reset must copy into the captured buffers, never replace one"
    assert torch.equal(results[0][0], results[-1][0]), "the same batch again gives the same samples"
    for got, saved in results:
        assert torch.equal(got, saved), "a returned batch must not change when the loop runs the next one"
    assert fake.captures == 2 * len(row_counts), "one capture per row count for N = 4 and for N = 2, no more"
    assert set(s._ladder.loops) == {4, 2}
    # Outside replays the network ran only for the warm-up and the capture of each row count of each loop.
    assert net.eager_calls == 2 * fake.captures
    launches = sum(len(st.evals) for st in s.plan.steps)
    assert fake.replays == net.replayed_calls == launches * len(batches)
    assert s.fallbacks == ()


def test_prepare_captures_or_resets_and_its_function_only_replays(twin_discovered, monkeypatch):
    fake = FakeGraphs(monkeypatch)
    s, fused, net = _sampler(fake)
    launches = sum(len(st.evals) for st in s.plan.steps)
    for k, seed in enumerate((3, 4, 4)):
        run = s.prepare(seed, torch.arange(3), torch.tensor([1, 2, 3]))
        captures, eager, replays = fake.captures, net.eager_calls, fake.replays
        assert captures == 2 and replays == launches * k, "prepare captures the first time, then only resets"
        out = run()
        assert (fake.captures, net.eager_calls) == (captures, eager), "the launches capture nothing, call nothing"
        assert fake.replays == replays + launches
        assert torch.equal(out, fused(seed, torch.arange(3), torch.tensor([1, 2, 3])))


def test_a_sampler_keeps_a_bounded_number_of_captured_loops_and_releases_them(twin_discovered, monkeypatch):
    from igengine.sampling.sampler import MAX_CAPTURED_LOOPS

    fake = FakeGraphs(monkeypatch)
    s, _, _ = _sampler(fake, steps=2)
    for n in range(1, MAX_CAPTURED_LOOPS + 3):
        s(0, torch.arange(n), torch.zeros(n, dtype=torch.int64))
    assert list(s._ladder.loops) == list(range(3, MAX_CAPTURED_LOOPS + 3)), "the least recently used go first"
    captures = fake.captures
    s.release()
    assert not s._ladder.loops
    s(0, torch.arange(3), torch.zeros(3, dtype=torch.int64))
    assert fake.captures > captures and s.path == "cuda-graph"


def test_bench_times_replays_only_and_captures_in_warm_up(twin_discovered, monkeypatch, tmp_path):
    """Every timed window of a captured row: no capture, no network call outside the replays, and
    exactly one replay per network evaluation of the window (today's bench built and captured a new
    loop inside each window: a warm-up forward and a capture per row count)."""
    import igengine.bench.job as bench
    from igengine.models.checkpoint import save_safetensors
    from tests.conftest import tiny_model

    fake = FakeGraphs(monkeypatch)
    nets = []

    def counting_network(backend):
        nets.append(CountingNet(network(backend), fake))
        return nets[-1]

    windows = []
    timed = bench._timed

    def watched(fn, device):
        before = (fake.captures, sum(n.eager_calls for n in nets), fake.replays)
        dt, out = timed(fn, device)
        if isinstance(out, torch.Tensor):  # a window (prepare returns a function, a forward a pair)
            after = (fake.captures, sum(n.eager_calls for n in nets), fake.replays)
            windows.append(tuple(a - b for a, b in zip(after, before)) + (out.shape[0],))
        return dt, out

    monkeypatch.setattr(bench, "network", counting_network)
    monkeypatch.setattr(bench, "_timed", watched)
    ckpt = tmp_path / "tiny.safetensors"
    save_safetensors(tiny_model("sit", in_channels=1, input_size=8), ckpt,
                     sampler_defaults={"solver": "sde", "steps": 6, "cfg_scale": 1.5, "cfg_interval": [0.0, 0.6]})
    job = bench.BenchJob(ckpt=ckpt, pairs=((Precision.FP32, BackendName.TORCH),), anchor=False, batch_sizes=(2, 3),
                         steps=2, repeats=2, warmup=1, device="cpu")
    report = bench.run_bench(job)
    assert [r["step_path"] for r in report["rows"]] == ["cuda-graph", "cuda-graph"]
    classes = report["workload"]["classes"]
    evals = {c["window_steps"] * len(c["rows_per_eval"]) for c in classes}
    # The captures: in warm-up, one per (batch size, class window) and row count of that window; then
    # again for each row's peak-memory run (its first class), whose peak includes its capture.
    assert fake.captures == 2 * sum(len(set(c["rows_per_eval"])) for c in classes) + 2 * len(
        set(classes[0]["rows_per_eval"]))
    # Windows: warm-up and repeats (2 rows x classes each), and each row's peak-memory run.
    assert len(windows) == (1 + 2) * 2 * len(classes) + 2
    for captures, eager_calls, replays, rows in windows:
        assert captures == 0 and eager_calls == 0, "a window captured or ran the network outside a replay"
        assert replays in evals
