"""The lock that keeps two runs out of one output folder.

Each process of a run holds an exclusive ``flock`` on ``OUT/.locks/rank-<RANK>`` for its lifetime.
The ranks of one run take different files and never block each other; a second run into the same
folder meets a held lock on its rank 0 (every run has one) and stops. ``flock`` locks vanish with the
process that holds them, so a run killed with SIGKILL leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from igengine.errors import OutputError

LOCKS_DIR = ".locks"


@contextlib.contextmanager
def rank_lock(folder: Path, rank: int = 0, world_size: int = 1) -> Iterator[str | None]:
    """Hold ``folder/.locks/rank-<rank>`` exclusively for the duration of the block.

    Raises OutputError naming the holder when another process holds it. Yields a note (str) when
    the file system cannot lock (then the run goes on unprotected), else None.
    """
    lock_dir = Path(folder) / LOCKS_DIR
    lock_dir.mkdir(exist_ok=True)
    path = lock_dir / f"rank-{rank}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    note = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise OutputError(
                f"another igengine run is writing into {folder} ({path.relative_to(folder)} is held{holder}); "
                "wait for it to finish, or choose another `out`"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            note = f"the file system of {folder} does not support flock ({e.strerror}): concurrent runs are not excluded"
        else:
            facts = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank,
                     "world_size": world_size, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(facts).encode(), 0)
            except OSError as e:  # e.g. a full disk: name the file
                raise type(e)(e.errno, e.strerror, str(path)) from None
        yield note
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        facts = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" by pid {facts['pid']} on {facts['host']} since {facts['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


__all__ = ["LOCKS_DIR", "rank_lock"]
