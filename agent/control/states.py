"""The O/TWAMP-Control state machine, whole, as tables (after h11's ``_state.py``).

Everything that decides which message may arrive (or be sent) in which state, and what
state follows, lives here; client.py and server.py only parse and build messages and
feed what they parsed through :func:`on_receive` / :func:`on_send` / :func:`on_answer`.
A message that has no row is a protocol error (the peer's: :class:`ProtocolError`) or a
usage error (ours: :class:`UsageError`), raised here and nowhere else, naming the role,
protocol, state and message.

Protocols: OWAMP (RFC 4656), TWAMP (RFC 5357) and TWAMP once Individual Session Control
is negotiated (RFC 5938; its Modes bit 16 in Set-Up-Response). Until Server-Start the
TWAMP tables apply to both (set-up is the same).

A row's next state is either a state, or a :class:`Decision`: the server hands the message
to the application (an event) and holds in WAIT_APP, buffering whatever the peer sends
meanwhile, until the application answers; :data:`ANSWERS` then gives the state that
follows (RESUME: back to the state the message arrived in). Rows that carry an Accept
field (or whose set-up may fail) also name the state a refusal leads to.

Deadlines (RFC 4656 §3: "if the full control message is not received within some number
of minutes after it is expected, the TCP connection ... SHOULD be dropped"; RFC 5357 §3.1
SERVWAIT, suspended while tests run, RFC 5938 §3.6) hang off the states: :data:`DEADLINES`
gives each state's kind; :func:`deadline_kind` refines TEST by whether sessions exist. The
values come from config (agent.control.aio.ListenerLimits), which the asyncio adapter
applies per state, not per read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.control import messages as m
from agent.control.messages import ProtocolError


class UsageError(RuntimeError):
    """A send_* method was called in a state where it is not allowed (our bug, not the peer's)."""


class Role(StrEnum):
    CLIENT = "client"
    SERVER = "server"


class Proto(StrEnum):
    OWAMP = "owamp"
    TWAMP = "twamp"
    TWAMP_ISC = "twamp+isc"  # RFC 5938 Individual Session Control negotiated


class State(StrEnum):
    # StrEnum: a state compares equal to its name string ("ready" == State.READY).
    GREETING = "greeting"  # client: connected, waiting for the Server-Greeting
    SETUP = "setup"  # server: Server-Greeting sent, waiting for Set-Up-Response
    SERVER_START = "server-start"  # client: Set-Up-Response sent, waiting for Server-Start
    WAIT_KEY = "wait-key"  # hold: a key derivation runs off the loop; input is buffered
    READY = "ready"  # client: set up, no test running
    REQUEST = "request"  # server: set up, no test running
    WAIT_APP = "wait-app"  # hold (server): the application decides; input is buffered
    TEST = "test"  # Start-Ack / Start-N-Ack with Accept 0: test sessions run
    CLOSED = "closed"


INITIAL: dict[Role, State] = {Role.CLIENT: State.GREETING, Role.SERVER: State.SETUP}

# States in which input is buffered, not read: it is judged by the state they resume to.
HOLD_STATES = frozenset({State.WAIT_KEY, State.WAIT_APP})


class Msg(StrEnum):
    SERVER_GREETING = "Server-Greeting"
    SET_UP_RESPONSE = "Set-Up-Response"
    SERVER_START = "Server-Start"
    REQUEST_SESSION = "Request-Session"
    START_SESSIONS = "Start-Sessions"
    STOP_SESSIONS = "Stop-Sessions"
    FETCH_SESSION = "Fetch-Session"
    REQUEST_TW_SESSION = "Request-TW-Session"
    START_N_SESSIONS = "Start-N-Sessions"
    STOP_N_SESSIONS = "Stop-N-Sessions"
    ACCEPT_SESSION = "Accept-Session"
    START_ACK = "Start-Ack"
    FETCH_ACK = "Fetch-Ack"  # with, if Accept is 0, the Request-Session, skip ranges and records
    START_N_ACK = "Start-N-Ack"
    STOP_N_ACK = "Stop-N-Ack"


# Command numbers a server reads in the first octet (RFC 4656 §3.4, RFC 5357 §3.5, RFC 5938 §6.4).
# Any other number has no row in any state.
COMMANDS: dict[int, Msg] = {
    m.CMD_REQUEST_SESSION: Msg.REQUEST_SESSION,
    m.CMD_START_SESSIONS: Msg.START_SESSIONS,
    m.CMD_STOP_SESSIONS: Msg.STOP_SESSIONS,
    m.CMD_FETCH_SESSION: Msg.FETCH_SESSION,
    m.CMD_REQUEST_TW_SESSION: Msg.REQUEST_TW_SESSION,
    m.CMD_START_N_SESSIONS: Msg.START_N_SESSIONS,
    m.CMD_STOP_N_SESSIONS: Msg.STOP_N_SESSIONS,
}


class Decision(StrEnum):
    """What the server's application must answer (ControlServer.awaiting)."""

    ACCEPT = "accept"  # Accept-Session (accept_session)
    START = "start"  # Start-Ack (start_ack)
    STOP = "stop"  # OWAMP: the server's own Stop-Sessions (send_stop_sessions)
    FETCH = "fetch"  # Fetch-Ack and data (send_fetch_response / reject_fetch)
    START_N = "start-n"  # Start-N-Ack (start_n_ack)
    STOP_N = "stop-n"  # Stop-N-Ack (stop_n_ack)


class Resume(StrEnum):
    RESUME = "resume"  # back to the state the decided message arrived in


RESUME = Resume.RESUME
Next = State | Decision


@dataclass(frozen=True, slots=True)
class Row:
    ok: Next  # the message is taken (and, with an Accept field, says 0)
    refused: State | None  # its Accept is not 0 / set-up refused (None: no such outcome)
    rfc: str


def _r(ok: Next, rfc: str, refused: State | None = None) -> Row:
    return Row(ok, refused, rfc)


S = State
_SETUP_SERVER = {S.SETUP: {Msg.SET_UP_RESPONSE: _r(S.REQUEST, "4656 §3.1", S.CLOSED)}}
_SETUP_CLIENT = {
    # Modes = 0: the server "does not wish to talk" (RFC 4656 §3.1)
    S.GREETING: {Msg.SERVER_GREETING: _r(S.SERVER_START, "4656 §3.1", S.CLOSED)},
    S.SERVER_START: {Msg.SERVER_START: _r(S.READY, "4656 §3.1", S.CLOSED)},
}

# Incoming messages: (role, protocol) -> state -> message -> Row.
RECEIVE: dict[tuple[Role, Proto], dict[State, dict[Msg, Row]]] = {
    (Role.SERVER, Proto.OWAMP): {
        **_SETUP_SERVER,
        S.REQUEST: {
            Msg.REQUEST_SESSION: _r(Decision.ACCEPT, "4656 §3.5"),
            Msg.START_SESSIONS: _r(Decision.START, "4656 §3.7"),
            Msg.FETCH_SESSION: _r(Decision.FETCH, "4656 §3.9"),
        },
        # both sides send Stop-Sessions; the server answers with its own (RFC 4656 §3.8)
        S.TEST: {Msg.STOP_SESSIONS: _r(Decision.STOP, "4656 §3.8")},
    },
    (Role.SERVER, Proto.TWAMP): {
        **_SETUP_SERVER,
        S.REQUEST: {
            Msg.REQUEST_TW_SESSION: _r(Decision.ACCEPT, "5357 §3.5"),
            Msg.START_SESSIONS: _r(Decision.START, "5357 §3.7"),
        },
        S.TEST: {Msg.STOP_SESSIONS: _r(S.REQUEST, "5357 §3.8")},  # nothing to answer
    },
    # RFC 5938 §3.1: "The Control-Client and the Server MUST NOT use the start and stop
    # commands (2 and 3)": they have no row. Requests and Start-N/Stop-N in any set-up state.
    (Role.SERVER, Proto.TWAMP_ISC): {
        **_SETUP_SERVER,
        S.REQUEST: {
            Msg.REQUEST_TW_SESSION: _r(Decision.ACCEPT, "5357 §3.5"),
            Msg.START_N_SESSIONS: _r(Decision.START_N, "5938 §3.2"),
            Msg.STOP_N_SESSIONS: _r(Decision.STOP_N, "5938 §3.4"),
        },
        S.TEST: {
            Msg.REQUEST_TW_SESSION: _r(Decision.ACCEPT, "5938 §3.2"),
            Msg.START_N_SESSIONS: _r(Decision.START_N, "5938 §3.2"),
            Msg.STOP_N_SESSIONS: _r(Decision.STOP_N, "5938 §3.4"),
        },
    },
    (Role.CLIENT, Proto.OWAMP): {
        **_SETUP_CLIENT,
        S.READY: {
            Msg.ACCEPT_SESSION: _r(S.READY, "4656 §3.5"),
            Msg.START_ACK: _r(S.TEST, "4656 §3.7", S.READY),
            Msg.FETCH_ACK: _r(S.READY, "4656 §3.9", S.READY),
            Msg.STOP_SESSIONS: _r(S.READY, "4656 §3.8"),
        },
        # the server's Stop-Sessions: its answer to ours, or its own early stop (§3.8)
        S.TEST: {Msg.STOP_SESSIONS: _r(S.READY, "4656 §3.8")},
    },
    (Role.CLIENT, Proto.TWAMP): {
        **_SETUP_CLIENT,
        S.READY: {
            Msg.ACCEPT_SESSION: _r(S.READY, "5357 §3.5"),
            Msg.START_ACK: _r(S.TEST, "5357 §3.7", S.READY),
            Msg.STOP_SESSIONS: _r(S.READY, "5357 §3.8"),
        },
        S.TEST: {Msg.STOP_SESSIONS: _r(S.READY, "5357 §3.8")},  # the server stops the tests
    },
    (Role.CLIENT, Proto.TWAMP_ISC): {
        **_SETUP_CLIENT,
        S.READY: {
            Msg.ACCEPT_SESSION: _r(S.READY, "5357 §3.5"),
            Msg.START_N_ACK: _r(S.TEST, "5938 §3.3", S.READY),
            Msg.STOP_N_ACK: _r(S.READY, "5938 §3.5"),
        },
        S.TEST: {
            Msg.ACCEPT_SESSION: _r(S.TEST, "5938 §3.2"),
            Msg.START_N_ACK: _r(S.TEST, "5938 §3.3", S.TEST),
            Msg.STOP_N_ACK: _r(S.TEST, "5938 §3.5"),
        },
    },
}

# Messages we send of our own accord (the client's requests; the server's early stop):
# (role, protocol) -> state -> message -> next state.
SEND: dict[tuple[Role, Proto], dict[State, dict[Msg, State]]] = {
    (Role.CLIENT, Proto.OWAMP): {
        S.READY: {Msg.REQUEST_SESSION: S.READY, Msg.START_SESSIONS: S.READY, Msg.FETCH_SESSION: S.READY},
        S.TEST: {Msg.STOP_SESSIONS: S.TEST},  # READY once the server's Stop-Sessions arrives
    },
    (Role.CLIENT, Proto.TWAMP): {
        S.READY: {Msg.REQUEST_TW_SESSION: S.READY, Msg.START_SESSIONS: S.READY},
        S.TEST: {Msg.STOP_SESSIONS: S.READY},
    },
    (Role.CLIENT, Proto.TWAMP_ISC): {
        S.READY: {Msg.REQUEST_TW_SESSION: S.READY, Msg.START_N_SESSIONS: S.READY, Msg.STOP_N_SESSIONS: S.READY},
        S.TEST: {Msg.REQUEST_TW_SESSION: S.TEST, Msg.START_N_SESSIONS: S.TEST, Msg.STOP_N_SESSIONS: S.TEST},
    },
    # A server may stop the tests itself (RFC 4656 §3.8, RFC 5357 §3.8): e.g. on abort.
    (Role.SERVER, Proto.OWAMP): {S.TEST: {Msg.STOP_SESSIONS: S.REQUEST}},
    (Role.SERVER, Proto.TWAMP): {S.TEST: {Msg.STOP_SESSIONS: S.REQUEST}},
    (Role.SERVER, Proto.TWAMP_ISC): {},
}

# The server application's answers: protocol -> decision -> (next if Accept 0, next if not).
ANSWERS: dict[Proto, dict[Decision, tuple[State | Resume, State | Resume]]] = {
    Proto.OWAMP: {
        Decision.ACCEPT: (RESUME, RESUME),
        Decision.START: (S.TEST, S.REQUEST),
        Decision.STOP: (S.REQUEST, S.REQUEST),
        Decision.FETCH: (S.REQUEST, S.REQUEST),
    },
    Proto.TWAMP: {
        Decision.ACCEPT: (RESUME, RESUME),
        Decision.START: (S.TEST, S.REQUEST),
    },
    Proto.TWAMP_ISC: {
        Decision.ACCEPT: (RESUME, RESUME),
        Decision.START_N: (S.TEST, RESUME),
        Decision.STOP_N: (RESUME, RESUME),
    },
}


class Deadline(StrEnum):
    """Which clock bounds a state (values: ListenerLimits)."""

    SETUP = "setup"  # absolute, from connect: greeting to Server-Start (setup_timeout)
    IDLE = "idle"  # from the last complete message (idle_timeout; RFC 5357 SERVWAIT)
    EMPTY_TEST = "empty-test"  # in TEST with no session: from entering it (empty_test_timeout)
    TEST = "test"  # from Start-Ack: how long tests may hold the connection (max_test_time)
    NONE = "none"  # the application's (or key worker's) answer is awaited, not the peer


DEADLINES: dict[State, Deadline] = {
    S.GREETING: Deadline.SETUP,
    S.SETUP: Deadline.SETUP,
    S.SERVER_START: Deadline.SETUP,
    S.WAIT_KEY: Deadline.SETUP,
    S.READY: Deadline.IDLE,
    S.REQUEST: Deadline.IDLE,
    S.WAIT_APP: Deadline.NONE,
    S.TEST: Deadline.TEST,
    S.CLOSED: Deadline.NONE,
}


def deadline_kind(state: State | str, proto: Proto, sessions: int) -> Deadline:
    """The deadline of ``state``. TEST with no session is held for nothing: closed soon
    (a zero-session Start-Sessions must not hold a slot for max_test_time). With RFC 5938
    the client may stop every session and go on: SERVWAIT (IDLE) resumes (§3.6)."""
    kind = DEADLINES[State(state)]
    if kind is Deadline.TEST and sessions == 0:
        return Deadline.IDLE if proto is Proto.TWAMP_ISC else Deadline.EMPTY_TEST
    return kind


def protocol_of(twamp: bool, isc: bool) -> Proto:
    if not twamp:
        return Proto.OWAMP
    return Proto.TWAMP_ISC if isc else Proto.TWAMP


def _where(role: Role, proto: Proto, state: State) -> str:
    return f"{role} {proto} in state {state}"


def on_receive(role: Role, proto: Proto, state: State, msg: Msg) -> Row:
    """The row for ``msg`` arriving in ``state``; the one place a peer's out-of-place
    message becomes a protocol error."""
    row = RECEIVE[(role, proto)].get(state, {}).get(msg)
    if row is None:
        raise ProtocolError(f"{msg} not allowed ({_where(role, proto, state)})")
    return row


def on_unknown_command(role: Role, proto: Proto, state: State, cmd: int) -> ProtocolError:
    """The error for a message whose first octet names no message we could expect here
    (the caller raises it: framing cannot go on past it)."""
    return ProtocolError(f"command {cmd} not allowed ({_where(role, proto, state)})")


def on_send(role: Role, proto: Proto, state: State, msg: Msg) -> State:
    """The state after we send ``msg`` in ``state``; a UsageError (our bug) if not allowed."""
    nxt = SEND[(role, proto)].get(state, {}).get(msg)
    if nxt is None:
        raise UsageError(f"cannot send {msg} ({_where(role, proto, state)})")
    return nxt


def on_answer(proto: Proto, decision: Decision, accepted: bool, resume: State) -> State:
    """The state after the server application answers ``decision``."""
    ok, refused = ANSWERS[proto][decision]
    nxt = ok if accepted else refused
    return resume if nxt is RESUME else State(nxt)


# ------------------------------------------------------------------ rendering (docs)


def _fmt(proto: Proto, row: Row) -> str:
    if isinstance(row.ok, Decision):
        ok, no = ANSWERS[proto][row.ok]
        text = f"{State.WAIT_APP}: application answers {row.ok} → {ok} (Accept 0) / {no}"
    else:
        text = str(row.ok)
        if row.refused is not None:
            text += f" (refused or Accept≠0: {row.refused})"
    return text


def render_markdown() -> str:
    """The tables as Markdown, for docs/protocol-interop.md (tools/render-states)."""
    lines = [
        "| Role | Protocol | State | Message | Next state | RFC |",
        "|---|---|---|---|---|---|",
    ]
    for (role, proto), states in RECEIVE.items():
        for state, rows in states.items():
            for msg, row in rows.items():
                lines.append(f"| {role} | {proto} | {state} | {msg} | {_fmt(proto, row)} | RFC {row.rfc} |")
    lines += ["", "| State | Deadline |", "|---|---|"]
    for state, kind in DEADLINES.items():
        lines.append(f"| {state} | {kind} |")
    lines += ["", "Anything else that arrives is a protocol error: the connection is closed. "
              f"While a server holds in {State.WAIT_APP} (or either side in {State.WAIT_KEY}), "
              "input is buffered and judged once the state resumes."]
    return "\n".join(lines) + "\n"
