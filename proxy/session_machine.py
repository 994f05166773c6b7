"""The client session's lifecycle as a pure state machine: what happens to each command, from
the moment it arrives to the moment it is answered, and what a switch or a failure does to it.

Everything that decides a command's fate lives in this file, in the manner of h11: the shell
(`ClientConnection`, proxy/frontend.py) reports events (a command arrived, its response ended,
the connection broke, the holder released or evicted it, a probe or a connect came back) and
carries out the actions returned, in order; it decides nothing itself. The machine does no I/O,
reads no clock and starts no task, so every path below is unit-tested without sockets
(tests/test_session_machine.py). What it needs to know of the proxy around it (the epoch, the
primary, whether the shard holds commands) it reads from a `World`, which tests fake.

Where each phase leads is data (`TRANSITIONS`): a method names the edge it takes and the table
gives the next phase, so a transition the table lacks is a bug caught at once (KeyError), and
the tests check that every edge of the table is taken somewhere.

The paths, with the rules that are easy to break:

- Relay (the hot path): IDLE -send-> RELAYING -done-> IDLE. One method call and a few
  attribute reads each way; the actions are shared constant tuples, never allocated.
- Hold and flush: a command that arrives while the shard switches is handed to the holder
  (IDLE -hold-> HELD) and never reaches the old primary. A session inside a transaction is not
  held: its transaction runs to its end on the old primary first. The holder's verdict comes
  back as `released` (HELD -released-> FLUSHING: the session moves to the new primary with its
  state, then FLUSHING -moved-> RELAYING) or `evicted` (the client gets an error saying the
  command never ran). The holder's ticket is ended when the released command is over, and when
  the client leaves at any point, so its slot is never lost.
- Unplanned: a command that failed for want of a writable primary before any byte of its
  result reached the client (the connection broke, the server answered read_only, no
  connection could be made) waits for the next primary (RETRY_WAIT), once, outside a
  transaction. A write whose connection broke may have run: it is never sent again, anywhere
  (its client gets 1927). A read waits unless the loss was the session's alone (PROBING: no
  switch since, none under way, and the server is still the writable primary): then the
  session ends, as it would direct. A command released after failing is never sent to the
  server that may have run it: if that server leads again, the client gets the error it had.
- Moving (MOVING, or FLUSHING for a released command): the session's state that cannot follow
  it to a new connection (temporary tables, locks, ...) is refused by name (1927) and the
  session closes; an open transaction was rolled back with the old connection, which the
  client is told (1213) rather than let it COMMIT a transaction that no longer exists.
- Sharing (`[pool] multiplex`, proxy/pinning.py): a session that may give its connection
  back does so when its command's response has passed (RELAYING -give_back-> IDLE, detached);
  its next command borrows one from its account's pool (IDLE -borrow-> BORROWING -moved->
  RELAYING), with its state restored on it. While any pinning rule holds (a transaction,
  temporary tables, locks, ...) the session keeps its connection, so nobody else is ever given
  it mid-state. A pool that stays full answers the command with 1040; it never ran.
- Reads on replicas (READING, proxy/readroute.py): a read the shell routed to a replica is
  never held by a switch (replicas are not touched by one) and is not in flight on the
  primary, so the drain before a demotion does not wait for it. If its replica fails before
  any byte of its result reached the client, it provably had no effect (it was classified a
  read), so it is routed again (READING -reroute-> IDLE, and the shell routes the same bytes
  once more, without that replica); a failure mid-result closes the session, as on the primary.
- Order: a session has at most one command in progress, so pipelined commands are answered in
  the order they were sent; the shell takes the next command only on `NEXT`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.client_packets import check_stmt_header
from proxy.errors import ErrorKind
from proxy.packets import Command, Status, frame
from proxy.pinning import Pending, pinned
from proxy.session import SessionState, Unmovable, reads_only


class Phase(enum.StrEnum):
    LOGIN = "login"  # logging in; the client's bytes wait for the login coroutine
    IDLE = "idle"  # ready for the client's next command
    RELAYING = "relaying"  # a command is on the server; its response goes to the client
    INFILE = "infile"  # the server asked for the client's local file; it goes to the server
    MOVING = "moving"  # the command waits for a connection on the current primary
    HELD = "held"  # held by the holder while the primary is switched: it never ran
    RETRY_WAIT = "retry_wait"  # failed for want of a writable primary; waits for the next one
    FLUSHING = "flushing"  # released by the holder: moving to the primary to run there
    PROBING = "probing"  # a read lost its connection: was the loss this session's alone?
    RETRACKING = "retracking"  # the response passed; Baton sets its session tracking again
    READING = "reading"  # a read runs on a replica: never held, not in flight on the primary
    CLAIMED = "claimed"  # Baton's own statements use the idle connection (read back)
    CHANGING_USER = "changing_user"  # COM_CHANGE_USER: a login and a new connection
    BORROWING = "borrowing"  # a shared session waits for a connection from its pool
    CLOSED = "closed"


class Edge(enum.StrEnum):
    """What happened, as the machine names it; `TRANSITIONS` says where it leads."""

    LOGGED_IN = "logged_in"
    SEND = "send"  # the command goes to the server now
    STREAM = "stream"  # a large command goes to the server packet by packet as it arrives
    HOLD = "hold"  # the shard switches: the holder keeps the command
    MOVE = "move"  # the command needs a connection on the current primary first
    CHANGE_USER = "change_user"
    CLAIM = "claim"  # Baton's own statements take the idle connection
    DONE = "done"  # the response ended; the command is over
    INFILE = "infile"  # the server asked for a local file
    FILE_SENT = "file_sent"  # the file's last (empty) packet went to the server
    RETRACK = "retrack"  # Baton sets its session tracking again before the next command
    RELEASE = "release"  # Baton's own statements on the idle connection are done
    ANSWER = "answer"  # the command is over, answered with an error (or by Baton itself)
    WAIT = "wait"  # the command failed; it waits for the next primary
    PROBE = "probe"  # is the primary still writable? (was a loss this session's alone?)
    RELEASED = "released"  # the holder lets the command go: move and run it
    MOVED = "moved"  # connected to the primary with the session's state
    BORROW = "borrow"  # a detached session takes a connection from its pool
    GIVE_BACK = "give_back"  # the command is over and nothing pins the session
    READ = "read"  # a read goes to a replica
    REROUTE = "reroute"  # its replica failed before any result reached the client: route again
    CLOSE = "close"


P, E = Phase, Edge
# Phase -> edge -> next phase. Every edge a method takes must be here; tests take every one.
TRANSITIONS: Mapping[Phase, Mapping[Edge, Phase]] = {
    P.LOGIN: {E.LOGGED_IN: P.IDLE, E.CLOSE: P.CLOSED},
    P.IDLE: {
        E.SEND: P.RELAYING,
        E.STREAM: P.RELAYING,
        E.HOLD: P.HELD,
        E.MOVE: P.MOVING,
        E.CHANGE_USER: P.CHANGING_USER,
        E.CLAIM: P.CLAIMED,
        E.BORROW: P.BORROWING,
        E.READ: P.READING,
        E.CLOSE: P.CLOSED,
    },
    P.READING: {
        E.DONE: P.IDLE,
        E.GIVE_BACK: P.IDLE,  # a sharing session's primary connection, if it still had one
        E.REROUTE: P.IDLE,
        E.CLOSE: P.CLOSED,
    },
    P.RELAYING: {
        E.DONE: P.IDLE,
        E.GIVE_BACK: P.IDLE,
        E.INFILE: P.INFILE,
        E.RETRACK: P.RETRACKING,
        E.ANSWER: P.IDLE,
        E.WAIT: P.RETRY_WAIT,
        E.PROBE: P.PROBING,
        E.CLOSE: P.CLOSED,
    },
    P.INFILE: {E.FILE_SENT: P.RELAYING, E.CLOSE: P.CLOSED},
    P.MOVING: {
        E.MOVED: P.RELAYING,
        E.MOVE: P.MOVING,  # a switch was published while it connected: move again
        E.ANSWER: P.IDLE,
        E.WAIT: P.RETRY_WAIT,
        E.CLOSE: P.CLOSED,
    },
    P.HELD: {E.RELEASED: P.FLUSHING, E.ANSWER: P.IDLE, E.CLOSE: P.CLOSED},
    P.RETRY_WAIT: {E.RELEASED: P.FLUSHING, E.ANSWER: P.IDLE, E.CLOSE: P.CLOSED},
    # A released command is not held again if it fails: it failed on the primary just
    # published, so nothing better is coming (no WAIT edge).
    P.FLUSHING: {
        E.MOVED: P.RELAYING,
        E.MOVE: P.FLUSHING,  # (a detached session borrows here)
        E.ANSWER: P.IDLE,
        E.CLOSE: P.CLOSED,
    },
    P.PROBING: {E.WAIT: P.RETRY_WAIT, E.ANSWER: P.IDLE, E.CLOSE: P.CLOSED},
    P.RETRACKING: {E.DONE: P.IDLE, E.GIVE_BACK: P.IDLE, E.CLOSE: P.CLOSED},
    # The pool lends a connection (MOVED), the borrow is tried again after a switch (MOVE),
    # or the pool stays full and the command is answered with 1040 (ANSWER); an unreachable
    # primary is a failed CONNECT, as for any session (WAIT).
    P.BORROWING: {
        E.MOVED: P.RELAYING,
        E.MOVE: P.BORROWING,
        E.ANSWER: P.IDLE,
        E.WAIT: P.RETRY_WAIT,
        E.CLOSE: P.CLOSED,
    },
    P.CLAIMED: {E.RELEASE: P.IDLE, E.CLOSE: P.CLOSED},
    P.CHANGING_USER: {E.ANSWER: P.IDLE, E.CLOSE: P.CLOSED},
    P.CLOSED: {E.CLOSE: P.CLOSED},
}
# The phases in which a command (or Baton's own statement) may be in flight on the server: the
# drain before a demotion waits for these. A held command has not been sent.
BUSY = frozenset(
    {
        P.RELAYING,
        P.INFILE,
        P.MOVING,
        P.FLUSHING,
        P.PROBING,
        P.RETRACKING,
        P.CLAIMED,
        P.CHANGING_USER,
        P.BORROWING,  # the connection it gets could be on the old primary
    }
)
# Where a command waits in the holder.
WAITING = frozenset({P.HELD, P.RETRY_WAIT})


class FailureCause(enum.StrEnum):
    """Why a command failed on the primary before any of its result reached the client."""

    READ_ONLY = "read_only"  # the server answered 1290: it is not the writable primary
    LOST = "lost"  # the connection broke; the server may have run the command
    UNREACHABLE = "unreachable"  # no connection could be made: it never ran


class CloseReason(enum.StrEnum):
    """Why the machine closes the client's connection."""

    QUIT = "quit"  # COM_QUIT: the server sees a clean end
    PROTOCOL = "protocol"  # the client broke the protocol (the shell wrote the error)
    GONE = "gone"  # the client went away
    LOST_MID_RESPONSE = "lost_mid_response"  # part of a result reached the client
    ENDED_BY_SERVER = "ended_by_server"  # the loss was this session's alone, as direct
    NOT_MOVABLE = "not_movable"  # its state cannot follow it to a new connection
    LOGIN_FAILED = "login_failed"
    INTERNAL = "internal"  # a bug in Baton: it costs this one session


