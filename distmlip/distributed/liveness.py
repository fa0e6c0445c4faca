"""Signs of life of the ranks of a stage whose ranks wait long for each other.

Why: in augment a rank that finished its subsets waits (a sleeping barrier) while the others
still fit GPRs, for minutes or hours; a deadline on that wait would end healthy jobs, and no
deadline let a frozen rank (stopped process, hung file system, a node lost without its process
dying) hang the whole allocation.  So each rank keeps a heartbeat: a thread rewrites a small file
in a folder every rank already shares (augment's shard folder) with a growing counter, and a
waiting rank ends the job when a partner's counter has not moved for the collectives' timeout
(``DISTMLIP_DIST_TIMEOUT``).  The thread runs while its rank computes (NumPy/LAPACK release the
interpreter lock, and Python hands the lock to other threads every few milliseconds), so a long
fit is alive; a stopped or deadlocked process writes nothing.  A counter read from the file's
content (not its mtime) is compared against this process's own monotonic clock: clock skew
between nodes and attribute caching of network file systems cannot fake or hide a beat.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from ..errors import DistributedError


class Heartbeat:
    """Context manager: beat while inside, and ``check()`` the other ranks' beats.

    ``folder`` must be shared by every rank of the job (files named ``.alive.<rank>``);
    ``timeout_s``: silence after which a partner counts as frozen; ``hint``: what the user can
    do then (appended to the error)."""

    def __init__(self, folder, rank: int, world: int, timeout_s: float, interval_s: float | None = None,
                 hint: str = ""):
        self.folder, self.rank, self.world = Path(folder), int(rank), int(world)
        self.hint = hint
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else max(0.2, min(10.0, self.timeout_s / 6))
        self._stop = threading.Event()
        self._thread = None
        self._count = 0
        self._seen: dict[int, tuple[str, float]] = {}     # rank -> (content, monotonic time it changed)
        self._t0 = time.monotonic()
        self._last_check = -float("inf")

    @property
    def stopped(self) -> bool:
        """True once the context was left (its beats ended)."""
        return self._stop.is_set()

    def path(self, rank: int) -> Path:
        return self.folder / f".alive.{rank}"

    # -- own beat ------------------------------------------------------------------------------
    def _beat(self) -> None:
        self._count += 1
        final = self.path(self.rank)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        try:   # no fsync: a beat only needs to be visible, not durable
            tmp.write_text(f"{os.getpid()} {socket.gethostname()} {self._count}\n")
            os.replace(tmp, final)
        except OSError:
            pass   # a transient file-system error costs one beat; a lasting one is seen as silence

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def __enter__(self) -> "Heartbeat":
        if self.world > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._beat()
            self._t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="distmlip-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.path(self.rank).unlink()
        except OSError:
            pass

    # -- the others' beats ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise DistributedError naming a watched rank whose beat has not changed for
        ``timeout_s``.  Each rank watches its next two ranks (a ring), at most every half beat
        interval: with all ranks reading all files every second, 1000 waiting ranks would put
        10^6 reads a second on a parallel file system's metadata server.  A frozen rank is found
        by the first of its two predecessors that waits, and its error ends the job."""
        now = time.monotonic()
        if now - self._last_check < 0.5 * self.interval_s:
            return
        self._last_check = now
        for r in sorted({(self.rank + d) % self.world for d in (1, 2)} - {self.rank}):
            try:
                content = self.path(r).read_text()
            except OSError:
                content = ""
            last = self._seen.get(r)
            if last is None or last[0] != content:
                # first look, or a new beat: alive now (a file not there yet counts from the start)
                self._seen[r] = (content, now if content or last is not None else self._t0)
                continue
            silent = now - last[1]
            if silent > self.timeout_s:
                who = content.split()
                where = f" (pid {who[0]} on {who[1]})" if len(who) >= 2 else ""
                raise DistributedError(
                    f"rank {r}{where} has given no sign of life for {silent:.0f} s (its heartbeat "
                    f"{self.path(r)} stopped; limit DISTMLIP_DIST_TIMEOUT={self.timeout_s:.0f} s): it is "
                    f"frozen, stopped or its node or file system hangs; ending the job instead of "
                    f"waiting for it" + (f".  {self.hint}" if self.hint else ""))
