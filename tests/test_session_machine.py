"""The client session's lifecycle machine (proxy/session_machine.py): every path of the relay,
hold and flush, the unplanned path and the unmovable state, one transition at a time; then
random timelines of commands, switches and failures over many sessions and the real buffer
core, checked against the invariants the proxy promises. No sockets, no clock, no event loop.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from proxy import session_machine as sm
from proxy.buffer import Buffer, BufferState, Evict, Flush
from proxy.packets import Command, Status, frame
from proxy.session import SessionState, Unmovable
from proxy.session_machine import (
    CONNECT,
    HOLD,
    NEXT,
    NOTHING,
    PROBE,
    SEND,
    TRANSITIONS,
    Close,
    CloseReason,
    Do,
    Edge,
    EndTicket,
    Failed,
    FailureCause,
    Phase,
    Refused,
    RolledBack,
    SessionMachine,
    WriteError,
)
from reparent.config import BufferConfig

IN_TRANS = int(Status.IN_TRANS)


@dataclass
class Primary:
    name: str


@dataclass
class World:
    """The facts a machine asks for, set by hand."""

    epoch: int = 0
    routines: dict[str, list[str] | None] = field(default_factory=dict)
    primary_name: str = "db1"
    holding: bool = False
    may_wait: bool = True

    def primary(self) -> Primary:
        return Primary(self.primary_name)

    def switching(self) -> bool:
        return self.holding

    def may_hold_failed(self) -> bool:
        return self.may_wait


def cmd(command: int, body: bytes = b"") -> bytes:
    return frame(bytes((command,)) + body, 0)


def query(sql: str) -> bytes:
    return cmd(Command.QUERY, sql.encode())


READ = query("SELECT 1")
WRITE = query("INSERT INTO t VALUES (1)")
REPLICA = "replica"  # where a read the shell routed to a replica runs
ERROR = b"error packet"
TICKET = object()


def machine(world: World | None = None) -> SessionMachine:
    m = SessionMachine(SessionState(1, "app", "127.0.0.1:1"), world or World())
    assert m.logged_in() == NOTHING and m.phase is Phase.IDLE
    return m


def codes(actions: sm.Actions) -> list[object]:
    """Actions with error packets reduced to their codes, for short assertions."""
    out: list[object] = []
    for a in actions:
        if isinstance(a, WriteError):
            out.append(("error", int.from_bytes(a.packet[5:7], "little"), a.origin))
        else:
            out.append(a)
    return out


def held(m: SessionMachine, raw: bytes = READ) -> None:
    assert m.command(raw, hold=True, ready=True) is HOLD and m.phase is Phase.HELD
    m.ticket = TICKET


def relaying(m: SessionMachine, raw: bytes = READ) -> None:
    assert m.command(raw, hold=False, ready=True) is SEND and m.phase is Phase.RELAYING


def lost_on(m: SessionMachine, server: str = "db1", epoch: int = 0) -> None:
    m.dropped(server, epoch)


# -- the relay ---------------------------------------------------------------------------------


def test_relayed_command_takes_the_shared_answers_both_ways() -> None:
    """The hot path: no allocation, one call each way."""
    m = machine()
    assert m.command(READ, hold=False, ready=True) is SEND
    assert m.phase is Phase.RELAYING and m.busy and not m.waiting
    assert m.response_done(retrack=False) is NEXT
    assert m.phase is Phase.IDLE and not m.busy


def test_command_without_a_current_connection_connects_first() -> None:
    m = machine()
    assert m.command(READ, hold=False, ready=False) is CONNECT and m.phase is Phase.MOVING
    assert m.connected(ready=True) is SEND and m.phase is Phase.RELAYING


def test_switch_published_while_connecting_moves_again() -> None:
    m = machine()
    m.command(READ, hold=False, ready=False)
    assert m.connected(ready=False) is CONNECT and m.phase is Phase.MOVING


def test_answered_by_baton_itself() -> None:
    m = machine()
    relaying(m, cmd(Command.STMT_CLOSE, b"\x01\x00\x00\x00"))
    assert m.answered() == NEXT and m.phase is Phase.IDLE


def test_retrack_ends_the_command_after_baton_sets_tracking_again() -> None:
    m = machine()
    relaying(m, cmd(Command.RESET_CONNECTION))
    assert m.response_done(retrack=True) == (Do.RETRACK,) and m.phase is Phase.RETRACKING
    assert m.busy
    assert m.retracked() == NEXT and m.phase is Phase.IDLE


def test_local_infile_goes_out_and_back() -> None:
    m = machine()
    relaying(m, query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
    assert m.infile() == NOTHING and m.phase is Phase.INFILE and m.busy
    assert m.file_sent() == NOTHING and m.phase is Phase.RELAYING
    assert m.response_done(retrack=False) is NEXT


def test_lost_while_the_file_came_closes_the_client() -> None:
    """The client had the server's request for the file: no error can take its place."""
    m = machine()
    relaying(m, query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
    m.infile()
    lost_on(m)
    m.file_sent()
    assert m.lost_connection(ERROR, relayed=True) == (Close(CloseReason.LOST_MID_RESPONSE),)


def test_claim_only_an_idle_session() -> None:
    m = machine()
    assert m.claim() and m.phase is Phase.CLAIMED and m.busy
    assert not m.claim()
    assert m.release() == (Do.RESUME,) and m.phase is Phase.IDLE
    relaying(m)
    assert not m.claim()


def test_change_user_is_not_held_during_a_switch() -> None:
    m = machine()
    change = cmd(Command.CHANGE_USER, b"bob\x00")
    assert m.command(change, hold=True, ready=True) == (Do.CHANGE_USER,)
    assert m.phase is Phase.CHANGING_USER and m.busy
    assert m.user_changed() == NEXT and m.phase is Phase.IDLE


def test_stream_is_never_sent_again() -> None:
    m = machine()
    assert m.stream() == NOTHING and m.phase is Phase.RELAYING and m.raw == b""
    assert not m.may_retry(Command.QUERY)
    lost_on(m)
    assert m.lost_connection(ERROR, relayed=False) == (WriteError(ERROR), Do.NEXT)


def test_close_from_every_phase_ends_the_ticket_once() -> None:
    m = machine()
    held(m)
    assert m.close(CloseReason.GONE) == (EndTicket(TICKET), Close(CloseReason.GONE))
    assert m.phase is Phase.CLOSED and m.ticket is None
    assert m.close(CloseReason.GONE) == NOTHING


def test_quit_and_login_failure_close() -> None:
    m = machine()
    assert m.close(CloseReason.QUIT) == (Close(CloseReason.QUIT),)
    login = SessionMachine(SessionState(2, "", "?"), World())
    assert login.close(CloseReason.LOGIN_FAILED) == (Close(CloseReason.LOGIN_FAILED),)


def test_events_after_close_are_ignored() -> None:
    m = machine()
    held(m)
    m.close(CloseReason.GONE)
    for late in (
        lambda: m.released(ready=True),
        lambda: m.evicted("late"),
        lambda: m.probed(True),
        lambda: m.connected(True),
        lambda: m.connect_failed(ERROR),
        lambda: m.release(),
        lambda: m.retracked(),
        lambda: m.user_changed(),
    ):
        assert late() == NOTHING
    assert m.phase is Phase.CLOSED


def test_a_transition_the_table_lacks_is_a_bug() -> None:
    m = machine()
    with pytest.raises(KeyError):
        m.response_done(retrack=False)  # nothing was sent


# -- hold and flush -----------------------------------------------------------------------------


def test_command_during_a_switch_is_held_and_flushed_to_the_new_primary() -> None:
    """The held path, in order: hold, release (after `established`), move, run, end."""
    world = World()
    m = machine(world)
    held(m)
    assert m.waiting and not m.busy
    world.epoch, world.primary_name = 1, "db2"  # established: the session's connection is stale
    assert m.released(ready=False) is CONNECT and m.phase is Phase.FLUSHING and m.busy
    assert m.connected(ready=True) is SEND and m.phase is Phase.RELAYING
    assert m.ticket is TICKET
    assert m.response_done(retrack=False) == (EndTicket(TICKET), Do.NEXT)
    assert m.ticket is None and m.phase is Phase.IDLE


def test_released_on_a_current_connection_is_sent_at_once() -> None:
    m = machine()
    held(m)
    assert m.released(ready=True) is SEND and m.phase is Phase.RELAYING


def test_transaction_is_not_held() -> None:
    m = machine()
    m.state.status |= IN_TRANS
    assert m.command(WRITE, hold=True, ready=True) is SEND


def test_evicted_held_command_says_it_never_ran() -> None:
    m = machine()
    held(m)
    out = m.evicted("it waited longer than the 10 s window")
    assert codes(out) == [("error", 1105, "baton"), Do.NEXT]
    assert b"never executed; it is safe to retry" in out[0].packet  # type: ignore[union-attr]
    assert m.ticket is None and m.phase is Phase.IDLE


def test_evicted_command_without_a_response_gets_no_answer() -> None:
    m = machine()
    held(m, cmd(Command.STMT_CLOSE, b"\x01\x00\x00\x00"))
    assert m.evicted("gone") == NEXT


def test_flush_ends_the_ticket_when_the_released_command_is_answered_by_an_error() -> None:
    m = machine()
    held(m)
    m.released(ready=False)
    assert m.connect_failed(ERROR) == (
        Failed(FailureCause.UNREACHABLE, False),
        WriteError(ERROR),
        EndTicket(TICKET),
        Do.NEXT,
    )


def test_released_command_that_fails_on_the_new_primary_is_not_held_again() -> None:
    m = machine()
    held(m)
    m.released(ready=True)
    out = m.withheld(ERROR)
    assert out == (
        Failed(FailureCause.READ_ONLY, False),
        WriteError(ERROR, "backend"),
        EndTicket(TICKET),
        Do.NEXT,
    )


def test_flush_with_a_retrack_ends_the_ticket_after_it() -> None:
    m = machine()
    held(m, cmd(Command.RESET_CONNECTION))
    m.released(ready=True)
    assert m.response_done(retrack=True) == (Do.RETRACK,)
    assert m.retracked() == (EndTicket(TICKET), Do.NEXT)


def test_client_gone_while_flushing_ends_the_ticket() -> None:
    """The holder's slot must not outlive the client (else the shard never stops draining)."""
    m = machine()
    held(m)
    m.released(ready=False)
    assert m.close(CloseReason.GONE) == (EndTicket(TICKET), Close(CloseReason.GONE))


# -- the unplanned path -------------------------------------------------------------------------


def test_read_only_answer_waits_for_the_next_primary() -> None:
    m = machine()
    relaying(m, WRITE)
    assert m.may_retry(Command.QUERY)
    assert m.withheld(ERROR) == (Failed(FailureCause.READ_ONLY, True), Do.HOLD_FAILED)
    assert m.phase is Phase.RETRY_WAIT and m.failed_once and m.avoid is None
    m.ticket = TICKET
    assert m.released(ready=False) is CONNECT and m.phase is Phase.FLUSHING


def test_read_only_answer_passes_when_nothing_can_come() -> None:
    m = machine(World(may_wait=False))
    relaying(m, WRITE)
    assert m.withheld(ERROR) == (
        Failed(FailureCause.READ_ONLY, False),
        WriteError(ERROR, "backend"),
        Do.NEXT,
    )


def test_failed_command_waits_only_once() -> None:
    m = machine()
    relaying(m, WRITE)
    m.withheld(ERROR)
    m.ticket = TICKET
    m.released(ready=True)
    assert not m.may_retry(Command.QUERY)


def test_evicted_failed_command_gets_the_error_it_had() -> None:
    m = machine()
    relaying(m, WRITE)
    m.withheld(ERROR)
    m.ticket = TICKET
    assert m.evicted("window") == (WriteError(ERROR, "backend"), Do.NEXT)


def test_lost_write_is_never_sent_again() -> None:
    m = machine()
    relaying(m, WRITE)
    lost_on(m)
    out = m.lost_connection(ERROR, relayed=False)
    assert out == (Failed(FailureCause.LOST, False), WriteError(ERROR), Do.NEXT)
    assert m.phase is Phase.IDLE and m.lost == ("db1", 0)  # the next command finds out


def test_lost_read_waits_unless_the_loss_was_the_sessions_alone() -> None:
    m = machine()
    relaying(m)
    lost_on(m)
    assert m.lost_connection(ERROR, relayed=False) is PROBE and m.phase is Phase.PROBING
    assert m.busy
    assert m.probed(alone=False) == (Failed(FailureCause.LOST, True), Do.HOLD_FAILED)
    assert m.phase is Phase.RETRY_WAIT and m.avoid == "db1" and m.lost is None


def test_lost_read_of_a_session_the_server_ended_ends_it() -> None:
    m = machine()
    relaying(m)
    lost_on(m)
    m.lost_connection(ERROR, relayed=False)
    assert m.probed(alone=True) == (WriteError(ERROR), Close(CloseReason.ENDED_BY_SERVER))


def test_lost_read_probing_a_primary_that_cannot_wait_gets_the_error() -> None:
    m = machine(World(may_wait=False))
    relaying(m)
    lost_on(m)
    m.lost_connection(ERROR, relayed=False)
    assert m.probed(alone=False) == (Failed(FailureCause.LOST, False), WriteError(ERROR), Do.NEXT)


@pytest.mark.parametrize("why", ["switch under way", "switch published", "other primary"])
def test_lost_read_during_a_switch_waits_without_a_probe(why: str) -> None:
    world = World()
    m = machine(world)
    relaying(m)
    lost_on(m)
    if why == "switch under way":
        world.holding = True
    elif why == "switch published":
        world.epoch = 1
    else:
        world.primary_name = "db2"
    assert m.lost_connection(ERROR, relayed=False) == (
        Failed(FailureCause.LOST, True),
        Do.HOLD_FAILED,
    )


def test_lost_mid_response_closes() -> None:
    m = machine()
    relaying(m)
    lost_on(m)
    assert m.lost_connection(ERROR, relayed=True) == (Close(CloseReason.LOST_MID_RESPONSE),)


@pytest.mark.parametrize("case", ["debug", "in_transaction", "failed_once"])
def test_lost_command_that_cannot_wait_gets_the_error(case: str) -> None:
    m = machine()
    raw = cmd(Command.DEBUG) if case == "debug" else READ
    if case == "in_transaction":
        m.state.status |= IN_TRANS
    relaying(m, raw)
    if case == "failed_once":
        m.failed_once = True
    lost_on(m)
    assert m.lost_connection(ERROR, relayed=False) == (WriteError(ERROR), Do.NEXT)


def waiting_after_loss(world: World) -> SessionMachine:
    """A read whose connection to db1 broke while a switch ran: it waits for the next primary."""
    m = machine(world)
    relaying(m)
    lost_on(m)
    world.holding = True
    assert m.lost_connection(ERROR, relayed=False)[-1] is Do.HOLD_FAILED
    m.ticket = TICKET
    return m


def test_released_failed_command_is_never_sent_to_the_server_that_may_have_run_it() -> None:
    """The reparent was aborted: the only primary is the one the read was lost on."""
    world = World()
    m = waiting_after_loss(world)
    world.epoch = 1  # aborted: db1 leads again
    assert m.released(ready=False) == (WriteError(ERROR), EndTicket(TICKET), Do.NEXT)


def test_released_failed_read_runs_on_the_new_primary() -> None:
    world = World()
    m = waiting_after_loss(world)
    world.epoch, world.primary_name, world.holding = 1, "db2", False
    assert m.released(ready=False) is CONNECT


def test_switch_back_while_a_released_read_moves_is_not_sent_there() -> None:
    """Released to db2, then db1 leads again while the session connects: the read that may
    have run on db1 gets its error rather than run there again."""
    world = World()
    m = waiting_after_loss(world)
    world.epoch, world.primary_name, world.holding = 1, "db2", False
    assert m.released(ready=False) is CONNECT
    world.epoch, world.primary_name = 2, "db1"
    assert m.connected(ready=False) is CONNECT  # db2's connection is stale: to db1
    assert m.connected(ready=True) == (WriteError(ERROR), EndTicket(TICKET), Do.NEXT)


def test_unreachable_primary_waits_for_the_next_one() -> None:
    m = machine()
    m.command(READ, hold=False, ready=False)
    assert m.connect_failed(ERROR) == (Failed(FailureCause.UNREACHABLE, True), Do.HOLD_FAILED)
    assert m.avoid is None


def test_a_primary_refused_for_its_certificate_is_answered_at_once() -> None:
    """A lasting failure (TLS to the server refused): no wait for a next primary."""
    m = machine()
    m.command(READ, hold=False, ready=False)
    assert m.connect_failed(ERROR, lasting=True) == (
        Failed(FailureCause.UNREACHABLE, False),
        WriteError(ERROR),
        Do.NEXT,
    )
    assert m.failure is None


def test_unreachable_primary_for_a_command_that_cannot_wait() -> None:
    m = machine()
    m.command(cmd(Command.STMT_FETCH, b"\x01\x00\x00\x00\x01\x00\x00\x00"), False, False)
    assert m.connect_failed(ERROR) == (WriteError(ERROR), Do.NEXT)


# -- moving: losses noted earlier, unmovable state, transactions --------------------------------


def test_loss_noted_at_a_write_is_probed_at_the_next_command() -> None:
    m = machine()
    relaying(m, WRITE)
    lost_on(m)
    m.lost_connection(ERROR, relayed=False)
    assert m.command(READ, hold=False, ready=False) is PROBE and m.phase is Phase.MOVING
    assert m.probed(alone=True) == (Close(CloseReason.ENDED_BY_SERVER),)


def test_loss_not_alone_moves_with_what_was_read_back() -> None:
    m = machine()
    m.state.user_variables_stale = True  # lost with the connection
    lost_on(m)
    m.command(READ, hold=False, ready=False)
    out = m.probed(alone=False)
    assert [type(a) for a in out] == [Refused, WriteError, Close]
    assert out[0] == Refused((Unmovable.USER_VARIABLES,))
    assert out[2] == Close(CloseReason.NOT_MOVABLE)


def test_idle_loss_during_a_switch_connects_without_a_probe() -> None:
    world = World(epoch=1)
    m = machine(world)
    lost_on(m, epoch=0)
    assert m.command(READ, hold=False, ready=False) is CONNECT and m.lost is None


def test_unmovable_state_is_refused_by_name() -> None:
    world = World(epoch=1, primary_name="db2")
    m = machine(world)
    m.state.temporary_tables.add("sbtest.tmp")
    out = m.command(READ, hold=False, ready=False)
    assert out[0] == Refused((Unmovable.TEMPORARY_TABLES,))
    assert b"temporary tables (sbtest.tmp)" in out[1].packet  # type: ignore[union-attr]
    assert b"now db2" in out[1].packet  # type: ignore[union-attr]
    assert out[2] == Close(CloseReason.NOT_MOVABLE) and m.phase is Phase.CLOSED


def test_an_ed25519_session_is_not_moved() -> None:
    """Its login was the client's signature of one server's challenge: Baton cannot log it in
    on the new primary, so the session ends with 1927 naming why (and the metric's reason)."""
    world = World(epoch=1, primary_name="db2")
    m = machine(world)
    m.state.single_login = True
    out = m.command(READ, hold=False, ready=False)
    assert out[0] == Refused((Unmovable.LOGIN,))
    assert b"ed25519 login" in out[1].packet  # type: ignore[union-attr]
    assert int.from_bytes(out[1].packet[5:7], "little") == 1927  # type: ignore[union-attr]
    assert out[2] == Close(CloseReason.NOT_MOVABLE) and m.phase is Phase.CLOSED


def test_unmovable_state_of_a_flushed_session_ends_its_ticket() -> None:
    m = machine()
    held(m)
    m.state.user_locks.add("l")
    out = m.released(ready=False)
    assert out[-2:] == (EndTicket(TICKET), Close(CloseReason.NOT_MOVABLE))


def test_transaction_rolled_back_with_its_connection_is_told() -> None:
    m = machine()
    m.state.status |= IN_TRANS
    out = m.command(READ, hold=False, ready=False)
    assert codes(out) == [RolledBack(), ("error", 1213, "baton"), Do.NEXT]
    assert not m.state.status & IN_TRANS and m.phase is Phase.IDLE


def test_routine_whose_body_was_not_read_may_leave_anything() -> None:
    m = machine()
    m.state.routines.add("app.p")
    out = m.command(READ, hold=False, ready=False)
    assert out[0] == Refused((Unmovable.ROUTINE_STATE,))
    m2 = machine(World(routines={"app.p": []}))
    m2.state.routines.add("app.p")
    assert m2.command(READ, hold=False, ready=False) is CONNECT


# -- random timelines -------------------------------------------------------------------------

SERVERS = ("db1", "db2", "db3")


@dataclass
class Sent:
    """One command of the client's, as the timeline saw it."""

    id: int
    raw: bytes
    write: bool
    big: bool = False  # streamed: its bytes are not kept
    answered: bool = False
    held_in: int | None = None  # the switch it was held for
    may_have_run: set[str] = field(default_factory=set)


@dataclass
class Sim:
    """One session: the machine, and the shell's side of it, faked."""

    machine: SessionMachine
    queue: list[Sent] = field(default_factory=list)  # sent by the client, not yet taken
    current: Sent | None = None
    answers: list[int] = field(default_factory=list)
    conn: tuple[str, int] | None = None  # (server, epoch)
    alive: bool = False
    on: str | None = None  # the server the command in flight was sent to
    withhold: bool = False
    pending: object = None  # a CONNECT, PROBE, RETRACK, CHANGE_USER or CLAIM under way
    connecting_epoch: int = 0
    closed: bool = False


class Timeline:
    """The world (servers, switches, crashes), the buffer core with the holder's ticket rules
    (verdicts delivered later, after the buffer's step), and sessions driven at random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        # The read routing's own draws: the other events' draws stay as they were without it.
        self.reads = random.Random(rng.random())
        self.world = World()
        self.buffer = Buffer(
            BufferConfig(
                size=rng.randint(2, 8),
                window=2.0,
                max_failover=4.0,
                drain_concurrency=rng.randint(1, 3),
            )
        )
        self.now = 0.0
        self.dead: set[str] = set()
        self.read_only: set[str] = {"db2", "db3"}
        self.switch = 0  # number of the switch under way (0: none)
        self.switches_ended = 0
        self.switch_count = 0
        self.tickets: dict[int, Sim] = {}
        self.waiting: set[int] = set()
        self.released: set[int] = set()
        self.verdicts: list[tuple[int, object]] = []
        self.next_entry = 1
        self.next_id = 1
        self.sims = [Sim(SessionMachine(SessionState(i, "app", "?"), self.world)) for i in range(4)]
        for sim in self.sims:
            sim.machine.logged_in()
            sim.conn, sim.alive = ("db1", 0), True
        # Two of the four share connections ([pool] multiplex): they give theirs back
        # whenever nothing pins them and borrow one for their next command.
        for sim in self.sims[2:]:
            sim.machine.shares = True

    # -- the holder, faked on the real buffer --------------------------------------------------

    def apply(self, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Flush):
                self.waiting.discard(a.entry)
                self.released.add(a.entry)
                self.verdicts.append((a.entry, a))
            elif isinstance(a, Evict):
                self.waiting.discard(a.entry)
                self.verdicts.append((a.entry, a))
        self.world.holding = self.buffer.buffering("s")
        self.world.may_wait = self.buffer.can_hold_failed("s")

    def deliver(self) -> None:
        entry, verdict = self.verdicts.pop(0)
        sim = self.tickets.get(entry)
        if sim is None:
            return  # ended by its session: no verdict
        if isinstance(verdict, Evict):
            del self.tickets[entry]
            self.carry_out(sim, sim.machine.evicted(str(verdict.reason)))
        else:
            self.carry_out(sim, sim.machine.released(self.ready(sim)))

    def end(self, entry: int) -> None:
        self.tickets.pop(entry, None)
        if entry in self.released:
            self.released.discard(entry)
            self.apply(self.buffer.flushed(entry, self.now))
        elif entry in self.waiting:
            self.waiting.discard(entry)
            self.apply(self.buffer.cancel(entry, self.now))

    # -- the shell, faked ------------------------------------------------------------------------

    def ready(self, sim: Sim) -> bool:
        """The shell's `link.ready or _unready()`."""
        if sim.conn is not None and sim.alive and sim.conn[1] == self.world.epoch:
            return True
        if sim.conn is not None and not sim.alive:
            sim.machine.dropped(*sim.conn)
        sim.conn = None
        return False

    def answer(self, sim: Sim) -> None:
        sent = sim.current
        assert sent is not None and not sent.answered, "a command answered twice"
        sent.answered = True
        sim.answers.append(sent.id)

    def carry_out(self, sim: Sim, actions: sm.Actions) -> None:
        m = sim.machine
        for a in actions:
            if a is Do.SEND:
                self.send(sim)
            elif a is Do.NEXT:
                sim.current = None
                self.take(sim)
            elif a is Do.RESUME:
                self.take(sim)
            elif isinstance(a, WriteError):
                self.answer(sim)
            elif a is Do.HOLD or a is Do.HOLD_FAILED:
                entry = self.next_entry
                self.next_entry += 1
                self.tickets[entry] = sim
                self.waiting.add(entry)
                m.ticket = entry
                assert sim.current is not None
                if a is Do.HOLD:
                    sim.current.held_in = self.switch
                    self.apply(self.buffer.hold(entry, m.state.session_id, "s", self.now))
                else:
                    self.apply(
                        self.buffer.hold_failed(
                            entry, m.state.session_id, "s", self.world.epoch, self.now
                        )
                    )
            elif isinstance(a, EndTicket):
                self.end(a.ticket)
            elif a is Do.GIVE_BACK:
                state = m.state
                assert not state.status & IN_TRANS, "gave back a connection mid-transaction"
                assert not state.temporary_tables, "gave back a connection with temporary tables"
                sim.conn = None
            elif a is Do.READ:
                sim.on = REPLICA  # never held, whatever the shard does
            elif a is Do.REROUTE:
                # The shell routes it again: another replica, or the primary.
                assert sim.current is not None and not sim.current.write
                if self.reads.random() < 0.5:
                    self.carry_out(sim, m.read(sim.current.raw))
                else:
                    self.carry_out(
                        sim, m.command(sim.current.raw, self.world.holding, self.ready(sim))
                    )
            elif a in (Do.CONNECT, Do.PROBE, Do.RETRACK, Do.CHANGE_USER, Do.BORROW):
                assert sim.pending is None
                sim.pending = a  # type: ignore[assignment]
                sim.connecting_epoch = self.world.epoch
            elif isinstance(a, Close):
                sim.closed = True
                sim.conn = None

    def send(self, sim: Sim) -> None:
        sent = sim.current
        assert sent is not None and sim.conn is not None and sim.alive
        server, epoch = sim.conn
        assert epoch == self.world.epoch, "sent on a stale connection"
        assert server not in sent.may_have_run, f"command {sent.id} sent again to {server}"
        if sent.write:
            assert not sent.may_have_run, f"write {sent.id} sent again after it may have run"
        if sent.held_in is not None:
            assert self.switches_ended >= sent.held_in, "a held command ran before its switch ended"
        sim.on = server
        if sent.raw[4] == Command.STMT_CLOSE:  # no response: the shell answers it (with nothing)
            sim.on = None
            sent.answered = True
            self.carry_out(sim, sim.machine.answered())
            return
        sim.withhold = sim.machine.may_retry(sent.raw[4])

    def take(self, sim: Sim) -> None:
        if sim.closed or sim.machine.phase is not Phase.IDLE or not sim.queue:
            return
        sent = sim.queue.pop(0)
        sim.current = sent
        if sent.raw is READ and self.reads.random() < 0.4:
            self.carry_out(sim, sim.machine.read(sent.raw))  # the shell chose a replica
            return
        if sent.big and not self.world.holding and self.ready(sim):
            assert sim.machine.stream() == NOTHING
            self.send(sim)
            return
        self.carry_out(sim, sim.machine.command(sent.raw, self.world.holding, self.ready(sim)))

    # -- the world -------------------------------------------------------------------------------

    def response(self, sim: Sim) -> None:
        m, sent = sim.machine, sim.current
        assert sent is not None and sim.on is not None
        server = sim.on
        roll = self.rng.random()
        if server in self.dead or roll < 0.05:
            # The connection breaks (a crash, a KILL): the server may have run it.
            sent.may_have_run.add(server)
            m.dropped(*sim.conn)  # type: ignore[misc]
            sim.conn = None
            self.carry_out(sim, m.lost_connection(b"lost", relayed=roll < 0.01))
            return
        if sent.write and server in self.read_only:
            if sim.withhold:
                self.carry_out(sim, m.withheld(b"1290"))
                return
            self.answer(sim)  # the 1290 goes to the client
            self.carry_out(sim, m.response_done(False))
            return
        sent.may_have_run.add(server)
        if m.phase is Phase.RELAYING and sent.raw[5:9] == b"LOAD" and roll < 0.5:
            m.infile()
            return
        if sent.raw[5:10] == b"BEGIN":
            m.state.status |= IN_TRANS
        elif sent.raw[5:11] == b"COMMIT":
            m.state.status &= ~IN_TRANS
        elif sent.raw[5:11] == b"CREATE":
            m.state.temporary_tables.add("t")
        self.answer(sim)
        self.carry_out(sim, m.response_done(retrack=roll > 0.95))

    def read_response(self, sim: Sim) -> None:
        """The replica answers the read, or fails under it (before or after any of its
        result reached the client)."""
        m = sim.machine
        roll = self.reads.random()
        sim.on = None
        if roll < 0.1:
            self.carry_out(sim, m.read_lost(relayed=False))
        elif roll < 0.12:
            self.carry_out(sim, m.read_lost(relayed=True))
        else:
            self.answer(sim)
            self.carry_out(sim, m.response_done(False))

    def finish_pending(self, sim: Sim) -> None:
        m, what = sim.machine, sim.pending
        sim.pending = None
        if what is Do.CONNECT:
            primary = self.world.primary_name
            if primary in self.dead or self.rng.random() < 0.1:
                self.carry_out(sim, m.connect_failed(b"unreachable"))
            else:
                sim.conn, sim.alive = (primary, sim.connecting_epoch), True
                self.carry_out(sim, m.connected(self.ready(sim)))
        elif what is Do.BORROW:
            primary = self.world.primary_name
            roll = self.rng.random()
            if roll < 0.05:
                self.carry_out(sim, m.borrow_refused(b"1040"))
            elif primary in self.dead or roll < 0.1:
                self.carry_out(sim, m.connect_failed(b"unreachable"))
            else:
                sim.conn, sim.alive = (primary, sim.connecting_epoch), True
                self.carry_out(sim, m.connected(self.ready(sim)))
        elif what is Do.PROBE:
            primary = self.world.primary_name
            alone = primary not in self.dead and primary not in self.read_only
            self.carry_out(sim, m.probed(alone))
        elif what is Do.RETRACK:
            self.carry_out(sim, m.retracked())
        elif what is Do.CHANGE_USER:
            self.answer(sim)
            self.carry_out(sim, m.user_changed())
        elif what == "claim":
            self.carry_out(sim, m.release())

    def start_switch(self) -> None:
        if self.switch:
            return
        self.switch_count += 1
        self.switch = self.switch_count
        self.apply(self.buffer.reparent_started("s", self.world.epoch + 1, self.now))

    def end_switch(self, established: bool) -> None:
        if not self.switch:
            return
        old = self.world.primary_name
        if established:
            candidates = [s for s in SERVERS if s != old and s not in self.dead]
            new = self.rng.choice(candidates)
            self.read_only = set(SERVERS) - {new}
            self.world.primary_name = new
        else:
            self.read_only.discard(old)
        self.world.epoch += 1
        self.switches_ended = self.switch
        self.switch = 0
        if established:
            self.apply(self.buffer.established("s", self.world.epoch, self.now))
        else:
            self.apply(self.buffer.aborted("s", self.now))

    def step(self) -> None:
        rng = self.rng
        sim = rng.choice(self.sims)
        m = sim.machine
        roll = rng.random()
        if roll < 0.25:
            if not sim.closed:
                write = rng.random() < 0.5
                kind = rng.random()
                if kind < 0.05:
                    raw = cmd(Command.CHANGE_USER, b"bob\x00")
                elif kind < 0.1:
                    raw = query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t")
                    write = True
                elif kind < 0.15:
                    raw, write = query("BEGIN"), False
                elif kind < 0.2:
                    raw, write = query("COMMIT"), True
                elif kind < 0.21:
                    raw, write = query("CREATE TEMPORARY TABLE t (a int)"), True
                elif kind < 0.27:
                    raw, write = cmd(Command.PING), False
                elif kind < 0.3:
                    raw, write = cmd(Command.STMT_CLOSE, b"\x01\x00\x00\x00"), False
                elif kind < 0.35:
                    # A read: sent again if need be when it was not streamed (kept whole).
                    sim.queue.append(Sent(self.next_id, query("SELECT 'big'"), False, big=True))
                    self.next_id += 1
                    self.take(sim)
                    return
                else:
                    raw = WRITE if write else READ
                sim.queue.append(Sent(self.next_id, raw, write))
                self.next_id += 1
                self.take(sim)
        elif roll < 0.5:
            if m.phase is Phase.READING and sim.on == REPLICA:
                self.read_response(sim)
            elif m.phase is Phase.RELAYING and sim.on is not None:
                self.response(sim)
            elif m.phase is Phase.INFILE:
                m.file_sent()
                if sim.on in self.dead:
                    m.dropped(*sim.conn)  # type: ignore[misc]
                    sim.conn = None
                    self.carry_out(sim, m.lost_connection(b"", relayed=True))
                else:
                    self.answer(sim)
                    self.carry_out(sim, m.response_done(False))
        elif roll < 0.62:
            if sim.pending is not None:
                self.finish_pending(sim)
        elif roll < 0.7:
            if self.verdicts:
                self.deliver()
        elif roll < 0.73:
            self.start_switch()
            if self.switch and rng.random() < 0.5:
                self.read_only.add(self.world.primary_name)  # demoted
        elif roll < 0.77:
            self.end_switch(established=rng.random() < 0.8)
        elif roll < 0.78:
            # kill -9 of the primary: every connection to it breaks; an ERS follows later.
            if not self.switch and len(self.dead) < 1:
                self.dead.add(self.world.primary_name)
                for other in self.sims:
                    if other.conn is not None and other.conn[0] in self.dead:
                        other.alive = False
                self.start_switch()
        elif roll < 0.8:
            if sim.conn is not None and m.phase is Phase.IDLE:
                sim.alive = False  # a KILL of this connection while idle
        elif roll < 0.82:
            if sim.pending is None and m.claim():
                sim.pending = "claim"
        elif roll < 0.825:
            if not sim.closed:
                self.carry_out(sim, m.close(CloseReason.GONE))
                sim.pending = None
        else:
            self.now += rng.expovariate(2.0)
            self.apply(self.buffer.tick(self.now))
            if self.buffer.state("s") is BufferState.SUSPECT and not self.switch:
                primary = self.world.primary_name
                if primary not in self.dead and primary not in self.read_only:
                    self.apply(self.buffer.recovered("s", self.now))

    def settle(self) -> None:
        """End every switch, revive the dead, and run until nothing is left to do."""
        self.end_switch(established=True)
        self.dead.clear()
        for _ in range(10_000):
            busy = False
            if self.verdicts:
                self.deliver()
                busy = True
            for sim in self.sims:
                m = sim.machine
                if sim.pending is not None:
                    self.finish_pending(sim)
                    busy = True
                elif m.phase is Phase.READING and sim.on == REPLICA:
                    self.read_response(sim)
                    busy = True
                elif m.phase is Phase.RELAYING and sim.on is not None:
                    self.response(sim)
                    busy = True
                elif m.phase is Phase.INFILE:
                    m.file_sent()
                    self.answer(sim)
                    self.carry_out(sim, m.response_done(False))
                    busy = True
            if not busy:
                if self.buffer.held():
                    self.now += 1.0
                    self.apply(self.buffer.tick(self.now))
                    continue
                return
        raise AssertionError("the timeline never settled")

    def check(self) -> None:
        for sim in self.sims:
            ids = sim.answers
            assert ids == sorted(ids), "answers out of order"
            if not sim.closed:
                assert sim.machine.phase is Phase.IDLE and not sim.queue, sim.machine.phase
                assert sim.current is None
        assert self.buffer.slots_used() == 0, "a holder slot outlived its command"
        assert not self.tickets


class Recording(dict[Edge, Phase]):
    """One phase's edges that note each one looked up."""

    def __init__(self, phase: Phase, taken: set[tuple[Phase, Edge]]) -> None:
        super().__init__(TRANSITIONS[phase])
        self.phase, self.taken = phase, taken

    def __getitem__(self, edge: Edge) -> Phase:
        self.taken.add((self.phase, edge))
        return super().__getitem__(edge)


@pytest.fixture
def edges_taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[Phase, Edge]]]:
    """Every (phase, edge) the machine looks up in its table while the test runs."""
    taken: set[tuple[Phase, Edge]] = set()
    recording = {phase: Recording(phase, taken) for phase in TRANSITIONS}
    monkeypatch.setattr(sm, "TRANSITIONS", recording)
    yield taken


def test_random_timelines_keep_every_promise(edges_taken: set[tuple[Phase, Edge]]) -> None:
    """Commands, switches (established and aborted), crashes, kills, lost connections, read-only
    answers, evictions and clients leaving, interleaved over four sessions: every command is
    answered at most once and in order, every session ends idle or closed, no command is sent
    twice to a server that may have run it (nor a write anywhere once it may have run), no held
    command runs before its switch ended, and no holder slot is left behind. The timelines
    take every edge of the transition table."""
    for seed in range(2000):
        rng = random.Random(seed)
        timeline = Timeline(rng)
        try:
            for _ in range(150):
                timeline.step()
            timeline.settle()
            timeline.check()
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from e
    every = {(phase, edge) for phase, edges in TRANSITIONS.items() for edge in edges}
    # Closing a closed session is a no-op that never reaches the table.
    missing = every - edges_taken - {(Phase.CLOSED, Edge.CLOSE)}
    login = {(Phase.LOGIN, Edge.CLOSE)}  # taken by a directed test: no timeline logs in
    assert missing <= login, sorted(missing - login)