class Do(enum.Enum):
    """Actions without data; see each member."""

    SEND = "send"  # relay `raw` on the session's connection (it is current)
    HOLD = "hold"  # hand `raw` to the holder for the switch under way; set `ticket`
    HOLD_FAILED = "hold_failed"  # hand the failed `raw` to the holder until a newer primary
    PROBE = "probe"  # ask whether the primary takes writes; report `probed`
    CONNECT = "connect"  # connect to the primary, restore the state; `connected`/`connect_failed`
    BORROW = "borrow"  # borrow from the pool, restore what differs; `connected`/`borrow_refused`
    GIVE_BACK = "give_back"  # return the connection to its pool (nothing pins the session)
    CHANGE_USER = "change_user"  # check the new login, connect as it; report `user_changed`
    RETRACK = "retrack"  # set Baton's session tracking again; then `retracked`
    NEXT = "next"  # the command is over: count it and take the client's next one
    RESUME = "resume"  # Baton's own statements are done: take the client's next command
    READ = "read"  # run `raw` on a replica the shell chose
    REROUTE = "reroute"  # route `raw` again, without the replicas that failed under it


@dataclass(frozen=True, slots=True)
class WriteError:
    """Send the client an error packet (counted as Baton's own or the server's)."""

    packet: bytes
    origin: str = "baton"


