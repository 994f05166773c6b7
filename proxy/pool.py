"""One pool of server connections, for one (server, account, connection shape): a pure core.

When sessions share server connections (`[pool] multiplex = true`), a session that may give
its connection back (proxy/pinning.py) borrows one per command from the pool of the current
primary and its own account, and returns it when the command is over. The pool decides who
gets which connection, when one is opened or closed, who waits and who is refused; the shell
(proxy/pools.py) opens and closes the sockets and carries the answers back. No I/O, no clock,
no task here: every event takes `now`, so the tests drive it with a fake clock.

Bounds and why:
- `max` connections in all (idle + lent + being opened): the server's max_connections is
  shared with everything else, so the pool never goes past its share.
- `min` kept open while idle, so the first commands after a quiet spell do not pay a login.
- An idle connection above `min` is closed after `idle_timeout`, so a burst's connections do
  not stay on the server for ever.
- A borrower that finds the pool at `max` waits in a queue of at most `queue` places, for at
  most `wait_timeout`; past either bound it is refused with an error that says the pool is
  full and the statement did not run (1040, as the server says "Too many connections").
- Idle connections are reused last-in, first-out: the warmest is taken, and the coldest age
  out past `idle_timeout`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from reparent.config import PoolConfig

C = TypeVar("C")


class RefuseReason(enum.StrEnum):
    """Why a borrower was turned away; a metrics label and the error's words."""

    QUEUE_FULL = "queue_full"  # the pool is at max and its wait queue is full
    WAIT_TIMEOUT = "wait_timeout"  # it waited `wait_timeout` for a connection
    RETIRED = "retired"  # the pool's server is no longer the primary: borrow again elsewhere


@dataclass(frozen=True, slots=True)
class Grant(Generic[C]):
    """Give `conn` to `waiter` (it was waiting, or a connection was idle)."""

    waiter: int
    conn: C


@dataclass(frozen=True, slots=True)
class Open:
    """Open a connection: for `waiter`, or (None) to keep `min` idle ones. Report `opened`
    or `open_failed` with the same waiter."""

    waiter: int | None


@dataclass(frozen=True, slots=True)
class Wait:
    """`waiter` waits in the queue: a Grant, an Open or a Refuse for it comes later."""

    waiter: int


@dataclass(frozen=True, slots=True)
class Refuse:
    waiter: int
    reason: RefuseReason


@dataclass(frozen=True, slots=True)
class CloseConn(Generic[C]):
    """Close this connection (idle too long, broken, or its server is retired)."""

    conn: C


Action = Grant[C] | Open | Wait | Refuse | CloseConn[C]


class Pool(Generic[C]):
    """The connections of one (server, account, shape) and the borrowers waiting for them."""

    def __init__(self, limits: PoolConfig) -> None:
        self.limits = limits
        self.idle: deque[tuple[C, float]] = deque()  # (conn, idle since), newest on the right
        self.lent = 0
        self.opening = 0
        self.waiters: OrderedDict[int, float] = OrderedDict()  # waiter -> deadline, in order
        self.retired = False
        # Counters for the metrics: borrows granted at once, after a wait, refused.
        self.borrows = 0
        self.waited = 0
        self.refused = 0

    @property
    def size(self) -> int:
        """Connections open or being opened: what the pool holds on the server."""
        return len(self.idle) + self.lent + self.opening

    def borrow(self, waiter: int, now: float) -> Action[C]:
        """A session wants a connection for its next command."""
        if self.retired:
            self.refused += 1
            return Refuse(waiter, RefuseReason.RETIRED)
        if self.idle:
            conn, _ = self.idle.pop()
            self.lent += 1
            self.borrows += 1
            return Grant(waiter, conn)
        if self.size < self.limits.max:
            self.opening += 1
            return Open(waiter)
        if len(self.waiters) >= self.limits.queue:
            self.refused += 1
            return Refuse(waiter, RefuseReason.QUEUE_FULL)
        self.waiters[waiter] = now + self.limits.wait_timeout
        return Wait(waiter)

    def opened(self, waiter: int | None, conn: C, now: float) -> list[Action[C]]:
        """The connection opened for `waiter` (None: a warm one) is ready."""
        self.opening -= 1
        if self.retired:
            return [CloseConn(conn), *self._refuse_all()]
        if waiter is not None:
            # (A borrower that left while it opened gives the connection back at once.)
            self.lent += 1
            self.borrows += 1
            return [Grant(waiter, conn)]
        return self._settle(conn, now)

    def open_failed(self, waiter: int | None, now: float) -> list[Action[C]]:
        """Opening failed (the borrower hears of it from the shell); a waiter may try next."""
        self.opening -= 1
        return self._fill(now)

    def give_back(self, conn: C, now: float, reusable: bool) -> list[Action[C]]:
        """A borrower is done with `conn`. `reusable`: alive, with a known state; otherwise it
        is closed (or already broke) and a waiter may open another."""
        self.lent -= 1
        if not reusable or self.retired:
            actions: list[Action[C]] = [] if not reusable else [CloseConn(conn)]
            return actions + self._fill(now)
        return self._settle(conn, now)

    def cancel(self, waiter: int) -> None:
        """A waiting borrower left (its client went away)."""
        self.waiters.pop(waiter, None)

    def tick(self, now: float) -> list[Action[C]]:
        """Time passed: refuse borrowers that waited too long, close connections idle too
        long (down to `min`), open warm ones up to `min`."""
        actions: list[Action[C]] = []
        while self.waiters:
            waiter, deadline = next(iter(self.waiters.items()))
            if deadline > now:
                break
            del self.waiters[waiter]
            self.refused += 1
            actions.append(Refuse(waiter, RefuseReason.WAIT_TIMEOUT))
        limit = now - self.limits.idle_timeout
        while self.idle and self.idle[0][1] <= limit and self.size > self.limits.min:
            conn, _ = self.idle.popleft()
            actions.append(CloseConn(conn))
        if not self.retired:
            while self.size < self.limits.min:
                self.opening += 1
                actions.append(Open(None))
        return actions

    def retire(self) -> list[Action[C]]:
        """The pool's server is no longer the primary: close what is idle, turn the waiting
        borrowers away (they borrow again from the new primary's pool), close what comes
        back."""
        self.retired = True
        actions: list[Action[C]] = [CloseConn(conn) for conn, _ in self.idle]
        self.idle.clear()
        return actions + self._refuse_all()

    def _refuse_all(self) -> list[Action[C]]:
        refused: list[Action[C]] = [Refuse(w, RefuseReason.RETIRED) for w in self.waiters]
        self.waiters.clear()
        return refused

    def _settle(self, conn: C, now: float) -> list[Action[C]]:
        """A free connection: to the longest waiter, else idle."""
        if self.waiters:
            waiter, _ = self.waiters.popitem(last=False)
            self.lent += 1
            self.borrows += 1
            self.waited += 1
            return [Grant(waiter, conn)]
        self.idle.append((conn, now))
        return []

    def _fill(self, now: float) -> list[Action[C]]:
        """Room was made: the longest waiter opens a connection of its own."""
        if self.waiters and self.size < self.limits.max:
            waiter, _ = self.waiters.popitem(last=False)
            self.opening += 1
            self.waited += 1
            return [Open(waiter)]
        return []
