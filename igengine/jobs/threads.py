"""How many CPU threads a run uses (torch's intra-op pool, and with it the CPU twin of the kernels).

torch starts one thread per physical core whatever else the machine is doing. On a shared machine
that oversubscribes the cores: OpenMP threads that wait at a barrier for a descheduled sibling make
every operator slow (8 digits took 34 to 53 s on a busy 2-core machine against 2.4 s with one
thread). So, in this order:

  1. ``threads`` asked for (``igengine sample --threads N``);
  2. ``OMP_NUM_THREADS``, when set to a positive integer (the convention of OpenMP, Slurm and torchrun);
  3. otherwise the cores this process may run on (CPU affinity and a cgroup CPU quota, at most
     torch's own default, the physical cores) less the cores that other work keeps busy now: the
     machine's busy time over 0.1 s from ``/proc/stat`` (while this process sleeps, so it does not
     count itself; the load average would count its own last run), at least one thread.

The thread count does not change which sample an index gets (the noise contract), and on the CPUs
we measured it does not change a sample's bits either (MKL and oneDNN split GEMMs over output
tiles, not over the summed dimension); it is recorded in the manifest and shown by `igengine info`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from igengine.errors import JobError

ENV = "OMP_NUM_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "threads", "OMP_NUM_THREADS" or "auto"
    why: str

    def to_dict(self) -> dict:
        return {"threads": self.threads, "source": self.source, "why": self.why}


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup v2 / v1 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup (``cpu.max`` of v2, ``cfs_quota_us / cfs_period_us`` of v1), None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def choose_threads(threads: int | None = None, environ: dict[str, str] | None = None,
                   load: float | None = None, cpus: int | None = None, torch_default: int | None = None) -> ThreadChoice:
    """The thread count of a run (see the module docstring); the keyword arguments are for tests."""
    env = os.environ if environ is None else environ
    if threads is not None:
        if threads < 1:
            raise JobError(f"`threads` must be >= 1, got {threads}")
        return ThreadChoice(threads, "threads", f"{threads} asked for")
    raw = env.get(ENV, "").strip()
    if raw:
        try:
            value = int(raw.split(",")[0])  # OpenMP allows a list per nesting level: the first is ours
        except ValueError:
            value = 0
        if value >= 1:
            return ThreadChoice(value, ENV, f"{ENV}={raw}")
        raise JobError(f"{ENV}={raw!r} is not a positive number of threads: set it to one, or unset it")
    cpus = usable_cpus() if cpus is None else cpus
    if torch_default is None:
        import torch

        torch_default = torch.get_num_threads()
    cores = max(1, min(cpus, torch_default))
    if load is None:
        load = busy_cpus()
    busy = int(math.floor(load + 0.5))
    chosen = max(1, min(cores, cpus - busy))
    why = f"{cores} core(s) usable, {load:.1f} busy with other work"
    return ThreadChoice(chosen, "auto", why)


def oversubscription(choice: ThreadChoice, cpus: int | None = None) -> str | None:
    """A warning when a thread count that was asked for (``threads`` or OMP_NUM_THREADS) exceeds the CPUs
    this process may use (``usable_cpus``); None otherwise. More threads than cores make OpenMP threads
    wait at every barrier for a descheduled sibling: 100 threads on 2 cores sampled the digits at 0.8
    samples/s against 11 with 2 (issue 19). The automatic choice never exceeds them."""
    if choice.source == "auto":
        return None
    cpus = usable_cpus() if cpus is None else cpus
    if choice.threads <= cpus:
        return None
    given = f"`threads` {choice.threads}" if choice.source == "threads" else f"{ENV}={choice.threads}"
    fix = (f"give `threads` {cpus} or fewer, or leave it out" if choice.source == "threads"
           else f"set {ENV} to {cpus} or fewer, or unset it")
    return (f"{given} is more than the {cpus} CPU core(s) this process may use: threads beyond the cores wait for "
            f"each other at every operator, which makes the run several times slower; {fix} (igengine then takes "
            "the cores that other work leaves free)")


def busy_cpus(interval_s: float = 0.1) -> float:
    """CPUs busy with other work now: non-idle time over ``interval_s`` in ``/proc/stat`` (this process
    sleeps meanwhile); the 1-minute load average where /proc/stat cannot be read."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
        ncpu = os.cpu_count() or 1
        if total1 <= total0:
            return 0.0
        return max(0.0, (1 - (idle1 - idle0) / (total1 - total0)) * ncpu)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


@contextlib.contextmanager
def using_threads(choice: ThreadChoice) -> Iterator[None]:
    """torch's intra-op thread count set to the choice while the block runs, restored afterwards
    (a library call leaves the process as it found it)."""
    import torch

    before = torch.get_num_threads()
    if before != choice.threads:
        torch.set_num_threads(choice.threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


__all__ = ["ThreadChoice", "busy_cpus", "choose_threads", "oversubscription", "usable_cpus", "using_threads"]
