"""Where this process sits in a launch (torchrun or plain).

torchrun (and its multi-node rendezvous) tells each process ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; a plain ``igengine sample`` is rank 0 of 1. igengine opens no process group and
calls no collective: ranks share work through the file system only (``igengine.store.chunks``), so no rank
can time out waiting for another.

Each process holds its rank's lock on the output folder (``igengine.store.locks``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from igengine.errors import OutputError


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


__all__ = ["RankInfo"]
