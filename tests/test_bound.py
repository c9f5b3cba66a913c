"""agent.sessions.bound on the host: policy mapping, the follower's event handling, the runtime's
Rebind/Stop routing, and whole bound TWAMP measurements over loopback with in-memory SA
tables (rekey and deletion injected as XFRM events, wire-format §5)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess

import pytest

from agent.binder import announce as bd
from agent.binder.announce import BinderConfig, Rebind, Stop
from agent.sessions.bound import BinderRuntime, PolicyMap, TunnelBinder, XfrmFollower
from agent.sessions.bound_measurement import BoundTwampMeasurement
from agent.sessions.bound_server import BoundTwampServer
from agent.sessions.netns_loop import NetnsLoop
from netlink.events import EventKind, XfrmEvent
from netlink.fake import make_sa
from netlink.records import Direction, Mode, Policy, PolicyTemplate, Proto, Selector
from netlink.table import SATable
from tests.tampering import TamperedGreeting

ip = ipaddress.ip_address
OA, OB = ip("192.0.2.1"), ip("192.0.2.2")  # outer (SA) addresses: client side A, server side B
LO = ip("127.0.0.1")


def policy(src: str, dst: str, tsrc, tdst, *, direction=Direction.OUT, priority: int = 0, mode=Mode.TUNNEL,
           reqid: int = 7, proto: int = Proto.ESP, index: int = 0) -> Policy:
    s, sp = src.split("/")
    d, dp = dst.split("/")
    sel = Selector(2, ip(s), ip(d), int(sp), int(dp))
    return Policy(sel, direction, index, priority, 0,
                  (PolicyTemplate(2, tsrc, tdst, 0, proto, mode, reqid),))


def sa_pair(spi_ab: int, spi_ba: int, add_time: int = 1_700_000_000, reqid: int = 7):
    """One CHILD_SA as both ends' kernels hold it: A->B and B->A, same keys on both sides."""
    ab = make_sa(OA, OB, spi=spi_ab, reqid=reqid, add_time=add_time, enc_key=os.urandom(16), auth_key=os.urandom(32))
    ba = make_sa(OB, OA, spi=spi_ba, reqid=reqid, add_time=add_time, enc_key=os.urandom(16), auth_key=os.urandom(32))
    return ab, ba


def delete(sa) -> XfrmEvent:
    return XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=sa.key_id)


# ----------------------------------------------------------------------------- PolicyMap


def test_policy_map_picks_tunnel_endpoints() -> None:
    pm = PolicyMap([
        policy("10.0.0.0/8", "10.0.0.0/8", ip("198.51.100.1"), ip("198.51.100.2"), priority=100),
        policy("10.77.1.1/32", "10.77.2.1/32", OA, OB, priority=100),  # more specific, same priority
        policy("10.77.2.1/32", "10.77.1.1/32", OB, OA, direction=Direction.IN),  # inbound: ignored
    ])
    o = pm.outer(ip("10.77.1.1"), ip("10.77.2.1"))
    assert o is not None and (o.local, o.peer, o.reqid) == (OA, OB, 7)
    assert pm.outer(ip("10.1.1.1"), ip("10.2.2.2")).local == ip("198.51.100.1")
    assert pm.outer(ip("172.16.0.1"), ip("10.77.2.1")) is None
    # IPv4-mapped connection addresses (dual-stack sockets) map like plain IPv4
    assert pm.outer(ip("::ffff:10.77.1.1"), ip("::ffff:10.77.2.1")).peer == OB
    # a lower priority value wins over specificity (RFC 4301 SPD order, xfrm priority)
    pm.put(policy("0.0.0.0/0", "0.0.0.0/0", ip("203.0.113.1"), ip("203.0.113.2"), priority=1))
    assert pm.outer(ip("10.77.1.1"), ip("10.77.2.1")).local == ip("203.0.113.1")