@dataclass(frozen=True, slots=True)
class EndTicket:
    """The holder's ticket is done with: its command ran, or its client left."""

    ticket: Any


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client's connection."""

    reason: CloseReason


@dataclass(frozen=True, slots=True)
class Failed:
    """A command failed for want of a writable primary: held for the next one, or passed on."""

    cause: FailureCause
    held: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """The session's state cannot move; the reasons, for the metrics."""

    reasons: tuple[Unmovable, ...]


@dataclass(frozen=True, slots=True)
class RolledBack:
    """The session's open transaction was rolled back with its lost connection."""


Action = Do | WriteError | EndTicket | Close | Failed | Refused | RolledBack
Actions = tuple[Action, ...]

# The common answers, shared: the hot path allocates nothing.
SEND: Actions = (Do.SEND,)
NEXT: Actions = (Do.NEXT,)
HOLD: Actions = (Do.HOLD,)
CONNECT: Actions = (Do.CONNECT,)
PROBE: Actions = (Do.PROBE,)
BORROW: Actions = (Do.BORROW,)
GIVE_BACK_NEXT: Actions = (Do.GIVE_BACK, Do.NEXT)
READ: Actions = (Do.READ,)
REROUTE: Actions = (Do.REROUTE,)
NOTHING: Actions = ()

