"""Where this process sits in a launch (torchrun or plain), and the lock that keeps runs apart.

torchrun (and its multi-node rendezvous) tells each process ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; a plain ``igengine sample`` is rank 0 of 1. igengine opens no process group and
calls no collective: ranks share work through the file system only (``igengine.chunks``), so no rank
can time out waiting for another.

Locking: each process holds an exclusive ``flock`` on ``OUT/.locks/rank-<RANK>`` for its lifetime.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from igengine.outputs import OutputError

LOCKS_DIR = ".locks"


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the launch: global rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RankInfo":
        """From torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; rank 0 of 1 when they are unset."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return cls()
        try:
            info = cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        except (KeyError, ValueError):
            raise OutputError(
                "RANK and WORLD_SIZE must both be set to integers (torchrun sets them); got "
                f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r}"
            ) from None
        if not (0 <= info.rank < info.world_size and info.local_rank >= 0):
            raise OutputError(f"RANK={info.rank} does not lie in [0, WORLD_SIZE={info.world_size})")
        return info

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


@contextlib.contextmanager
def rank_lock(folder: Path, info: RankInfo) -> Iterator[str | None]:
    """Hold ``folder/.locks/rank-<rank>`` exclusively for the duration of the block.

    Raises OutputError naming the holder when another process holds it. Yields a note (str) when
    the file system cannot lock (then the run goes on unprotected), else None.
    """
    lock_dir = Path(folder) / LOCKS_DIR
    lock_dir.mkdir(exist_ok=True)
    path = lock_dir / f"rank-{info.rank}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    note = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise OutputError(
                f"another igengine run is writing into {folder} ({path.relative_to(folder)} is held{holder}); "
                "wait for it to finish, or choose another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            note = f"the file system of {folder} does not support flock ({e.strerror}): concurrent runs are not excluded"
        else:
            facts = {"pid": os.getpid(), "host": socket.gethostname(), "rank": info.rank,
                     "world_size": info.world_size, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(facts).encode(), 0)
        yield note
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        facts = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" by pid {facts['pid']} on {facts['host']} since {facts['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


__all__ = ["LOCKS_DIR", "RankInfo", "rank_lock"]
