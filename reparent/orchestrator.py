"""The reparent orchestrator's pure core: which step comes next, given what just happened.

Like etcd's raft, it does no I/O: it reads a journal record and the outcome of the last call, and
returns an `Action`. An action says what to journal, what to publish and which mechanism call to
make next. The shell (`controller.py`) carries actions out and feeds back each call's result.
Because every decision is a function of the record, a controller that restarts with a
half-finished record (`resume`) decides the same way every time.

The invariant it enforces: establishment starts only after revocation returned a `RevocationProof`
(the mechanisms verify it). A planned reparent that fails before establishment has promoted
anyone is undone. An emergency reparent cannot give a dead primary back, so it rolls forward
or fails loudly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from reparent.mechanism import Candidate, EstablishmentProof, MechanismError, RevocationProof
from reparent.topology import (
    Aborted,
    Established,
    Outcome,
    PhaseTiming,
    ReparentKind,
    ReparentRecord,
    ReparentStarted,
    Revoked,
    Step,
    TopologyEvent,
)


class Call(enum.StrEnum):
    """A mechanism call the shell makes on the orchestrator's behalf."""

    CHOOSE = "choose"
    PREPARE = "prepare"
    REVOKE = "revoke"
    ESTABLISH = "establish"
    ABANDON = "abandon"  # make the candidate read-only again before giving the old one back
    UNDO = "undo"
    COMMIT = "commit"  # compare-and-set the shard's topology: new primary, term + 1


@dataclass(frozen=True)
class Action:
    """Journal `record` first, then publish `events`, then make `call` (or stop). An action
    with `journal` False is not written: its step is one a resume never needs (see
    `Orchestrator`), and its events wait for the next write, never ahead of the journal."""

    record: ReparentRecord
    call: Call | None = None
    events: tuple[TopologyEvent, ...] = ()
    journal: bool = True

    @property
    def finished(self) -> bool:
        return self.record.outcome is not None


@dataclass
class Progress:
    """What a reparent has learnt so far; rebuilt from the record on resume."""

    candidate: Candidate | None = None
    revoked: RevocationProof | None = None
    established: EstablishmentProof | None = None


def _with(record: ReparentRecord, step: Step, **changes: object) -> ReparentRecord:
    return replace(record, step=step, **changes)  # type: ignore[arg-type]