_E_SEND, _E_DONE = Edge.SEND, Edge.DONE
_IN_TRANS = int(Status.IN_TRANS)
_CHANGE_USER = int(Command.CHANGE_USER)
_QUERY = int(Command.QUERY)
_STMT_EXECUTE = int(Command.STMT_EXECUTE)
# Commands relayed to the server with a response.
RELAYED = frozenset(
    {
        Command.QUERY,
        Command.INIT_DB,
        Command.PING,
        Command.FIELD_LIST,
        Command.SET_OPTION,
        Command.STATISTICS,
        Command.DEBUG,
    }
)
# Commands the server never answers (not even with an error): Baton answers them with nothing
# either, whatever becomes of them.
NO_RESPONSE = frozenset({int(Command.STMT_CLOSE), int(Command.STMT_SEND_LONG_DATA)})
# Commands that may wait for the next primary after failing on this one: they carry everything
# needed to send them again (a cursor's FETCH does not: its cursor died with the connection).
# The relayed ones but COM_DEBUG, which has the server write to its log, plus PREPARE/EXECUTE.
RETRYABLE = frozenset(
    int(c) for c in (RELAYED - {Command.DEBUG}) | {Command.STMT_PREPARE, Command.STMT_EXECUTE}
)

UNMOVABLE_LABELS = {
    Unmovable.TEMPORARY_TABLES: "temporary tables",
    Unmovable.USER_LOCKS: "user locks from GET_LOCK",
    Unmovable.TABLE_LOCKS: "table locks from LOCK TABLES",
    Unmovable.XA: "XA transaction",
    Unmovable.USER_VARIABLES: "user variables set since Baton last read them",
    Unmovable.UNTRACKED_VARIABLES: "variables changed while it had session tracking off",
    Unmovable.SQL_PREPARED: "prepared statements made from a user variable",
    Unmovable.ROUTINE_STATE: "state left by stored routines",
    Unmovable.LOGIN: "ed25519 login (a signature of that server's challenge, which Baton "
    "cannot repeat)",
}


class Server(Protocol):
    name: str


class World(Protocol):
    """What the machine asks of the proxy around it: facts, never actions."""

    # Grows with every published switch; a connection from an older epoch is stale.
    epoch: int
    # What each stored routine the sessions called may leave behind (None: not known).
    routines: dict[str, list[str] | None]

    def primary(self) -> Server: ...

    def switching(self) -> bool:
        """Does the shard hold new commands now (a switch is under way)?"""
        ...

    def may_hold_failed(self) -> bool:
        """May a failed command wait here for a next primary (another server exists, and the
        holder takes failed commands now)?"""
        ...


def error_packet(kind: ErrorKind, message: str) -> bytes:
    """One of Baton's own errors, as the answer to a command (sequence id 1)."""
    return frame(kind.packet(message), 1)


