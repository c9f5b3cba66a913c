"""Events produced by the sans-IO control state machines (client.py, server.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.control import messages as m
from agent.engine.keys import TestKeys


class Event:
    """Base class of every control event."""


# --- both sides ---


@dataclass(frozen=True)
class ProtocolFailure(Event):
    """The peer broke the protocol (or a check failed); the connection is now closed.
    ``reason`` is safe to log: it never contains key material."""

    reason: str


@dataclass(frozen=True)
class KeyNeeded(Event):
    """The handshake waits for a slow, pure key derivation (PBKDF2, RFC 4656 §3.1; only
    with ``defer_keys=True``). Run ``job()`` off the event loop, then hand its result (or
    the exception it raised) to the machine's ``key_ready()``; input that arrives
    meanwhile is buffered. ``job`` holds key material: it is kept out of repr."""

    job: Callable[[], object] = field(repr=False)


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """We closed the connection deliberately (refusal, end of conversation)."""

    reason: str


# --- client side ---


@dataclass(frozen=True)
class GreetingReceived(Event):
    greeting: m.ServerGreeting
    mode: int  # the mode we selected


@dataclass(frozen=True)
class SetupRefused(Event):
    """Server-Start with Accept != 0 (bad key, mode not supported, resource limits)."""

    accept: int


@dataclass(frozen=True)
class Ready(Event):
    """Server-Start Accept=0: requests may be sent now."""

    start_time: int


@dataclass(frozen=True)
class SessionAccepted(Event):
    request: m.RequestSession | m.RequestTWSession
    accept: m.AcceptSession
    test_keys: TestKeys | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.accept.accept == m.ACCEPT_OK


@dataclass(frozen=True)
class StartAckReceived(Event):
    accept: int


@dataclass(frozen=True)
class StopSessionsReceived(Event):
    stop: m.StopSessions


@dataclass(frozen=True)
class FetchResult(Event):
    ack: m.FetchAck
    request: m.RequestSession | None = None
    skip_ranges: tuple[tuple[int, int], ...] = ()
    records: tuple[m.DataRecord, ...] = ()


@dataclass(frozen=True)
class StartNAckReceived(Event):
    ack: m.StartNAck


@dataclass(frozen=True)
class StopNAckReceived(Event):
    ack: m.StopNAck


# --- server side ---


@dataclass(frozen=True)
class SetupComplete(Event):
    mode: int
    key_id: str


@dataclass(frozen=True)
class SetupRejected(Event):
    """We answered Server-Start with Accept != 0 and closed (logged, not a peer bug per se)."""

    accept: int
    reason: str


@dataclass(frozen=True)
class SessionRequested(Event):
    """Answer with ControlServer.accept_session(); ``sid`` is the SID to use if accepted."""

    request: m.RequestSession | m.RequestTWSession
    sid: bytes


@dataclass(frozen=True)
class SessionRefused(Event):
    """A request the state machine answered itself (limits, unsupported values)."""

    request: m.RequestSession | m.RequestTWSession
    accept: int
    reason: str


@dataclass(frozen=True)
class StartRequested(Event):
    """Answer with ControlServer.start_ack()."""


@dataclass(frozen=True)
class StopRequested(Event):
    """Client sent Stop-Sessions. TWAMP: nothing to answer. OWAMP: answer with
    ControlServer.send_stop_sessions() describing the sessions the server sent."""

    stop: m.StopSessions


@dataclass(frozen=True)
class FetchRequested(Event):
    """Answer with ControlServer.send_fetch_response() or .reject_fetch()."""

    fetch: m.FetchSession


@dataclass(frozen=True)
class StartNRequested(Event):
    msg: m.StartNSessions


@dataclass(frozen=True)
class StopNRequested(Event):
    msg: m.StopNSessions