class Orchestrator:
    """Decides one reparent. `start` or `resume`, then `done(result)` / `failed(error)`.

    A planned switch makes two durable writes, one at each end of its hold: every write
    inside the hold is time each held client waits (one of 459 ms was seen on a shared disk),
    and every write before it delays the hold's start. Choosing and catching up the candidate
    change nothing a resume would need to undo, so the first write is HOLDING (with the event
    that makes the proxies hold); a controller that dies before it leaves no journal, and the
    old primary never stopped serving. The journal says HOLDING until the final write, which
    sets the new primary and term and finishes the record at once
    (`TopologyStore.commit_finish`).
    So a controller that dies inside the hold is resumed from HOLDING whatever it had done:
    the candidate is made read_only again (`abandon`, harmless if it was never promoted) and
    the old primary writable (`undo`). An emergency reparent still journals each step, since
    it cannot give a dead primary back and must roll forward.
    """

    def __init__(self, record: ReparentRecord) -> None:
        self.record = record
        self.progress = Progress()
        self._call: Call | None = None
        self._deferred: tuple[TopologyEvent, ...] = ()  # events of unjournaled actions

    @property
    def planned(self) -> bool:
        return self.record.kind is ReparentKind.PRS

    @property
    def new_term(self) -> int:
        return self.record.term_before + 1

    # -- entry points ------------------------------------------------------------------------

    def start(self) -> Action:
        """A new reparent. Planned: choose first, nothing is touched until the candidate is
        known to be fit. Emergency: fence first, then choose among the fenced replicas."""
        if self.planned:
            return self._act(Step.STARTED, Call.CHOOSE, journal=False)
        return self._hold_then_revoke()

    def resume(self) -> Action:
        """A record found in the journal at start-up: finish or undo it, by its last step."""
        r = self.record
        self._restore()
        step = r.step
        if step in (Step.STARTED, Step.CANDIDATE_CHOSEN, Step.PREPARED) and self.planned:
            return self._finish(Outcome.ABORTED, "controller restarted before revocation")
        if self.planned and step in (Step.HOLDING, Step.REVOKING) and r.candidate is not None:
            # Revocation may be half done, and the candidate promoted (nothing inside the
            # hold is journaled): take the promotion back, then give the old primary back.
            self.record = replace(r, reason="controller restarted during the switch")
            return self._act(Step.UNDOING, Call.ABANDON)
        if step is Step.UNDOING or (self.planned and step in (Step.HOLDING, Step.REVOKING)):
            # Revocation may be half done: give the old primary back.
            return self._undo("controller restarted during revocation")
        if step in (Step.STARTED, Step.HOLDING, Step.REVOKING):
            # Emergency: fencing is idempotent, so do it again and go on.
            return self._act(Step.REVOKING, Call.REVOKE)
        if step in (Step.REVOKED, Step.ESTABLISHING):
            if self.progress.revoked is None:
                return self._finish(Outcome.FAILED, "journal lacks the revocation's position")
            if self.progress.candidate is None:
                return self._act(Step.REVOKED, Call.CHOOSE)
            return self._act(Step.ESTABLISHING, Call.ESTABLISH)
        if step is Step.ESTABLISHED:
            return self._act(Step.ESTABLISHED, Call.COMMIT)
        # PUBLISHED (or DONE): the new primary is public; only the record is left to close.
        return self._finish(Outcome.SUCCEEDED)

    # -- results -------------------------------------------------------------------------------

    def done(self, result: object = None) -> Action:
        call = self._call
        if call is Call.CHOOSE:
            assert isinstance(result, Candidate)
            self.progress.candidate = result
            positions = dict(self.record.positions)
            positions[f"{result.name}_chosen"] = result.gtid_position
            self.record = replace(self.record, candidate=result.name, positions=positions)
            if self.planned:
                return self._act(Step.CANDIDATE_CHOSEN, Call.PREPARE, journal=False)
            return self._act(Step.ESTABLISHING, Call.ESTABLISH)
        if call is Call.PREPARE:
            return self._hold_then_revoke()
        if call is Call.REVOKE:
            assert isinstance(result, RevocationProof)
            self.progress.revoked = result
            positions = dict(self.record.positions)
            positions["old_primary_final"] = result.gtid_position
            positions.update({f"{k}_fenced": v for k, v in result.replica_positions.items()})
            self.record = replace(self.record, positions=positions)
            event = Revoked(self.record.shard, self.record.old_primary, result.gtid_position)
            if self.planned:
                return self._act(Step.REVOKED, Call.ESTABLISH, (event,), journal=False)
            return self._act(Step.REVOKED, Call.CHOOSE, (event,))
        if call is Call.ESTABLISH:
            assert isinstance(result, EstablishmentProof)
            self.progress.established = result
            positions = dict(self.record.positions)
            positions["new_primary_writable"] = result.gtid_position
            self.record = replace(self.record, new_primary=result.new_primary, positions=positions)
            # Planned: the compare-and-set goes in the final write (commit_finish).
            return self._act(Step.ESTABLISHED, Call.COMMIT, journal=not self.planned)
        if call is Call.COMMIT:
            new = self.record.new_primary or self.record.candidate
            assert new is not None
            self.record = replace(self.record, new_primary=new, term_after=self.new_term)
            event = Established(self.record.shard, new, self.new_term)
            return self._finish(Outcome.SUCCEEDED, events=(event,))
        if call is Call.ABANDON:
            return self._act(Step.UNDOING, Call.UNDO)
        if call is Call.UNDO:
            reason = self.record.reason or "undone"
            return self._finish(
                Outcome.UNDONE, reason, events=(Aborted(self.record.shard, reason),)
            )
        raise AssertionError(f"no call in flight (got {result!r})")

    def failed(self, error: MechanismError) -> Action:
        call = self._call
        reason = f"{call}: {error}"
        if call in (Call.CHOOSE, Call.PREPARE) and self.planned:
            # Nothing was revoked or published: the old primary never stopped serving.
            return self._finish(Outcome.ABORTED, reason)
        if call is Call.REVOKE:
            if self.planned:
                return self._undo(reason)
            return self._finish(
                Outcome.FAILED, reason, events=(Aborted(self.record.shard, reason),)
            )
        if call is Call.ESTABLISH and self.planned:
            # The candidate may be writable already: fence it before giving the old one back.
            self.record = replace(self.record, reason=reason)
            return self._act(Step.UNDOING, Call.ABANDON)
        if call in (Call.ESTABLISH, Call.CHOOSE, Call.COMMIT):
            return self._finish(
                Outcome.FAILED, reason, events=(Aborted(self.record.shard, reason),)
            )
        # UNDO or ABANDON failed: a human must look; proxies keep the old term.
        return self._finish(
            Outcome.FAILED,
            f"{self.record.reason}; then {reason}",
            events=(Aborted(self.record.shard, reason),),
        )

    def not_drained(self, proxies: tuple[str, ...]) -> None:
        """The proxies the demotion went ahead without (named in the report)."""
        self.record = replace(self.record, not_drained=list(proxies))

    def timed(self, timing: PhaseTiming) -> None:
        """Add a finished call's timing to the report."""
        self.record.phases.append(timing)

    # -- helpers -------------------------------------------------------------------------------

    def _act(
        self,
        step: Step,
        call: Call,
        events: tuple[TopologyEvent, ...] = (),
        journal: bool = True,
    ) -> Action:
        self._call = call
        self.record = _with(self.record, step)
        if not journal:
            self._deferred += events
            return Action(self.record, call, (), journal=False)
        events, self._deferred = self._deferred + events, ()
        return Action(self.record, call, events)

    def _hold_then_revoke(self) -> Action:
        """Tell the proxies to hold new work before anything is revoked."""
        event = ReparentStarted(self.record.shard, self.new_term)
        return self._act(Step.HOLDING, Call.REVOKE, (event,))

    def _undo(self, reason: str) -> Action:
        self.record = replace(self.record, reason=reason)
        return self._act(Step.UNDOING, Call.UNDO)

    def _finish(
        self, outcome: Outcome, reason: str = "", events: tuple[TopologyEvent, ...] = ()
    ) -> Action:
        """Close the record; it is journaled (as DONE) before the events are published."""
        self._call = None
        reason = reason or self.record.reason
        self.record = _with(self.record, Step.DONE, outcome=outcome, reason=reason)
        events, self._deferred = self._deferred + events, ()
        return Action(self.record, None, events)

    def _restore(self) -> None:
        """Rebuild what the journal knows, so a resumed reparent can go on."""
        r = self.record
        pos = r.positions
        if r.candidate is not None:
            self.progress.candidate = Candidate(r.candidate, pos.get(f"{r.candidate}_chosen", ""))
        if "old_primary_final" in pos:
            fenced = {k[: -len("_fenced")]: v for k, v in pos.items() if k.endswith("_fenced")}
            self.progress.revoked = RevocationProof(r.old_primary, pos["old_primary_final"], fenced)
