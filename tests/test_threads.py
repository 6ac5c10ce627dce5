"""CPU thread choice (igengine.jobs.threads): --threads, OMP_NUM_THREADS, then the cores not busy."""

import json

import pytest
import torch

from igengine.errors import JobError
from igengine.jobs.threads import busy_cpus, choose_threads, usable_cpus, using_threads


def test_threads_asked_for_win_over_the_environment():
    c = choose_threads(3, environ={"OMP_NUM_THREADS": "5"}, load=0.0, cpus=8, torch_default=8)
    assert (c.threads, c.source) == (3, "threads")


def test_omp_num_threads_wins_over_auto_and_takes_the_first_level():
    assert choose_threads(None, environ={"OMP_NUM_THREADS": "5"}, load=7.0, cpus=8, torch_default=8).threads == 5
    c = choose_threads(None, environ={"OMP_NUM_THREADS": "4,2"}, load=0.0, cpus=8, torch_default=8)
    assert (c.threads, c.source) == (4, "OMP_NUM_THREADS")


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_a_bad_omp_num_threads_is_refused(bad):
    with pytest.raises(JobError, match="OMP_NUM_THREADS"):
        choose_threads(None, environ={"OMP_NUM_THREADS": bad}, load=0.0, cpus=8, torch_default=8)


def test_threads_below_one_are_refused():
    with pytest.raises(JobError, match="`threads` must be >= 1"):
        choose_threads(0, environ={})


@pytest.mark.parametrize("load, cpus, torch_default, want", [
    (0.0, 8, 8, 8),   # a quiet machine: every core
    (0.3, 2, 2, 2),   # noise below half a core does not cost a thread
    (1.0, 2, 2, 1),   # one core busy elsewhere: the other one
    (5.0, 2, 2, 1),   # oversubscribed: one thread, never zero
    (2.0, 16, 8, 8),  # at most torch's own default (physical cores)
    (0.0, 4, 16, 4),  # at most the usable CPUs (affinity, cgroup quota)
])
def test_auto_leaves_busy_cores_alone(load, cpus, torch_default, want):
    c = choose_threads(None, environ={}, load=load, cpus=cpus, torch_default=torch_default)
    assert (c.threads, c.source) == (want, "auto")
    assert "busy" in c.why


def test_machine_readings_are_sane():
    assert 1 <= usable_cpus()
    assert 0.0 <= busy_cpus(0.02) <= (__import__("os").cpu_count() or 1) + 1e-6


def test_using_threads_restores_the_count():
    before = torch.get_num_threads()
    with using_threads(choose_threads(1, environ={})):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_sample_records_and_restores_threads(tmp_path, monkeypatch):
    from igengine.jobs.sample import SampleJob, run_sample

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    result = run_sample(SampleJob(out=tmp_path / "o", n=2, batch_size=2, steps=3))
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["cpu_threads"] == {"threads": 1, "source": "OMP_NUM_THREADS", "why": "OMP_NUM_THREADS=1"}
    assert result.manifest["cpu_threads"]["threads"] == 1
    assert torch.get_num_threads() == before
