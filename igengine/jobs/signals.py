"""Ctrl-C and SIGTERM during a run: the first stops it cleanly, a second one at once.

``stop_on_signals()`` is the block a run executes in (``igengine.jobs.sample.run_sample``):
  * the first SIGINT or SIGTERM raises ``igengine.errors.Interrupted`` in the main thread, wherever
    the run is (loading, exporting an ONNX graph, compiling with Inductor, sampling, packing).
    Interrupted is a BaseException, so no ``except Exception`` on the way swallows it (see its
    docstring); the run records where it stands and the command exits with 128 + the signal. The
    compile jobs Inductor has queued are cancelled (``cancel_pending_compiles``);
  * a second one (a user who does not want to wait for that clean-up, or a clean-up that a
    library holds up) ends the process at once: one line on stderr, the processes the run started
    (Inductor's compile workers, a C++ compiler) are killed, and ``os._exit(128 + signal)``,
    with no Python clean-up. Nothing is half-written under a real name: every file of a run is
    written to a hidden temporary name and renamed when complete (``igengine.store.atomic``); a
    temporary file left behind is removed by the next run.

Outside the main thread (where Python cannot set handlers) the block changes nothing.
``report_then_exit_at_once()`` is for the command line, to report a stop: its one line, then any
further SIGINT or SIGTERM (during the interpreter's exit, which shuts Inductor's workers down) ends
the process at once, with the status of the first stop.

No torch here: ``igengine.cli`` imports it whatever the command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from igengine.errors import Interrupted, interruption

SIGNALS = (signal.SIGINT, signal.SIGTERM)
AGAIN = ("igengine: interrupted by {name} again: stopped at once; the chunks already written are complete and "
         "kept (rerun the same command to resume)\n")


def descendants(pid: int | None = None) -> list[int]:
    """The processes started by process ``pid`` (default: this one), their children and so on, read from
    /proc; deepest first. [] where there is no /proc."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found[::-1]


def kill_descendants(spare: frozenset[int] = frozenset()) -> None:
    """SIGKILL the processes this one started (``descendants``) but those in ``spare``: none is left
    holding the terminal or the output folder after ``os._exit``. Inductor's compile workers ignore
    SIGINT by design and would otherwise live on until their watchdog notices the parent is gone (up
    to a minute)."""
    for pid in descendants():
        if pid in spare:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def cancel_pending_compiles() -> None:
    """Cancel the compile jobs that Inductor has queued in this process and not started (C++ kernels wait in
    a thread pool of ``compile_threads`` threads): the interpreter's exit after a stop would otherwise
    compile every one of them first. The jobs under way finish (a few seconds); the next compile in this
    process gets a new pool. Nothing happens where Inductor was never imported."""
    module = sys.modules.get("torch._inductor.async_compile")
    pool = getattr(getattr(module, "AsyncCompile", None), "pool", None)
    try:
        if pool is not None and pool.cache_info().currsize:
            pool().shutdown(wait=False, cancel_futures=True)
            pool.cache_clear()
    except Exception:  # noqa: BLE001 - another torch's internals: the exit is only slower
        pass


def _restore_terminal() -> None:
    """A progress bar hides the cursor while it draws: show it again, on terminals only."""
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.write(fd, b"\x1b[?25h")
        except OSError:
            pass


def _exit_now(signum: int, line: str | None, spare: frozenset[int] = frozenset()) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    kill_descendants(spare)
    if line is not None:
        _restore_terminal()
        try:
            os.write(2, line.encode())
        except OSError:
            pass
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, the first SIGINT / SIGTERM raises ``Interrupted``, a second one ends the process
    at once (module docstring). The handlers found on entry are put back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[int] = []
    spare = frozenset(descendants())  # processes of the caller's (a program that runs igengine), not the run's

    def handler(signum, frame):
        if first:
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = f"signal {signum}"
            _exit_now(signum, AGAIN.format(name=name), spare)
        first.append(signum)
        raise Interrupted(signum)

    saved = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    except BaseException as e:
        if interruption(e) is not None:
            cancel_pending_compiles()
        raise
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def report_then_exit_at_once(status: int, line: str) -> None:
    """Write ``line`` (the report of a stop) to stderr, exactly once, and from now on end the process at once
    with ``status`` on any further SIGINT or SIGTERM (main thread only; elsewhere it only writes).

    A signal that arrives before the line is out writes it and exits; one that arrives after exits
    silently: either way the line is written once. The interpreter's exit after this (Inductor's
    workers are shut down then) cannot be held up by a library, nor print a traceback.
    """
    said: list[bool] = []

    def say(from_handler: bool) -> None:
        if said:
            return
        try:
            if from_handler:  # not through sys.stderr: the signal may have come in the middle of a write to it
                os.write(2, (line + "\n").encode())
            else:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        except (OSError, ValueError):
            pass
        said.append(True)

    if threading.current_thread() is not threading.main_thread():
        say(False)
        return

    def handler(signum, frame):
        if not said:
            _restore_terminal()
            say(True)
        _exit_now(status - 128, None)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    blocked = set(SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # the line and its flag together; a signal waits for both
    try:
        say(False)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


__all__ = ["cancel_pending_compiles", "descendants", "kill_descendants", "report_then_exit_at_once", "stop_on_signals"]