def test_policy_map_transport_and_events() -> None:
    tr = policy("192.0.2.1/32", "192.0.2.2/32", ip("0.0.0.0"), ip("0.0.0.0"), mode=Mode.TRANSPORT)
    pm = PolicyMap([tr])
    assert pm.outer(OA, OB) is None  # transport: the SA's addresses are the connection's
    tun = policy("10.77.1.1/32", "10.77.2.1/32", OA, OB, index=42)
    pm.apply(XfrmEvent(EventKind.NEW_POLICY, policy=tun))
    assert pm.outer(ip("10.77.1.1"), ip("10.77.2.1")) is not None
    pm.apply(XfrmEvent(EventKind.DEL_POLICY, policy=tun))
    assert pm.outer(ip("10.77.1.1"), ip("10.77.2.1")) is None
    pm.apply(XfrmEvent(EventKind.FLUSH_POLICY))
    assert len(pm) == 0


def test_tunnel_binder_binds_inner_connection_to_outer_sas() -> None:
    ab, ba = sa_pair(0xA0B00001, 0xB0A00001)
    srv = TunnelBinder(SATable.from_sas([ab, ba]), PolicyMap([policy("10.77.2.1/32", "10.77.1.1/32", OB, OA)]))
    cli = TunnelBinder(SATable.from_sas([ab, ba]), PolicyMap([policy("10.77.1.1/32", "10.77.2.1/32", OA, OB)]))
    b = srv.announce(ip("10.77.2.1"), ip("10.77.1.1"))
    assert (b.c2s.spi, b.s2c.spi) == (0xA0B00001, 0xB0A00001)
    c = cli.accept(b.announcement.pack(), ip("10.77.1.1"), ip("10.77.2.1"))
    assert c.root() == b.root()
    # without the policy the inner addresses name no SA (wire-format §2.1 "Addresses")
    with pytest.raises(bd.BinderRefusal) as e:
        bd.Binder(SATable.from_sas([ab, ba])).announce(ip("10.77.2.1"), ip("10.77.1.1"))
    assert e.value.reason.value == "no_sa"


# ----------------------------------------------------------------------------- follower + runtime


def test_flush_stops_bound_sessions_after_grace() -> None:
    # RekeyTracker follows per-SA deletions; the runtime turns a flush into them.
    ab, ba = sa_pair(0x1001, 0x1002)
    fol = XfrmFollower(sas=[ab, ba])
    now = [0.0]
    rt = BinderRuntime.following(fol, grace=1.0, clock=lambda: now[0])
    seen: list[XfrmEvent] = []
    fol.subscribe(seen.append)
    binding = rt.binder.announce(OB, OA)
    got: list = []
    rt.bind("k", binding, got.append)
    fol.inject(XfrmEvent(EventKind.FLUSH_SA, proto=int(Proto.ESP)))
    assert [e.kind for e in seen] == [EventKind.FLUSH_SA] and len(fol.table) == 0
    assert got == []  # grace period: a break-before-make reauth may still bring a successor
    now[0] = 1.5
    rt.tick()
    assert len(got) == 1 and isinstance(got[0], Stop) and got[0].reason.value == "sa_deleted"
    assert rt.stops == 1


def test_runtime_rebind_on_make_before_break() -> None:
    ab, ba = sa_pair(0x1001, 0x1002)
    fol = XfrmFollower(sas=[ab, ba])
    rt = BinderRuntime.following(fol, grace=5.0, clock=lambda: 0.0)
    got: list = []
    rt.bind("k", rt.binder.announce(OB, OA), got.append)
    nab, nba = sa_pair(0x2001, 0x2002, add_time=1_700_000_100)
    fol.inject(XfrmEvent(EventKind.NEW_SA, sa=nab))
    fol.inject(XfrmEvent(EventKind.NEW_SA, sa=nba))
    assert got == []  # the successor's appearance alone changes nothing (wire-format §5)
    fol.inject(delete(ab))
    assert len(got) == 1 and isinstance(got[0], Rebind)
    assert (got[0].new_c2s.spi, got[0].new_s2c.spi) == (0x2001, 0x2002) and rt.rekeys == 1
    fol.inject(delete(ba))  # the second deletion concerns nobody any more
    assert len(got) == 1


