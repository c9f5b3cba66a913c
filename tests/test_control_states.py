"""Every (state, message) pair of agent.control.states, generated from its tables, checked
against a real ControlServer / ControlClient: a pair with a row is taken and leads to the
row's next state (for server rows that hand over to the application: both answers, and the
state ANSWERS says); a pair without one is a protocol error and the connection closes.

The messages are built from their RFC layouts with ``struct`` (RFC 4656 §3, RFC 5357 §3,
RFC 5938 §3), not with our codecs, in unauthenticated mode (no HMAC checked, RFC 4656 §3.2)."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from pathlib import Path

import pytest

from agent.control import events as ev
from agent.control import messages as m
from agent.control import states as st
from agent.control.client import ControlClient
from agent.control.modes import Mode
from agent.control.server import ControlServer, ServerConfig
from agent.control.states import Decision, Msg, Proto, Role, State

LO = ipaddress.IPv4Address("127.0.0.1")
MODES = int(Mode.UNAUTHENTICATED | Mode.AUTHENTICATED | Mode.INDIVIDUAL_SESSION_CONTROL)
CFG = ServerConfig(count=1024, modes=MODES)
SID = b"S" * 16
ISC = int(Mode.INDIVIDUAL_SESSION_CONTROL)


# ---------------------------------------------------------------- wire, from the RFC layouts


def set_up_response(mode: int) -> bytes:  # RFC 4656 §3.1: Mode, KeyID 80, Token 64, Client-IV 16
    return struct.pack("!I", mode) + bytes(80 + 64 + 16)


def _preamble(cmd: int, cs: int, cr: int, nslots: int, npackets: int, rport: int) -> bytes:
    # RFC 4656 §3.5 / RFC 5357 §3.5: 112 octets, HMAC in the last 16
    lo = LO.packed + bytes(12)
    return (struct.pack("!BBBBII", cmd, 4, cs, cr, nslots, npackets) + struct.pack("!HH", 0, rport) + lo + lo
            + bytes(16) + struct.pack("!I", 0) + struct.pack("!QQ", 0, 0) + struct.pack("!I", 0) + bytes(8)
            + bytes(16))


def request_session(conf_receiver: int = 1) -> bytes:  # one fixed slot of 0.1 s, 1 packet
    slot = struct.pack("!I", 1) + bytes(4) + struct.pack("!Q", int(0.1 * (1 << 32)))
    return _preamble(1, 0, conf_receiver, 1, 1, 0) + slot + bytes(16)


def request_tw_session() -> bytes:
    return _preamble(5, 0, 0, 0, 0, 5000)


def start_sessions() -> bytes:
    return bytes([2]) + bytes(15) + bytes(16)


def stop_sessions(accept: int = 0) -> bytes:  # no session descriptions
    return struct.pack("!BBHI", 3, accept, 0, 0) + bytes(8) + bytes(16)


def fetch_session() -> bytes:  # RFC 4656 §3.9
    return bytes([4]) + bytes(7) + struct.pack("!II", 0, 0xFFFFFFFF) + SID + bytes(16)


def n_sessions(cmd: int, accept: int | None = None) -> bytes:  # RFC 5938 §3.2–3.5, one SID
    head = bytes([cmd]) + (bytes([accept]) + bytes(10) if accept is not None else bytes(11))
    return head + struct.pack("!I", 1) + SID + bytes(16)


def server_greeting(modes: int) -> bytes:  # RFC 4656 §3.1: 12 unused, Modes, Challenge, Salt, Count, MBZ
    return bytes(12) + struct.pack("!I", modes) + bytes(16) + bytes(16) + struct.pack("!I", 1024) + bytes(12)


def server_start(accept: int = 0) -> bytes:  # MBZ 15, Accept, Server-IV 16, Start-Time 8, MBZ 8
    return bytes(15) + bytes([accept]) + bytes(16) + bytes(16)


def accept_session(accept: int = 0) -> bytes:  # RFC 4656 §3.5: Accept, MBZ, Port, SID, MBZ 12, HMAC
    return struct.pack("!BBH", accept, 0, 5000) + SID + bytes(12) + bytes(16)


def start_ack(accept: int = 0) -> bytes:
    return bytes([accept]) + bytes(15) + bytes(16)


def fetch_ack_refused() -> bytes:  # Accept 1: nothing follows (RFC 4656 §3.9)
    return bytes([1]) + bytes(15) + bytes(16)


SERVER_WIRE = {
    Msg.SET_UP_RESPONSE: lambda proto: set_up_response(1),
    Msg.REQUEST_SESSION: lambda proto: request_session(),
    Msg.START_SESSIONS: lambda proto: start_sessions(),
    Msg.STOP_SESSIONS: lambda proto: stop_sessions(),
    Msg.FETCH_SESSION: lambda proto: fetch_session(),
    Msg.REQUEST_TW_SESSION: lambda proto: request_tw_session(),
    Msg.START_N_SESSIONS: lambda proto: n_sessions(7),
    Msg.STOP_N_SESSIONS: lambda proto: n_sessions(9),
}
CLIENT_WIRE = {
    Msg.SERVER_GREETING: server_greeting(MODES),
    Msg.SERVER_START: server_start(),
    Msg.ACCEPT_SESSION: accept_session(),
    Msg.START_ACK: start_ack(),
    Msg.STOP_SESSIONS: stop_sessions(),
    Msg.FETCH_ACK: fetch_ack_refused(),
    Msg.START_N_ACK: n_sessions(8, 0),
    Msg.STOP_N_ACK: n_sessions(10, 0),
}
# What the client must have asked for to read each answer (None: unsolicited).
PENDING = {Msg.ACCEPT_SESSION: Msg.ACCEPT_SESSION, Msg.START_ACK: Msg.START_ACK, Msg.FETCH_ACK: Msg.FETCH_ACK,
           Msg.START_N_ACK: Msg.START_N_ACK, Msg.STOP_N_ACK: Msg.STOP_N_ACK, Msg.STOP_SESSIONS: None}


# ---------------------------------------------------------------- connections in a given state


def server_in(proto: Proto, state: State) -> ControlServer:
    srv = ControlServer(proto is not Proto.OWAMP, CFG, None, local=(LO, 862), peer=(LO, 40000))
    srv.data_to_send()
    if state == State.SETUP:
        return srv
    srv.receive_data(set_up_response(1 | (ISC if proto is Proto.TWAMP_ISC else 0)))
    assert srv.state == State.REQUEST and srv.proto is proto
    if state == State.TEST:
        first = request_session() if proto is Proto.OWAMP else request_tw_session()
        (req,) = srv.receive_data(first)
        assert isinstance(req, ev.SessionRequested)
        srv.accept_session(0, 5000, SID)
        if proto is Proto.TWAMP_ISC:
            srv.receive_data(n_sessions(7))
            srv.start_n_ack(0, (SID,))
        else:
            srv.receive_data(start_sessions())
            srv.start_ack(0)
    srv.data_to_send()
    assert srv.state == state and not srv.closed
    return srv


def client_in(proto: Proto, state: State) -> ControlClient:
    cli = ControlClient(proto is not Proto.OWAMP, ["unauth"], features=ISC if proto is Proto.TWAMP_ISC else 0)
    if state != State.GREETING:
        cli.receive_data(server_greeting(MODES))
    if state in (State.READY, State.TEST):
        cli.receive_data(server_start())
    if state == State.TEST:
        cli._pending.append((Msg.ACCEPT_SESSION, None))
        cli.receive_data(accept_session())
        if proto is Proto.TWAMP_ISC:
            cli._pending.append((Msg.START_N_ACK, None))
            cli.receive_data(n_sessions(8, 0))
        else:
            cli._pending.append((Msg.START_ACK, None))
            cli.receive_data(start_ack())
    cli.data_to_send()
    assert cli.state == state and not cli.closed
    assert cli.proto is proto or state == State.GREETING  # the mode is chosen on the greeting
    return cli


# ---------------------------------------------------------------- the generated pairs

SERVER_STATES = {State.SETUP: [Msg.SET_UP_RESPONSE], State.REQUEST: list(st.COMMANDS.values()),
                 State.TEST: list(st.COMMANDS.values())}
CLIENT_STATES = {State.GREETING: [Msg.SERVER_GREETING], State.SERVER_START: [Msg.SERVER_START],
                 State.READY: list(PENDING), State.TEST: list(PENDING)}


def _pairs(role: Role) -> list[tuple[Proto, State, Msg]]:
    table = SERVER_STATES if role is Role.SERVER else CLIENT_STATES
    return [(p, s, msg) for p in Proto for s, msgs in table.items() for msg in msgs]


def test_the_pairs_cover_every_row() -> None:
    for role in Role:
        pairs = set(_pairs(role))
        for (r, proto), states in st.RECEIVE.items():
            if r is not role:
                continue
            for state, rows in states.items():
                for msg in rows:
                    assert (proto, state, msg) in pairs, (role, proto, state, msg)


def _answer(srv: ControlServer, decision: Decision, ok: bool) -> None:
    a = 0 if ok else 1
    if decision is Decision.ACCEPT:
        srv.accept_session(a, 5001)
    elif decision is Decision.START:
        srv.start_ack(a)
    elif decision is Decision.STOP:
        srv.send_stop_sessions(a)
    elif decision is Decision.FETCH:
        if ok:
            srv.send_fetch_response(m.FetchAck(0, True, 1, 0, 0), srv.sessions[SID].request, (), ())  # type: ignore[arg-type]
        else:
            srv.reject_fetch()
    elif decision is Decision.START_N:
        srv.start_n_ack(a, (SID,))
    elif decision is Decision.STOP_N:
        srv.stop_n_ack(a, (SID,))


@pytest.mark.parametrize("proto,state,msg", _pairs(Role.SERVER), ids=lambda v: str(v))
def test_server_pair(proto: Proto, state: State, msg: Msg) -> None:
    row = st.RECEIVE[(Role.SERVER, proto)].get(state, {}).get(msg)
    srv = server_in(proto, state)
    data = SERVER_WIRE[msg](proto)
    evs = srv.receive_data(data)
    if row is None:
        assert srv.closed and isinstance(evs[-1], ev.ProtocolFailure), evs
        assert str(msg) in evs[-1].reason and str(state) in evs[-1].reason
        return
    assert not srv.closed, evs
    if not isinstance(row.ok, Decision):
        assert srv.state == row.ok and srv.awaiting is None
        return
    assert srv.state == State.WAIT_APP and srv.awaiting == row.ok
    for ok in (True, False):
        s2 = server_in(proto, state)
        s2.receive_data(data)
        if row.ok is Decision.FETCH and ok:
            # an accepted fetch needs a session with records: one Request-Session accepted
            s2 = server_in(proto, state)
            s2.receive_data(request_session())
            s2.accept_session(0, 5000, SID)
            s2.receive_data(data)
        _answer(s2, row.ok, ok)
        want_ok, want_no = st.ANSWERS[proto][row.ok]
        want = want_ok if ok else want_no
        assert s2.state == (state if want is st.RESUME else want) and not s2.closed, (ok, s2.state)


@pytest.mark.parametrize("proto,state,msg", _pairs(Role.CLIENT), ids=lambda v: str(v))
def test_client_pair(proto: Proto, state: State, msg: Msg) -> None:
    row = st.RECEIVE[(Role.CLIENT, proto)].get(state, {}).get(msg)
    cli = client_in(proto, state)
    kind = PENDING.get(msg)
    if kind is not None and state in (State.READY, State.TEST):
        cli._pending.append((kind, None))  # as if we had asked (the send side: test_client_sends)
    evs = cli.receive_data(CLIENT_WIRE[msg])
    if row is None:
        assert cli.closed and isinstance(evs[-1], ev.ProtocolFailure), evs
        return
    assert not cli.closed, evs
    refused = msg is Msg.FETCH_ACK  # our Fetch-Ack says Accept=1
    assert cli.state == (row.refused if refused else row.ok), evs


CLIENT_SENDS = {
    Msg.REQUEST_SESSION: lambda c: c.request_session(m.RequestSession.unpack(request_session())),
    Msg.REQUEST_TW_SESSION: lambda c: c.request_tw_session(m.RequestTWSession.unpack(request_tw_session())),
    Msg.START_SESSIONS: lambda c: c.start_sessions(),
    Msg.STOP_SESSIONS: lambda c: c.stop_sessions(1),
    Msg.FETCH_SESSION: lambda c: c.fetch_session(SID),
    Msg.START_N_SESSIONS: lambda c: c.start_n_sessions((SID,)),
    Msg.STOP_N_SESSIONS: lambda c: c.stop_n_sessions((SID,)),
}


@pytest.mark.parametrize("proto,state,msg", list(itertools.product(Proto, (State.READY, State.TEST), CLIENT_SENDS)),
                         ids=lambda v: str(v))
def test_client_sends(proto: Proto, state: State, msg: Msg) -> None:
    nxt = st.SEND[(Role.CLIENT, proto)].get(state, {}).get(msg)
    cli = client_in(proto, state)
    if nxt is None:
        with pytest.raises(st.UsageError):
            CLIENT_SENDS[msg](cli)
        assert cli.data_to_send() == b""
        return
    CLIENT_SENDS[msg](cli)
    assert cli.state == nxt and cli.data_to_send()


@pytest.mark.parametrize("proto", list(Proto))
def test_server_holds_input_while_the_application_decides(proto: Proto) -> None:
    srv = server_in(proto, State.REQUEST)
    first = request_session() if proto is Proto.OWAMP else request_tw_session()
    evs = srv.receive_data(first + b"\xff" * 32)  # then a command with no row anywhere
    assert [type(e) for e in evs] == [ev.SessionRequested] and srv.state == State.WAIT_APP
    assert srv.receive_data(b"\xff" * 16) == [] and not srv.closed  # held, not judged yet
    srv.accept_session(0, 5000, SID)
    (fail,) = srv.resume()
    assert isinstance(fail, ev.ProtocolFailure) and "command 255" in fail.reason and srv.closed


def test_deadlines() -> None:
    assert st.deadline_kind(State.SETUP, Proto.TWAMP, 0) is st.Deadline.SETUP
    assert st.deadline_kind(State.REQUEST, Proto.OWAMP, 3) is st.Deadline.IDLE
    assert st.deadline_kind(State.TEST, Proto.TWAMP, 1) is st.Deadline.TEST
    assert st.deadline_kind(State.TEST, Proto.TWAMP, 0) is st.Deadline.EMPTY_TEST
    # RFC 5938 §3.6: SERVWAIT resumes once every session was stopped
    assert st.deadline_kind(State.TEST, Proto.TWAMP_ISC, 0) is st.Deadline.IDLE
    assert set(st.DEADLINES) == set(State)


# ---------------------------------------------------------------- issue 13 §2 rules


def test_unknown_accept_reads_as_failure() -> None:
    # RFC 4656 §3.3: "MUST interpret all values of Accept other than these reserved values as 1"
    cli = client_in(Proto.TWAMP, State.SERVER_START)
    evs = cli.receive_data(server_start(accept=77))
    assert evs == [ev.SetupRefused(1)] and cli.closed
    cli = client_in(Proto.TWAMP, State.READY)
    cli._pending.append((Msg.START_ACK, None))
    (e,) = cli.receive_data(start_ack(accept=200))
    assert e == ev.StartAckReceived(1) and cli.state == State.READY


@pytest.mark.parametrize("cs,cr", [(0, 2), (0, 255), (7, 0)])
def test_request_session_conf_nonzero_reads_as_one(cs: int, cr: int) -> None:
    # RFC 4656 §3.5: "The server MUST interpret any non-zero value as 1"
    srv = server_in(Proto.OWAMP, State.REQUEST)
    data = bytearray(request_session())
    data[2], data[3] = cs, cr
    (e,) = srv.receive_data(bytes(data))
    assert isinstance(e, ev.SessionRequested), e
    assert e.request.conf_sender == bool(cs) and e.request.conf_receiver == bool(cr)


def test_request_session_both_conf_refused_not_closed() -> None:
    # "Both can be set" (RFC 4656 §3.5): a session between two third parties; we refuse it
    srv = server_in(Proto.OWAMP, State.REQUEST)
    data = bytearray(request_session())
    data[2], data[3] = 1, 3
    (e,) = srv.receive_data(bytes(data))
    assert isinstance(e, ev.SessionRefused) and e.accept == 3 and not srv.closed
    assert srv.data_to_send()[0] == 3  # Accept-Session, Accept=3


@pytest.mark.parametrize("cmd", [7, 9])
def test_isc_n_sessions_need_one_sid(cmd: int) -> None:
    # RFC 5938 §3.2/§3.4: Number of Sessions "MUST be one or greater"
    srv = server_in(Proto.TWAMP_ISC, State.REQUEST)
    zero = bytes([cmd]) + bytes(11) + struct.pack("!I", 0) + bytes(16)
    (e,) = srv.receive_data(zero)
    assert isinstance(e, ev.ProtocolFailure) and srv.closed


@pytest.mark.parametrize("data", [start_sessions(), stop_sessions()])
@pytest.mark.parametrize("state", [State.REQUEST, State.TEST])
def test_isc_refuses_commands_2_and_3(data: bytes, state: State) -> None:
    # RFC 5938 §3.1: "MUST NOT use the start and stop commands (2 and 3)"
    srv = server_in(Proto.TWAMP_ISC, state)
    (e,) = srv.receive_data(data)
    assert isinstance(e, ev.ProtocolFailure) and srv.closed
    assert not server_in(Proto.TWAMP_ISC, State.TEST).may_stop  # nor does the server send 3


# ---------------------------------------------------------------- the table in the docs


def test_docs_show_the_table_from_the_code() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol-interop.md").read_text()
    begin, end = "<!-- states:begin (tools/render-states) -->\n", "<!-- states:end -->"
    assert begin in doc and end in doc, "run tools/render-states"
    shown = doc.split(begin, 1)[1].split(end, 1)[0]
    assert shown == st.render_markdown(), "docs/protocol-interop.md is stale: run tools/render-states"
