"""What `igengine sample` tells its user while it waits and when there is nothing to do: a compile is
announced and timed (like an export on first use), a rerun of a finished run says it was complete."""

from __future__ import annotations

import json
import re
import time

import pytest

from igengine.cli import main


def _run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.err.splitlines(), json.loads(cap.out.strip().splitlines()[-1]) if code == 0 else None


@pytest.mark.parametrize("preflight", ["auto", "off"])
def test_the_compile_of_a_compiled_backend_is_announced_and_timed(tmp_path, capsys, monkeypatch, preflight):
    """Whether the preflight compiles it before the first chunk (auto) or the first batch does (off), the
    compile is one line before it starts and one with its seconds after; the manifest and the summary
    keep them (compile_s, part of setup_s). Inductor is replaced by the eager network, slowed down by a
    known time: what is under test is the report, not the compiler (the real compile is announced in
    tests/test_signals.py)."""
    from igengine.backends.compiled import CompiledBackend

    def compile_for_a_while(self):
        time.sleep(0.3)
        self._compiles_at_warmup = 0
        self.warmup_seconds = 0.3
        return {}

    monkeypatch.setattr(CompiledBackend, "warmup", compile_for_a_while)
    monkeypatch.setattr(CompiledBackend, "_run", lambda self, x, t, y: self.model(x, t, y))
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, lines, summary = _run(capsys, "sample", "--n", "4", "--steps", "3", "--backend", "compiled", "--precision",
                                "fp32", "--preflight", preflight, "--threads", "1", "--out", out)
    assert code == 0, lines
    cache = tmp_path / "cache" / "inductor"
    start = [i for i, line in enumerate(lines) if line.startswith("igengine: compiling SiT-digits (fp32, 4 and 8 rows "
                                                                  "per call, on cpu) with torch.compile (Inductor): ")]
    done = [i for i, line in enumerate(lines) if re.fullmatch(r"igengine: compiled in \d+\.\d s", line)]
    assert len(start) == 1 and len(done) == 1 and start[0] < done[0], lines
    assert f"later runs load it from the cache at {cache}" in lines[start[0]]
    seconds = float(lines[done[0]].split()[-2])
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    assert 0.3 <= timing["compile_s"] <= timing["setup_s"] + timing["wall_s"]
    assert abs(timing["compile_s"] - seconds) < 0.06
    assert summary["compile_s"] == timing["compile_s"]
    assert not any("chunk" in line for line in lines[:done[0]])  # announced before the first chunk, done with it


def test_a_rerun_of_a_finished_run_says_it_was_complete(tmp_path, capsys):
    out = tmp_path / "out"
    args = ("sample", "--n", "4", "--steps", "3", "--threads", "1", "--out", out)
    code, _, first = _run(capsys, *args)
    assert code == 0 and first["already_complete"] == 0
    code, lines, again = _run(capsys, *args)
    said = (f"all 4 samples were already complete in {out}: nothing was computed (the outputs were packed again "
            "from its chunks)")
    assert code == 0 and f"igengine: {said}" in lines, lines
    assert said in again["notes"] and again["already_complete"] == 4
    assert said not in first["notes"]
