"""The sans-IO client and server against each other, every mode, plus abuse: bad keys,
modes not offered, limits, and random byte streams into the server."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control import events as ev
from agent.control import messages as m
from agent.control.client import ControlClient
from agent.control.keyring import StaticKeySource
from agent.control.modes import Mode
from agent.control.server import ControlServer, ServerConfig
from agent.engine.timefmt import ErrorEstimate
from netlink.secret import Secret

LO = ipaddress.IPv4Address("127.0.0.1")
KEYS = StaticKeySource({"alice": Secret(b"alice's passphrase")})
CFG = ServerConfig(count=1024, max_sessions=2)


def pump(a, b) -> list[tuple[str, ev.Event]]:
    out: list[tuple[str, ev.Event]] = []
    for _ in range(20):
        x = a.data_to_send()
        if x:
            out += [("b", e) for e in b.receive_data(x)]
        y = b.data_to_send()
        if y:
            out += [("a", e) for e in a.receive_data(y)]
        if not x and not y:
            break
    return out


def setup(twamp: bool, mode: str, srv_modes: int | None = None, key_id: str = "alice", ks_client=KEYS,
          features: int = 0):
    srv = ControlServer(twamp, ServerConfig(count=1024, max_sessions=2, modes=srv_modes) if srv_modes else CFG, KEYS,
                        local=(LO, 862), peer=(LO, 40000))
    cli = ControlClient(twamp, [mode], key_id, ks_client, features=features)
    evs = pump(srv, cli)
    return srv, cli, evs


@pytest.mark.parametrize("mode", ["unauth", "auth", "enc", "mixed"])
def test_twamp_full_conversation(mode: str) -> None:
    srv, cli, evs = setup(True, mode)
    assert any(isinstance(e, ev.Ready) for _, e in evs)
    assert cli.state == "ready" and srv.state == "request"
    req = m.RequestTWSession(LO, LO, 5000, 0, type_p=m.typep_from_dscp(10))
    cli.request_tw_session(req)
    cli.request_tw_session(req)  # pipelined
    evs = pump(cli, srv)
    assert [type(e) for _, e in evs] == [ev.SessionRequested]
    sid1 = evs[0][1].sid
    srv.accept_session(0, 7001)
    evs = pump(srv, cli) + [("b", e) for e in srv.resume()]
    evs += pump(srv, cli)
    reqs = [e for _, e in evs if isinstance(e, ev.SessionRequested)]
    assert len(reqs) == 1
    srv.accept_session(0, 7002)
    evs += pump(srv, cli)
    acc = [e for _, e in evs if isinstance(e, ev.SessionAccepted)]
    assert [a.accept.port for a in acc] == [7001, 7002] and acc[0].accept.sid == sid1
    # test keys agree on both ends, and exist only when test packets are authenticated
    for a in acc:
        ck, sk = a.test_keys, srv.test_keys(a.accept.sid)
        if mode in ("auth", "enc"):
            assert ck is not None and ck == sk
        else:
            assert ck is None and sk is None
    cli.start_sessions()
    assert [type(e) for _, e in pump(cli, srv)] == [ev.StartRequested]
    srv.start_ack(0)
    assert [e for _, e in pump(srv, cli)] == [ev.StartAckReceived(0)]
    cli.stop_sessions(2)
    evs = pump(cli, srv)
    assert isinstance(evs[0][1], ev.StopRequested) and evs[0][1].stop.num_sessions == 2
    assert srv.state == "request" and cli.state == "ready"


@pytest.mark.parametrize("mode", ["unauth", "auth", "enc"])
def test_owamp_conversation_with_fetch(mode: str) -> None:
    srv, cli, _ = setup(False, mode)
    slots = (m.Slot.seconds(m.Slot.EXPONENTIAL, 0.1),)
    send_req = m.RequestSession(LO, LO, 0, 0, conf_receiver=True, num_packets=3, slots=slots)
    recv_req = m.RequestSession(LO, LO, 0, 9000, sid=b"client-sid-16oct", conf_sender=True, conf_receiver=False, num_packets=3,
                                slots=slots)
    cli.request_session(send_req)
    cli.request_session(recv_req)
    evs = pump(cli, srv)
    r1 = evs[0][1]
    assert isinstance(r1, ev.SessionRequested) and r1.request == send_req
    srv.accept_session(0, 8001)
    pump(srv, cli)
    evs = srv.resume()
    assert isinstance(evs[0], ev.SessionRequested) and evs[0].sid == b"client-sid-16oct"
    srv.accept_session(0, 0)
    pump(srv, cli)
    cli.start_sessions()
    pump(cli, srv)
    srv.start_ack(0)
    pump(srv, cli)
    desc = m.SessionDescription(r1.sid, 3, ((1, 1),))
    cli.stop_sessions(1, descriptions=(desc,))
    evs = pump(cli, srv)
    assert evs[0][1].stop.descriptions == (desc,)
    srv.send_stop_sessions(0, (m.SessionDescription(b"client-sid-16oct", 3),))
    evs = pump(srv, cli)
    assert isinstance(evs[0][1], ev.StopSessionsReceived) and evs[0][1].stop.num_sessions == 1
    assert cli.state == "ready" and srv.state == "request"
    cli.fetch_session(r1.sid)
    evs = pump(cli, srv)
    assert isinstance(evs[0][1], ev.FetchRequested) and evs[0][1].fetch.sid == r1.sid
    ee = ErrorEstimate(True, False, 1, 1)
    recs = tuple(m.DataRecord(i, 1000 + i, ee, 0 if i == 1 else 2000 + i, ee, 64) for i in range(3))
    srv.send_fetch_response(m.FetchAck(0, True, 3, 1, 3), send_req, ((1, 1),), recs)
    evs = pump(srv, cli)
    res = evs[0][1]
    assert isinstance(res, ev.FetchResult) and res.records == recs and res.skip_ranges == ((1, 1),)
    assert res.request == send_req
    cli.fetch_session(b"x" * 16)
    pump(cli, srv)
    srv.reject_fetch()
    evs = pump(srv, cli)
    assert evs[0][1] == ev.FetchResult(m.FetchAck(1))


def test_bad_passphrase_refused() -> None:
    bad = StaticKeySource({"alice": Secret(b"wrong")})
    srv, cli, evs = setup(True, "auth", ks_client=bad)
    kinds = [type(e) for _, e in evs]
    assert ev.SetupRejected in kinds and ev.SetupRefused in kinds
    assert srv.closed and cli.closed
    assert [e.accept for _, e in evs if isinstance(e, ev.SetupRefused)] == [m.ACCEPT_FAILURE]


def test_unknown_identity_refused() -> None:
    other = StaticKeySource({"mallory": Secret(b"x")})
    srv, cli, evs = setup(True, "enc", key_id="mallory", ks_client=other)
    assert srv.closed and any(isinstance(e, ev.SetupRefused) for _, e in evs)


def test_mode_not_offered() -> None:
    # the client wants auth; the server offers only unauthenticated
    srv, cli, evs = setup(True, "auth", srv_modes=int(Mode.UNAUTHENTICATED))
    assert cli.closed and isinstance(evs[-1][1], ev.ProtocolFailure)
    # a client that selects a mode anyway gets Accept=3 (not supported)
    srv = ControlServer(True, ServerConfig(count=1024, modes=int(Mode.UNAUTHENTICATED)), KEYS)
    srv.data_to_send()
    evs = srv.receive_data(m.SetUpResponse(int(Mode.ENCRYPTED), "alice").pack())
    assert evs == [ev.SetupRejected(m.ACCEPT_NOT_SUPPORTED, "mode 4 not offered")]
    assert srv.data_to_send()[15] == m.ACCEPT_NOT_SUPPORTED and srv.closed


def test_owamp_never_offers_mixed_or_twamp_features() -> None:
    srv = ControlServer(False, ServerConfig(count=1024, modes=0x1FF), KEYS)
    # OWAMP-Modes bit 4 (16) is RFC 7717 there, offered only when a key source serves it
    assert m.ServerGreeting.unpack(srv.data_to_send()).modes == 7


def test_refusing_server_greets_with_zero_modes() -> None:
    srv = ControlServer(True, CFG, KEYS, refuse=True)
    assert m.ServerGreeting.unpack(srv.data_to_send()).modes == 0 and srv.closed
    cli = ControlClient(True, ["unauth"])
    g = m.ServerGreeting(0, bytes(16), bytes(16), 1024).pack()
    assert isinstance(cli.receive_data(g)[0], ev.ProtocolFailure)


def test_client_caps_count() -> None:
    cli = ControlClient(True, ["auth"], "alice", KEYS, max_count=1 << 12)
    evs = cli.receive_data(m.ServerGreeting(2, bytes(16), bytes(16), 1 << 24).pack())
    assert isinstance(evs[0], ev.ProtocolFailure) and "limit" in evs[0].reason


def test_session_cap_per_connection() -> None:
    srv, cli, _ = setup(True, "unauth")
    req = m.RequestTWSession(LO, LO)
    for port in (1, 2):
        cli.request_tw_session(req)
        pump(cli, srv)
        srv.accept_session(0, port)
        pump(srv, cli)
    cli.request_tw_session(req)
    evs = pump(cli, srv)
    assert [type(e) for s, e in evs] == [ev.SessionRefused, ev.SessionAccepted]
    assert evs[1][1].accept.accept == m.ACCEPT_PERMANENT_LIMIT


def test_forbidden_command_closes() -> None:
    srv, cli, _ = setup(True, "unauth")
    evs = srv.receive_data(b"\x01" + bytes(111))  # Request-Session on TWAMP: forbidden
    assert isinstance(evs[0], ev.ProtocolFailure) and srv.closed
    assert srv.receive_data(b"anything") == []


def test_individual_session_control() -> None:
    srv, cli, _ = setup(True, "auth", srv_modes=int(Mode.AUTHENTICATED | Mode.INDIVIDUAL_SESSION_CONTROL),
                        features=int(Mode.INDIVIDUAL_SESSION_CONTROL))
    assert cli.mode == Mode.AUTHENTICATED | Mode.INDIVIDUAL_SESSION_CONTROL
    cli.request_tw_session(m.RequestTWSession(LO, LO))
    evs = pump(cli, srv)
    srv.accept_session(0, 1234)
    sid = evs[0][1].sid
    pump(srv, cli)
    cli.start_n_sessions((sid,))
    evs = pump(cli, srv)
    assert isinstance(evs[0][1], ev.StartNRequested) and evs[0][1].msg.sids == (sid,)
    srv.start_n_ack(0, (sid,))
    evs = pump(srv, cli)
    assert isinstance(evs[0][1], ev.StartNAckReceived) and cli.state == "test"
    cli.stop_n_sessions((sid,))
    pump(cli, srv)
    srv.stop_n_ack(0, (sid,))
    evs = pump(srv, cli)
    assert isinstance(evs[0][1], ev.StopNAckReceived) and evs[0][1].ack.sids == (sid,)


def test_isc_not_negotiated_is_usage_error() -> None:
    from agent.control._conn import UsageError

    _, cli, _ = setup(True, "unauth")
    with pytest.raises(UsageError):
        cli.start_n_sessions(())


# ---------------------------------------------------------------- fuzzing the server


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=6), st.sampled_from(["unauth", "auth"]), st.booleans())
def test_fuzz_server_random_streams(chunks: list[bytes], mode: str, handshake: bool) -> None:
    srv = ControlServer(True, CFG, KEYS)
    srv.data_to_send()
    if handshake:  # random bytes after a valid set-up, so they reach the request parser
        cli = ControlClient(True, [mode], "alice", KEYS)
        cli.receive_data(m.ServerGreeting.unpack(srv.greeting.pack()).pack())
        srv.receive_data(cli.data_to_send())
        srv.data_to_send()
    for c in chunks:
        evs = srv.receive_data(c)  # must never raise
        for e in evs:
            assert isinstance(e, ev.Event)
            if isinstance(e, ev.SessionRequested):
                srv.accept_session(0, 1)
            elif isinstance(e, ev.StartRequested):
                srv.start_ack(0)
            elif isinstance(e, ev.StopRequested) and srv.owamp:
                srv.send_stop_sessions()
        srv.data_to_send()


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.booleans())
def test_fuzz_client_random_answers(data: bytes, twamp: bool) -> None:
    cli = ControlClient(twamp, ["unauth"])
    cli.receive_data(data)  # must never raise
    srv = ControlServer(twamp, CFG, KEYS)
    cli2 = ControlClient(twamp, ["unauth"])
    pump(srv, cli2)
    cli2.receive_data(data)


def test_fuzz_server_does_not_disturb_other_connections() -> None:
    good_srv, good_cli, _ = setup(True, "enc")
    bad = ControlServer(True, CFG, KEYS)
    bad.receive_data(b"\xff" * 500)
    assert bad.closed and not good_srv.closed
    good_cli.request_tw_session(m.RequestTWSession(LO, LO))
    assert isinstance(pump(good_cli, good_srv)[0][1], ev.SessionRequested)


def test_owamp_server_does_not_send_to_third_parties() -> None:
    srv, cli, _ = setup(False, "unauth")  # peer is 127.0.0.1
    victim = ipaddress.IPv4Address("192.0.2.99")
    slots = (m.Slot.seconds(m.Slot.FIXED, 0.001),)
    cli.request_session(m.RequestSession(LO, victim, 0, 9, sid=b"v" * 16, conf_sender=True, conf_receiver=False,
                                         num_packets=1000, slots=slots))
    evs = pump(cli, srv)
    refused = [e for _, e in evs if isinstance(e, ev.SessionRefused)]
    assert refused and refused[0].accept == m.ACCEPT_FAILURE
    assert [e.accept.accept for _, e in evs if isinstance(e, ev.SessionAccepted)] == [m.ACCEPT_FAILURE]


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    pos = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in pos + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 10_000), max_size=8), st.sampled_from(["unauth", "enc"]), st.booleans())
def test_any_tcp_segmentation_gives_the_same_conversation(cuts: list[int], mode: str, twamp: bool) -> None:
    """Framing does not depend on how TCP cuts the stream: feed every byte string in pieces."""
    srv = ControlServer(twamp, CFG, KEYS, local=(LO, 862), peer=(LO, 40000))
    cli = ControlClient(twamp, [mode], "alice", KEYS)

    def deliver(src, dst) -> list:
        evs = []
        for piece in _chunked(src.data_to_send(), cuts):
            evs += dst.receive_data(piece)
        return evs

    assert isinstance(deliver(srv, cli)[0], ev.GreetingReceived)
    assert isinstance(deliver(cli, srv)[0], ev.SetupComplete)
    assert isinstance(deliver(srv, cli)[0], ev.Ready)
    slots = (m.Slot.seconds(m.Slot.FIXED, 0.1),)
    req = m.RequestTWSession(LO, LO, 1, 2) if twamp else m.RequestSession(LO, LO, 1, 2, num_packets=3, slots=slots)
    for _ in range(2):
        (cli.request_tw_session if twamp else cli.request_session)(req)  # pipelined
    evs = deliver(cli, srv)
    srv.accept_session(0, 7)
    evs += srv.resume()
    srv.accept_session(0, 8)
    got = deliver(srv, cli)
    assert [e.accept.port for e in got] == [7, 8]
    cli.start_sessions()
    deliver(cli, srv)
    srv.start_ack(0)
    assert deliver(srv, cli) == [ev.StartAckReceived(0)]
    cli.stop_sessions(2, descriptions=() if twamp else tuple(m.SessionDescription(a.accept.sid, 3) for a in got))
    stop = deliver(cli, srv)
    assert isinstance(stop[0], ev.StopRequested)
    if not twamp:
        srv.send_stop_sessions()
        assert isinstance(deliver(srv, cli)[0], ev.StopSessionsReceived)
    assert not srv.closed and not cli.closed


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=6))
def test_segmented_n_session_messages(cuts: list[int]) -> None:
    srv, cli, _ = setup(True, "enc", srv_modes=int(Mode.ENCRYPTED | Mode.INDIVIDUAL_SESSION_CONTROL),
                        features=int(Mode.INDIVIDUAL_SESSION_CONTROL))

    def deliver(src, dst) -> list:
        evs = []
        for piece in _chunked(src.data_to_send(), cuts):
            evs += dst.receive_data(piece)
        return evs

    sids = (b"a" * 16, b"b" * 16, b"c" * 16)
    cli.start_n_sessions(sids)
    evs = deliver(cli, srv)
    assert isinstance(evs[0], ev.StartNRequested) and evs[0].msg.sids == sids
    srv.start_n_ack(0, sids)
    evs = deliver(srv, cli)
    assert isinstance(evs[0], ev.StartNAckReceived) and evs[0].ack.sids == sids