def loss_message(detail: str) -> str:
    return (
        f"Lost connection to the primary during the statement ({detail}); it may or may not "
        "have been executed. The session's state on the server is gone; reconnect."
    )


class SessionMachine:
    """One client session's lifecycle. The shell sets `ticket` when it carries out HOLD or
    HOLD_FAILED and reports `dropped` whenever the session's connection breaks; every other
    change goes through the event methods below, each of which returns the actions to carry
    out, in order."""

    __slots__ = (
        "state",
        "world",
        "phase",
        "raw",
        "failed_once",
        "failure",
        "avoid",
        "ticket",
        "lost",
        "shares",
        "detached",
        "pending",
    )

    def __init__(self, state: SessionState, world: World) -> None:
        self.state = state
        self.world = world
        self.phase = Phase.LOGIN
        # The client's bytes of the command in progress; b"" for a streamed command, whose
        # bytes are not kept: it can never be sent again.
        self.raw = b""
        self.failed_once = False  # it already waited once after failing
        self.failure: tuple[bytes, str] | None = None  # the error it would have had, its origin
        self.avoid: str | None = None  # the server that may have run it: never sent there again
        self.ticket: Any = None  # the holder's ticket, from HOLD until the command is over
        # (server, epoch) of the last connection that broke, until a command learns whether the
        # loss was this session's alone.
        self.lost: tuple[str, int] | None = None
        # Sharing: the session gives its connection back whenever no pinning rule holds
        # (set by the shell from `[pool] multiplex`); `detached` while it has none because it
        # gave it back (not because one was lost); `pending`: what the last responses left on
        # the connection that the state record does not keep.
        self.shares = False
        self.detached = False
        self.pending = Pending()

    def _go(self, edge: Edge) -> None:
        self.phase = TRANSITIONS[self.phase][edge]
        # (The two edges of the hot path look the table up inline: no call.)

    @property
    def busy(self) -> bool:
        """May something of this session be in flight on its server (not a held command)?"""
        return self.phase in BUSY

    @property
    def waiting(self) -> bool:
        """Does its command wait in the holder?"""
        return self.phase in WAITING

    # -- the client's commands ---------------------------------------------------------------

    def logged_in(self) -> Actions:
        self._go(Edge.LOGGED_IN)
        self.detached = self.shares  # its login's connection went back to the pool
        return NOTHING

    def command(self, raw: bytes, hold: bool, ready: bool) -> Actions:
        """A whole command from the client, taken while IDLE. `hold`: the shard switches now;
        `ready`: the session's connection is alive and from the current epoch."""
        self.raw = raw
        self.failed_once = False
        if raw[4] == _CHANGE_USER:
            # A login, not a statement: read_only does not stop it, so it is not held; a
            # connection it makes to the old primary is stale after the switch and moves.
            self._go(Edge.CHANGE_USER)
            return (Do.CHANGE_USER,)
        if hold and not self.state.status & _IN_TRANS:
            # A transaction runs to its end on the old primary first (the demotion's grace).
            self._go(Edge.HOLD)
            return HOLD
        if ready:
            self.phase = TRANSITIONS[self.phase][_E_SEND]
            return SEND
        if self.detached:
            self._go(Edge.BORROW)
            return BORROW
        self._go(Edge.MOVE)
        return self._move()

    def read(self, raw: bytes) -> Actions:
        """A whole command the shell routes to a replica (a read outside a transaction): it
        is not held, whatever the shard does."""
        self.raw = raw
        self.failed_once = False
        self._go(Edge.READ)
        return READ

    def read_lost(self, relayed: bool) -> Actions:
        """The replica's connection failed under the read. `relayed`: part of the result
        reached the client, so no other answer can take its place."""
        if relayed:
            return self._close(CloseReason.LOST_MID_RESPONSE)
        self._go(Edge.REROUTE)
        return REROUTE

    def stream(self) -> Actions:
        """A large command starts: its packets go on as they arrive, and are not kept."""
        self.raw = b""
        self.failed_once = False
        self._go(Edge.STREAM)
        return NOTHING

    def answered(self) -> Actions:
        """The shell answered the command itself (an unknown statement, KILL of no session, a
        COM_STMT_CLOSE, which has no response)."""
        if self.shares and self.phase is Phase.RELAYING and self._free():
            return self._give_back()
        return self._over(Edge.ANSWER)

    def may_retry(self, command: int) -> bool:
        """Could this command wait for the next primary if it fails on this one? Only once,
        only outside a transaction (the server rolled the rest of it back), and only commands
        that can be sent again as they are."""
        return (
            command in RETRYABLE
            and bool(self.raw)
            and not self.failed_once
            and not self.state.status & _IN_TRANS
        )

    # -- the response --------------------------------------------------------------------------

    def response_done(self, retrack: bool) -> Actions:
        """The response has passed (the shell folded it into the session's state first).
        `retrack`: Baton must set its session tracking again before the next command."""
        if retrack:
            self._go(Edge.RETRACK)
            return (Do.RETRACK,)
        if self.shares and self._free():
            return self._give_back()
        if self.ticket is None:
            self.phase = TRANSITIONS[self.phase][_E_DONE]
            return NEXT
        return self._over(Edge.DONE)

    def _free(self) -> bool:
        """May the session give its connection back now (no pinning rule holds)?"""
        return not pinned(self.state, self.pending, self.world.routines)

    def _give_back(self) -> Actions:
        self.detached = True
        actions = self._over(Edge.GIVE_BACK)
        return GIVE_BACK_NEXT if actions is NEXT else (Do.GIVE_BACK, *actions)

    def infile(self) -> Actions:
        """The server asked for the client's local file: the client's packets go to it."""
        self._go(Edge.INFILE)
        return NOTHING

    def file_sent(self) -> Actions:
        """The file's last, empty packet went to the server: its response follows."""
        self._go(Edge.FILE_SENT)
        return NOTHING

    def withheld(self, error: bytes) -> Actions:
        """The server answered read_only (1290) before anything reached the client (the shell
        withholds that answer for commands that `may_retry`): it is not the writable primary,
        and the command did not run there."""
        return self._fail(FailureCause.READ_ONLY, error, None, "backend")

    def dropped(self, server: str, epoch: int) -> None:
        """The session's connection to `server`, made in `epoch`, broke (reported at once,
        whether or not a command was running): the next command finds out whether that was
        a switch (move on) or the server ending this session (it ends, as direct)."""
        self.lost = (server, epoch)

    def lost_connection(self, error: bytes, relayed: bool) -> Actions:
        """The connection broke under the command (after `dropped`). `relayed`: part of the
        result already reached the client."""
        if relayed:
            # The client is mid-response: no error can be put in its place.
            return self._close(CloseReason.LOST_MID_RESPONSE)
        if not self.may_retry(self.raw[4] if self.raw else 0):
            return self._answer(error)
        if not self._reads_only():
            # A write may have run: its commit can reach a replica before the connection
            # breaks, and that replica may be the next primary (measured: an INSERT re-run
            # after kill -9 met its own row there in about a third of kills). Never run again;
            # the loss stays noted, so the next command finds out which it was.
            return (Failed(FailureCause.LOST, False), *self._answer(error))
        self.failure = (error, "baton")
        self.avoid = self.lost[0] if self.lost is not None else None
        if self._loss_may_be_alone():
            self._go(Edge.PROBE)
            return PROBE
        self.lost = None
        return self._fail(FailureCause.LOST, error, self.avoid)

    def probed(self, alone: bool) -> Actions:
        """The answer to PROBE: does the primary the connection was lost on still take writes
        (the loss was this session's alone: a KILL, its wait_timeout)?"""
        if self.phase is Phase.CLOSED:
            return NOTHING
        self.lost = None
        if self.phase is Phase.PROBING:  # a read lost its connection
            assert self.failure is not None
            error, _ = self.failure
            if alone:
                self.failure = None
                return (WriteError(error), *self._close(CloseReason.ENDED_BY_SERVER))
            return self._fail(FailureCause.LOST, error, self.avoid)
        # Moving: a loss noted earlier (a write's, or one while idle).
        if alone:
            return self._close(CloseReason.ENDED_BY_SERVER)
        return self._checks(True)

    # -- moving to a connection on the current primary ---------------------------------------

    def _move(self) -> Actions:
        """The command needs a connection on the current primary (it has none, its own broke,
        or a switch was published since it was made). A loss that may have been this
        session's alone is looked into first; a session that gave its connection back
        borrows one (nothing of it lives on a server connection)."""
        if self.detached:
            return BORROW
        if self._loss_may_be_alone():
            return PROBE
        lost = self.lost is not None
        self.lost = None
        return self._checks(lost)

    def _checks(self, lost: bool) -> Actions:
        """What must hold before the session's state moves to a new connection. `lost`: the
        old connection broke, so what was not read back from it is gone."""
        state = self.state
        # (A session that never had a connection has nothing here.)
        found = state.unmovable(lost, self.world.routines)
        if found:
            return self._refuse(found)
        if state.status & _IN_TRANS:
            # The server rolled the transaction back when the connection went. Going on
            # silently would let the client COMMIT a transaction that no longer exists.
            state.status &= ~_IN_TRANS
            error = error_packet(
                ErrorKind.TRANSACTION_LOST,
                "The transaction was rolled back: its connection to the primary was closed "
                "(for a switch of the primary, the transaction outlived the grace period). "
                "This statement was not executed; retry the whole transaction.",
            )
            return (RolledBack(), *self._answer(error))
        if self.shares and self._free():
            # Nothing of it lives on a server connection: it borrows, as a detached session
            # does, rather than open one of its own beside the pool.
            self.detached = True
            return BORROW
        return CONNECT

    def _refuse(self, found: dict[Unmovable, list[str]]) -> Actions:
        """Server-side state that cannot follow the session to a new connection: end it with
        an error naming that state, rather than go on without it."""
        parts = []
        for reason, names in found.items():
            label = UNMOVABLE_LABELS[reason]
            parts.append(f"{label} ({', '.join(names)})" if names else label)
        error = error_packet(
            ErrorKind.SESSION_NOT_MOVABLE,
            f"This session's connection to the primary was replaced (now "
            f"{self.world.primary().name}), and its {'; '.join(parts)} existed only there and "
            "cannot move with it. The statement was not executed and Baton closes the "
            "session: reconnect and set them up again.",
        )
        return (
            Refused(tuple(found)),
            WriteError(error),
            *self._close(CloseReason.NOT_MOVABLE),
        )

    def connected(self, ready: bool) -> Actions:
        """CONNECT succeeded: the session has a connection on the primary, with its state.
        `ready`: no switch was published meanwhile (else it moves again)."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        if ready:
            return self._moved()
        self._go(Edge.MOVE)
        return self._move()

    def _moved(self) -> Actions:
        """The command goes to the primary the session is now connected to, unless that is the
        server that may have run it (a switch back to it while the command moved)."""
        self.detached = False
        failure = self.failure
        if failure is not None and self.world.primary().name == self.avoid:
            self.failure = None
            return self._answer(*failure)
        self.failure = self.avoid = None
        self._go(Edge.MOVED)
        return SEND

    def borrow_refused(self, error: bytes) -> Actions:
        """The pool stayed full (its wait queue was full, or the wait timed out): the client
        gets the error, which says the statement did not run. The session stays detached."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        return self._answer(error)

    def connect_failed(self, error: bytes, lasting: bool = False) -> Actions:
        """CONNECT failed: the primary cannot be reached (or refused the session's state).
        `lasting`: a failure no switch of primary mends (the server's TLS certificate does
        not verify against backend.ca): the client gets `error` at once, not after a wait."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        if lasting:
            self.failure = None
            return (Failed(FailureCause.UNREACHABLE, False), *self._answer(error))
        return self._fail(FailureCause.UNREACHABLE, error, None)

    # -- the holder's verdicts ---------------------------------------------------------------

    def released(self, ready: bool) -> Actions:
        """The holder lets the waiting command go: the switch is over (or the primary it
        failed on takes writes again). `ready`: the session's connection is still current."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        failure = self.failure
        if failure is not None and self.world.primary().name == self.avoid:
            # The reparent was aborted: the only primary is the server that may have run it.
            self.failure = None
            return self._answer(*failure)
        self._go(Edge.RELEASED)
        if ready:
            return self._moved()
        return self._move()

    def evicted(self, message: str) -> Actions:
        """The holder gave up on the waiting command (its ticket is over). One that failed on
        the primary gets the error it had then; one held before it was sent gets Baton's own,
        saying it never ran."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        self.ticket = None
        failure, self.failure = self.failure, None
        if failure is not None:
            return self._answer(*failure)
        return self._answer(
            error_packet(
                ErrorKind.HELD_EVICTED,
                f"Baton held this statement while the primary was switched and gave up: "
                f"{message}. The statement was never executed; it is safe to retry.",
            )
        )

    # -- Baton's own work on the connection ----------------------------------------------------

    def claim(self) -> bool:
        """Claim the idle connection for Baton's own statements; False when a command runs."""
        if self.phase is not Phase.IDLE:
            return False
        self._go(Edge.CLAIM)
        return True

    def release(self) -> Actions:
        """Baton's own statements on the claimed connection are done."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        self._go(Edge.RELEASE)
        return (Do.RESUME,)

    def retracked(self) -> Actions:
        """RETRACK is done (or failed: the connection was closed, the next command moves)."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        if self.shares and self._free():
            return self._give_back()
        return self._over(Edge.DONE)

    def user_changed(self) -> Actions:
        """COM_CHANGE_USER was answered (accepted, or refused with the server's error)."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        return self._over(Edge.ANSWER)

    def close(self, reason: CloseReason) -> Actions:
        """The connection closes (the client left, quit, broke the protocol, or its login
        failed). A ticket still open is ended, so the holder's slot is never lost."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        return self._close(reason)

    # -- internals -------------------------------------------------------------------------------

    def _reads_only(self) -> bool:
        """May the command in progress run twice? Yes if it executes nothing (a PING, a
        PREPARE) or is a read."""
        raw = self.raw
        command = raw[4]
        if command == _QUERY:
            return reads_only(raw, 5)
        if command == _STMT_EXECUTE:
            stmt = self.state.statements.get(check_stmt_header(raw[4:]))
            return stmt is not None and reads_only(stmt.sql)
        return True

    def _loss_may_be_alone(self) -> bool:
        """Could the noted loss have been this session's alone? Only if no switch was
        published since nor is under way, and its server is still the primary; the PROBE
        answers whether that primary still takes writes."""
        lost, world = self.lost, self.world
        return (
            lost is not None
            and lost[1] == world.epoch
            and not world.switching()
            and world.primary().name == lost[0]
        )

    def _fail(
        self, cause: FailureCause, error: bytes, avoid: str | None, origin: str = "baton"
    ) -> Actions:
        """The command failed before any of its result reached the client: it waits for a
        newer primary if it may (and its client gets `error` if none comes in time), else the
        client gets `error` now. `avoid`: the server that may have run it."""
        self.failure = None
        if not self.may_retry(self.raw[4] if self.raw else 0):
            return self._answer(error, origin)  # it could never wait: not a failure to count
        # Not during a flush (it holds a ticket): it failed on the primary just published.
        if self.ticket is not None or not self.world.may_hold_failed():
            return (Failed(cause, False), *self._answer(error, origin))
        self.failed_once = True
        self.failure = (error, origin)
        self.avoid = avoid
        self._go(Edge.WAIT)
        return (Failed(cause, True), Do.HOLD_FAILED)

    def _answer(self, error: bytes, origin: str = "baton") -> Actions:
        if self.raw and self.raw[4] in NO_RESPONSE:
            return self._over(Edge.ANSWER)  # the client waits for no answer
        return (WriteError(error, origin), *self._over(Edge.ANSWER))

    def _over(self, edge: Edge) -> Actions:
        """The command is over: its ticket, if any, is ended, then the next one is taken."""
        self._go(edge)
        ticket, self.ticket = self.ticket, None
        if ticket is None:
            return NEXT
        return (EndTicket(ticket), Do.NEXT)

    def _close(self, reason: CloseReason) -> Actions:
        if self.shares and self.phase is Phase.IDLE and not self.detached and self._free():
            # Nothing in flight and nothing pinned: its connection serves others on.
            self._go(Edge.CLOSE)
            self.detached = True
            return (Do.GIVE_BACK, Close(reason))
        self._go(Edge.CLOSE)
        ticket, self.ticket = self.ticket, None
        self.failure = None
        if ticket is None:
            return (Close(reason),)
        return (EndTicket(ticket), Close(reason))
