"""Ctrl-C and SIGTERM during a run: the first stops it cleanly, a second one at once.

``stop_on_signals()`` is the block a run executes in (``igengine.jobs.sample.run_sample``):
  * the first SIGINT or SIGTERM raises ``igengine.errors.Interrupted`` in the main thread, wherever
    the run is (loading, exporting an ONNX graph, compiling with Inductor, sampling, packing).
    Interrupted is a BaseException, so no ``except Exception`` on the way swallows it (see its
    docstring); where Python still loses it (raised inside a weakref callback or a ``__del__``, whose
    exceptions are printed and dropped, or met by an ``except BaseException: pass``) it is raised
    again (at once where Python reports the drop, else every ``REDELIVER_S``) until the run has
    caught it (``stop_received``). The run records where it stands and the command exits with 128 +
    the signal. The compile jobs Inductor has queued are cancelled (``cancel_pending_compiles``);
  * a repeat within ``REPEAT_GRACE_S`` of the first is the same stop delivered twice (a terminal's
    Ctrl-C, then torchrun's forward of it) and does nothing more;
  * a second one, ``REPEAT_GRACE_S`` or more after the first (a user who does not want to wait for
    that clean-up, or a clean-up that a library holds up), ends the process at once: one line on
    stderr, the processes the run started (Inductor's compile workers, a C++ compiler) are killed,
    and ``os._exit(128 + signal)``, with no Python clean-up. Nothing is half-written under a real
    name: every file of a run is written to a hidden temporary name and renamed when complete
    (``igengine.store.atomic``); a temporary file left behind is removed by the next run.

Outside the main thread (where Python cannot set handlers) the block changes nothing.
``report_then_exit_at_once()`` and ``end_stopped_process()`` are for the command line, to report a
stop (its one line; any further SIGINT or SIGTERM from then on ends the process at once, with the
status of the first stop) and to end the process after it.

No torch here: ``igengine.cli`` imports it whatever the command.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from igengine.errors import Interrupted, interruption

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A repeat this soon after the first signal is the same stop delivered twice, not a second request: a
# terminal's Ctrl-C reaches every process of its group, and a launcher forwards the one it got (torchrun
# sends each worker the signal it received), so a worker under torchrun sees Ctrl-C twice within
# milliseconds. Taking that for "stop at once" would skip the clean stop of every torchrun job.
REPEAT_GRACE_S = 1.0
REDELIVER_S = 0.5  # how often a first stop that was lost is raised again
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


def _running(pid: int) -> bool:
    """Whether ``pid`` is there and not a zombie (a child that ended and waits for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z"


def kill_descendants(spare: frozenset[int] = frozenset(), grace_s: float = 0.3) -> None:
    """End the processes this one started (``descendants``) but those in ``spare``: none is left holding
    the terminal or the output folder after ``os._exit``. SIGTERM first, so that a C++ compiler removes its
    temporary files (SIGKILL would leave them in /tmp), then SIGKILL for what is still there after
    ``grace_s``: Inductor's compile workers ignore SIGINT by design and would otherwise live on until their
    watchdog notices the parent is gone (up to a minute)."""
    pids = [pid for pid in descendants() if pid not in spare]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 0.0)
        while (pids := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not pids:
            return


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


class _Stop:
    """The state of one ``stop_on_signals`` block."""

    def __init__(self):
        self.signum: int | None = None  # the first signal
        self.at = 0.0  # when it came (time.monotonic)
        self.received = False  # the run has caught its Interrupted (``stop_received``)
        self.over = False  # the block has been left
        self.redelivery = False  # the next call of the handler is the watchdog's, not a signal
        self.lost = threading.Event()  # set where Python dropped the stop (``sys.unraisablehook``)


_blocks: list[_Stop] = []  # the active blocks, innermost last


def stop_received() -> None:
    """Called where a run catches its ``Interrupted`` to record where it stands: the stop has arrived, the
    watchdog of ``stop_on_signals`` stops raising it again (which would cut that record short)."""
    if _blocks:
        _blocks[-1].received = True


def _watch(state: _Stop) -> None:
    """Raise the stop again in the main thread until the run has caught it or left the block: at once when
    Python reports it dropped (``state.lost``), else every ``REDELIVER_S``. Python runs a signal handler
    wherever the main thread is: an exception raised in a weakref callback or a ``__del__`` (Dynamo runs
    many during a compile) is dropped, as is one that an ``except BaseException: pass`` meets, and the run
    would carry on as if Ctrl-C had not been pressed. From this thread, ``interrupt_main`` only flags the
    main thread, which raises at its next check: past the callback that dropped the last one."""
    while True:
        state.lost.wait(REDELIVER_S)
        state.lost.clear()
        if state.over or state.received:
            return
        state.redelivery = True
        _thread.interrupt_main(state.signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, the first SIGINT / SIGTERM raises ``Interrupted`` (again, until it is caught:
    ``stop_received``), a second one ends the process at once (module docstring). The handlers found on
    entry are put back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = _Stop()
    spare = frozenset(descendants())  # processes of the caller's (a program that runs igengine), not the run's

    def handler(signum, frame):
        if state.signum is None:
            state.signum, state.at = signum, time.monotonic()
            threading.Thread(target=_watch, args=(state,), name="igengine-stop", daemon=True).start()
            raise Interrupted(signum)
        if state.redelivery:  # the first stop, raised again: the last one was lost
            state.redelivery = False
            raise Interrupted(state.signum)
        if time.monotonic() - state.at < REPEAT_GRACE_S:
            return  # the first stop, delivered twice
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        _exit_now(signum, AGAIN.format(name=name), spare)

    unraisable = sys.unraisablehook

    def dropped(info) -> None:
        """An exception Python could not raise (in a weakref callback, a ``__del__``, ...): the stop is raised
        again (``_watch``) rather than printed as "Exception ignored in ..."; anything else as before."""
        if interruption(info.exc_value) is None:
            unraisable(info)
        else:
            state.lost.set()

    saved = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    sys.unraisablehook = dropped
    _blocks.append(state)
    try:
        yield
    except BaseException as e:
        if interruption(e) is not None:
            cancel_pending_compiles()
        raise
    finally:
        state.over = True
        state.lost.set()  # the watchdog ends now
        _blocks.remove(state)
        if sys.unraisablehook is dropped:
            sys.unraisablehook = unraisable
        for sig, old in saved.items():
            signal.signal(sig, old)


def report_then_exit_at_once(status: int, line: Callable[[], str], fallback: str) -> None:
    """Write the report of a stop to stderr, exactly once, and from now on end the process at once with
    ``status`` on any further SIGINT or SIGTERM (main thread only; elsewhere it only writes).

    The handler is set first and ``line()`` (which may take a while: the command's flags) made after, so a
    signal that arrives meanwhile finds it set: it writes ``fallback`` (the same report without the flag
    names) and exits; one that arrives after the line is out exits silently. Either way the report is
    written once. The interpreter's exit after this (Inductor's workers are shut down then) cannot be held
    up by a library, nor print a traceback.
    """
    said: list[bool] = []

    def say(text: str, from_handler: bool) -> None:
        if said:
            return
        try:
            if from_handler:  # not through sys.stderr: the signal may have come in the middle of a write to it
                os.write(2, (text + "\n").encode())
            else:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except (OSError, ValueError):
            pass
        said.append(True)

    if threading.current_thread() is not threading.main_thread():
        say(line(), False)
        return

    def handler(signum, frame):
        if not said:
            _restore_terminal()
            say(fallback, True)
        _exit_now(status - 128, None)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    text = line()
    blocked = set(SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # the line and its flag together; a signal waits for both
    try:
        say(text, False)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


def end_stopped_process(status: int) -> None:
    """End a command that a signal stopped (its one line written), without the interpreter's finalization:
    the exit functions run (Inductor shuts its compile workers down there), the processes the command
    started and that are still there are killed, stdout and stderr are flushed, and ``os._exit(status)``.
    Python's own finalization would take seconds for torch's modules and, from the point where it puts
    the default signal handlers back, let one more Ctrl-C (torchrun forwards the one it got) end the
    process by SIGINT instead of with ``status``. Everything of a run was written atomically before."""
    import atexit

    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - an exit function that fails must not keep the process alive
        pass
    kill_descendants()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


__all__ = ["REPEAT_GRACE_S", "cancel_pending_compiles", "descendants", "end_stopped_process", "kill_descendants",
           "report_then_exit_at_once", "stop_on_signals", "stop_received"]