def test_overflow_redump_reconciles_and_late_bind_decides_at_once() -> None:
    ab, ba = sa_pair(0x1001, 0x1002)
    fol = XfrmFollower(sas=[ab, ba])
    now = [0.0]
    rt = BinderRuntime.following(fol, grace=1.0, clock=lambda: now[0])
    got: list = []
    rt.bind("k", rt.binder.announce(OB, OA), got.append)
    # Notifications were lost; the re-dump shows a successor pair and no old pair.
    nab, nba = sa_pair(0x2001, 0x2002, add_time=1_700_000_100)
    fol.table.replace_all([nab, nba])
    fol.inject(XfrmEvent(EventKind.OVERFLOW))
    assert len(got) == 1 and isinstance(got[0], Rebind) and got[0].new_c2s.spi == 0x2001
    # A binding whose SA vanished before bind() (between greeting and bind): decided at once.
    b2 = rt.binder.announce(OB, OA)
    fol.inject(delete(nab))
    fol.inject(delete(nba))
    rt.bind("late", b2, got.append)
    now[0] = 2.0
    rt.tick()
    assert isinstance(got[-1], Stop) and got[-1].key == "late"


# ----------------------------------------------------------------------------- loopback sessions


class _Side:
    """One end's view: its own SA table (same SAs) and its own outbound policy."""

    def __init__(self, sas, out_policy: Policy, cfg: BinderConfig) -> None:
        self.follower = XfrmFollower(sas=sas, policies=PolicyMap([out_policy]))
        self.runtime = BinderRuntime.following(self.follower, config=cfg, grace=0.3)


def _sides(cfg: BinderConfig = BinderConfig()):
    ab, ba = sa_pair(0xA0B00001, 0xB0A00001)
    client = _Side([ab, ba], policy("127.0.0.0/8", "127.0.0.0/8", OA, OB), cfg)
    server = _Side([ab, ba], policy("127.0.0.0/8", "127.0.0.0/8", OB, OA), cfg)
    return client, server, (ab, ba)


def _both(sides, event: XfrmEvent) -> None:
    for s in sides:
        s.follower.inject(event)


