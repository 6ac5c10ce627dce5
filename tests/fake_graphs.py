"""A stand-in for torch's CUDA-graph API: the captured path (warm-up, capture, replay, reset) on the CPU.

A real ``torch.cuda.graph`` block records the device work its Python code enqueues and runs none of
it; ``graph.replay()`` runs that work again on the very addresses it was recorded on, without any
Python. The stand-in cannot record device work, so it records which launch of which loop the block
held (``CapturedLoop._launch(m)``: the only thing ``CapturedLoop.capture`` puts in a graph) and
replays by running that launch again on the same buffers. The block's Python code runs during the
"capture" (as it does during a real one), and here its kernel too, on a launch of that row count;
``CapturedLoop.capture`` restores the state afterwards either way. So on the CPU twin a replay
computes what a real one computes, and a test can count captures, replays and the network calls
that happen outside replays (a real replay makes none).

``FakeGraphs(monkeypatch)`` installs it; ``fail_capture`` / ``fail_replay`` make every capture /
replay raise the error a CUDA driver gives, for the fallback tests (``fail_replay`` = k: every
replay after the first k).
"""

from __future__ import annotations

import contextlib

import torch

from igengine.sampling import captured as captured_module
from igengine.sampling import sampler as sampler_module

CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"
REPLAY_ERROR = "CUDA error: an illegal memory access was encountered"


class FakeGraphs:
    def __init__(self, monkeypatch, fail_capture: bool = False, fail_replay: bool | int = False):
        self.graphs: list[_Graph] = []  # one per capture begun
        self.replays = 0
        self.recording: _Graph | None = None
        self.replaying = False
        self.fail_capture, self.fail_replay = fail_capture, fail_replay
        launch = captured_module.CapturedLoop._launch
        self._launch = launch
        fake = self

        def recording_launch(loop, m):
            if fake.recording is not None and fake.recording.launch is None:
                fake.recording.launch = (loop, m)
                # A real capture runs the Python code but no kernel; here the launch runs, so it must be
                # one that fits the buffers (a launch of this row count; capture() restores the state).
                loop.counter.fill_(loop.rows.index(m))
            return launch(loop, m)

        class _Stream:
            cuda_stream = 0

            def wait_stream(self, other):
                pass

        def graph_context(graph, pool=None, stream=None, **kwargs):
            return _Capture(fake, graph)

        available = lambda device: True  # noqa: E731
        monkeypatch.setattr(captured_module, "graphs_available", available)
        monkeypatch.setattr(sampler_module, "graphs_available", available)
        monkeypatch.setattr(captured_module.CapturedLoop, "_launch", recording_launch)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: _Graph(fake))
        monkeypatch.setattr(torch.cuda, "graph", graph_context)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())

    @property
    def captures(self) -> int:
        return len(self.graphs)


class _Graph:
    def __init__(self, fake: FakeGraphs):
        self.fake = fake
        self.launch = None
        fake.graphs.append(self)

    def replay(self) -> None:
        fake = self.fake
        if fake.fail_replay is True or (fake.fail_replay is not False and fake.replays >= fake.fail_replay):
            raise RuntimeError(REPLAY_ERROR)
        loop, m = self.launch
        fake.replays += 1
        fake.replaying = True
        try:
            fake._launch(loop, m)
        finally:
            fake.replaying = False


class _Capture:
    def __init__(self, fake: FakeGraphs, graph: _Graph):
        self.fake, self.graph = fake, graph

    def __enter__(self):
        self.fake.recording = self.graph
        return self.graph

    def __exit__(self, *exc):
        self.fake.recording = None
        if self.fake.fail_capture and exc[0] is None:
            raise RuntimeError(CAPTURE_ERROR)
        return False


class CountingNet:
    """A network wrapper counting calls made outside fake replays (a real replay makes no Python call)."""

    def __init__(self, inner, fake: FakeGraphs):
        self.inner, self.fake = inner, fake
        self.precision = getattr(inner, "precision", None)
        self.capturable = getattr(inner, "capturable", False)
        self.name = getattr(inner, "name", None)
        self.eager_calls = 0
        self.replayed_calls = 0

    def __call__(self, x, t, y):
        if self.fake.replaying:
            self.replayed_calls += 1
        else:
            self.eager_calls += 1
        return self.inner(x, t, y)