async def _wait_for(pred, timeout: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("wanted", ["auth+ipsec-bound", "enc+ipsec-alt1", "auth+ipsec-alt2", "unauth+ipsec-bound"])
def test_bound_measurement_rekey_then_delete(wanted: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys: list[bytes] = []

    async def main() -> None:
        cfg = BinderConfig(allow_alt2=True)
        client, server, (ab, ba) = _sides(cfg)
        keys.extend(a.key.reveal() for sa in (ab, ba) for a in (sa.crypt, sa.auth))
        srv = BoundTwampServer(server.runtime, "127.0.0.1")
        await srv.start()
        for s in (client, server):
            s.runtime.start(0.05)
        meas = BoundTwampMeasurement(client.runtime, "127.0.0.1", srv.port, wanted=[wanted], interval=0.01,
                                     wait=0.2, duration=30)
        task = asyncio.create_task(meas.run())
        try:
            await _wait_for(lambda: meas.result.replies >= 5)
            assert meas.result.legs[0].spi_c2s == 0xA0B00001
            # make-before-break rekey: new pair on both ends, then the old pair goes
            nab, nba = sa_pair(0xA0B00002, 0xB0A00002, add_time=1_700_000_100)
            for sa in (nab, nba):
                _both((client, server), XfrmEvent(EventKind.NEW_SA, sa=sa))
            for sa in (ab, ba):
                _both((client, server), delete(sa))
            await _wait_for(lambda: len(meas.result.legs) == 2 and meas.result.legs[1].replies >= 5)
            before = meas.result.replies
            assert meas.result.rekeys == 1 and client.runtime.rekeys == 1
            assert (meas.result.legs[1].spi_c2s, meas.result.legs[1].spi_s2c) == (0xA0B00002, 0xB0A00002)
            assert meas.result.legs[0].end == "rebind"
            # the new pair is deleted with no successor: after the grace period, Stop
            for sa in (nab, nba):
                _both((client, server), delete(sa))
            res = await asyncio.wait_for(task, 10)
        finally:
            meas.stop()
            await srv.close()
            for s in (client, server):
                await s.runtime.close()
        assert res.stop_reason == "sa_deleted" and "spi_c2s=0xa0b00002" in res.stop_detail
        assert res.replies >= before and res.sent == sum(leg.sent for leg in res.legs)
        assert res.replies == sum(leg.replies for leg in res.legs) and res.bad_hmac == 0
        assert res.legs[-1].end == "sa_deleted" and res.rtt is not None
        assert srv.connections[0].client_stop == 0  # the rebind's Stop-Sessions, Accept=0
        ends = [c.end for c in srv.connections]
        assert ends[0] == "rebind" and ends[-1] == "sa_deleted", srv.connections
        assert server.runtime.stops == 1 and server.runtime.rekeys == 1
        assert client.runtime.counters() == {"rekeys": 1, "stops": 1, "bound": 0}
        d = res.to_dict()
        assert d["lost"] == res.sent - res.replies and d["rekeys"] == 1

    asyncio.run(main())
    assert "rekey" in caplog.text and "0xa0b00002" in caplog.text
    for k in keys:  # logs name SPIs and reqids, never key bytes
        assert k.hex() not in caplog.text.lower() and k.hex()[:16] not in caplog.text.lower()


@pytest.mark.parametrize("tamper,reason", [(dict(spi_delta=1), "no_sa"), (dict(proto=51), "no_sa"),
                                           (dict(proto=17), "bad_announcement")])
def test_wrong_announcement_no_session(tamper: dict, reason: str) -> None:
    async def main() -> None:
        client, server, _ = _sides()
        srv = BoundTwampServer(server.runtime, "127.0.0.1",
                               key_source=TamperedGreeting(server.runtime.key_source, **tamper))
        await srv.start()
        try:
            meas = BoundTwampMeasurement(client.runtime, "127.0.0.1", srv.port, wanted=["auth+ipsec-bound"],
                                         count=5, interval=0.01)
            res = await asyncio.wait_for(meas.run(), 10)
            await _wait_for(lambda: srv.connections and srv.connections[-1].end is not None)
        finally:
            await srv.close()
        assert res.stop_reason == reason and res.sent == 0 and res.legs == []
        assert client.runtime.binder.refusals == {reason: 1}
        # one connection, closed by the client before set-up completed (draft §4.1 "MUST close")
        assert [(c.mode, c.sessions, c.end) for c in srv.connections] == [(0, 0, "closed")]

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_netns_loop_runs_in_its_namespace() -> None:
    ns = f"xwbl-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace")
    try:
        async def interfaces() -> list[str]:
            return [name for _, name in socket.if_nameindex()]

        with NetnsLoop(ns) as nl:
            assert nl.run(interfaces(), 10) == ["lo"]  # a fresh namespace has only lo
        with pytest.raises(FileNotFoundError):
            NetnsLoop(ns + "-missing").start()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_greeting_to_a_peer_without_sa_is_not_a_refusal() -> None:
    """The server asks the binder on every greeting whether to offer the IPsec modes;
    a peer with no SA is the normal case for unauth clients, not a refusal. It counts
    once a client actually picks an IPsec mode on such a connection."""
    from agent.binder.announce import BinderKeySource, Modes
    from agent.binder.keys import BinderRefusal
    from agent.control.keyring import HandshakeContext

    rt = BinderRuntime(SATable(), PolicyMap())
    ks = rt.keys
    assert isinstance(ks, BinderKeySource)
    conn = ((LO, 862), (ip("127.0.0.9"), 40000))
    for _ in range(3):
        assert ks.greeting_extra(HandshakeContext("server", "twamp", *conn, 1)) is None
    assert not rt.binder.refusals
    with pytest.raises(BinderRefusal):
        ks.token_key("", HandshakeContext("server", "twamp", *conn, 2 | int(Modes.IPSEC_BOUND)))
    assert rt.binder.refusals == {"no_sa": 1}
