"""Fast, in-process checks of the control-plane bounds (issue 11 items 1, 4, 6): state
deadlines that no trickle restarts, the failure guard, dummy-key derivations for unknown
KeyIDs, and Fetch records bounded by what the session could hold. The subprocess versions
under attack are in tests/hostile/test_control_bounds.py."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import ControlListener, ListenerLimits
from agent.control.authguard import AuthGuard, source_key
from agent.control.keyring import StaticKeySource
from agent.control.server import ControlServer, ServerConfig
from agent.engine.receiver import OwampReceiver, decode_fetch_records
from agent.sessions.session import TwampHandler
from netlink.secret import Secret

LO = ipaddress.IPv4Address("127.0.0.1")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_guard_budget_refills_and_logs_once(caplog) -> None:
    clock = _Clock()
    g = AuthGuard(burst=3, refill_per_s=0.5, log_interval=60, clock=clock)
    assert g.allow("192.0.2.1")
    for _ in range(3):
        g.failed("192.0.2.1", "bad_token")
    assert not g.allow("192.0.2.1") and g.allow("192.0.2.2")  # per address
    clock.t = 2.0  # one failure's worth refilled
    assert g.allow("192.0.2.1")
    assert g.failures_total == 3 and g.limited_total == 1 and g.by_reason == {"bad_token": 3}
    lines = [r for r in caplog.records if "192.0.2.1" in r.getMessage()]
    assert len(lines) == 1  # at most once per address per interval
    # IPv6 is budgeted per /64: one host cannot rotate through its interface identifiers
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff") != source_key("2001:db8:0:1::1")


def test_guard_is_bounded() -> None:
    g = AuthGuard(max_tracked=100)
    for i in range(1000):
        g.failed(f"10.0.{i // 256}.{i % 256}", "unknown_key")
    assert len(g._buckets) == 100


def test_unknown_keyid_derives_like_a_known_one() -> None:
    ks = StaticKeySource({"alice": Secret(b"pw")})
    guard = AuthGuard()
    seen = []
    for key_id in ("alice", "mallory"):
        srv = ControlServer(True, ServerConfig(count=1024, auth_guard=guard), ks, local=(LO, 862),
                            peer=(ipaddress.ip_address(f"127.0.0.{len(seen) + 2}"), 1), defer_keys=True)
        srv.data_to_send()
        (need,) = srv.receive_data(m.SetUpResponse(2, key_id, bytes(64), bytes(16)).pack())
        assert isinstance(need, ev.KeyNeeded)  # both wait for a PBKDF2 of Count iterations
        assert repr(need.job) == "Pbkdf2Job(count=1024)"
        evs = srv.key_ready(need.job())
        assert isinstance(evs[0], ev.SetupRejected) and evs[0].accept == m.ACCEPT_FAILURE
        assert srv.data_to_send()[15] == m.ACCEPT_FAILURE  # the same answer on the wire
        seen.append(evs[0].reason)
    assert seen == ["authentication failed", "unknown key identity"]  # told apart in our log only
    assert guard.failures_total == 2 and guard.by_reason == {"bad_token": 1, "unknown_key": 1}


def test_guard_refuses_without_deriving() -> None:
    guard = AuthGuard(burst=1)
    ks = StaticKeySource({"alice": Secret(b"pw")})
    guard.failed(LO, "bad_token")
    srv = ControlServer(True, ServerConfig(count=1024, auth_guard=guard), ks, local=(LO, 862), peer=(LO, 1),
                        defer_keys=True)
    srv.data_to_send()
    (e,) = srv.receive_data(m.SetUpResponse(2, "alice", bytes(64), bytes(16)).pack())
    assert e == ev.SetupRejected(m.ACCEPT_TEMPORARY_LIMIT, "authentication rate limit") and srv.closed


def test_fetch_records_bounded_by_number_of_packets() -> None:
    # issue 11 row 1: Next Seqno 0xFFFFFFFF from Stop-Sessions made this loop 2^32 times
    rcv = OwampReceiver(error_estimate=1, expected=3)
    recs = decode_fetch_records(rcv.fetch_records(0, 0xFFFFFFFF, next_seqno=0xFFFFFFFF))
    assert [r[0] for r in recs] == [0, 1, 2]  # three lost records: what could have arrived
    rcv = OwampReceiver(error_estimate=1)  # no count known: nothing beyond what arrived
    assert rcv.fetch_records(0, 0xFFFFFFFF, next_seqno=0xFFFFFFFF) == b""


def test_owamp_stop_sessions_describing_more_than_requested_closes() -> None:
    srv = ControlServer(False, ServerConfig(count=1024), None, local=(LO, 861), peer=(LO, 1))
    srv.data_to_send()
    srv.receive_data(m.SetUpResponse(1).pack())
    srv.receive_data(m.StartSessions().pack())
    srv.start_ack(0)
    # 4096 descriptions announced with no session requested: refused on the first block
    (e,) = srv.receive_data(struct.pack("!BBHI", 3, 0, 0, 4096) + bytes(8))
    assert isinstance(e, ev.ProtocolFailure) and srv.closed


def test_trickle_does_not_restart_the_setup_deadline() -> None:
    async def main() -> None:
        lst = ControlListener(TwampHandler, twamp=True, hosts=["127.0.0.1"], port=0,
                              limits=ListenerLimits(setup_timeout=1.0, idle_timeout=30.0))
        await lst.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", lst.addresses[0][1])
            await r.readexactly(64)

            async def trickle() -> None:
                while True:  # one octet every 0.2 s: a per-read timer of 30 s would never fire
                    w.write(b"\0")
                    await w.drain()
                    await asyncio.sleep(0.2)

            t = asyncio.ensure_future(trickle())
            try:
                assert await asyncio.wait_for(r.read(), 20) == b""  # closed by the set-up deadline
            finally:
                t.cancel()
                w.close()
            assert lst.stats["timeouts_setup"] == 1
        finally:
            await lst.close()

    asyncio.run(main())


def test_empty_start_closed_by_its_deadline() -> None:
    async def main() -> None:
        lst = ControlListener(TwampHandler, twamp=True, hosts=["127.0.0.1"], port=0,
                              limits=ListenerLimits(empty_test_timeout=0.5, idle_timeout=30.0))
        await lst.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", lst.addresses[0][1])
            await r.readexactly(64)
            w.write(m.SetUpResponse(1).pack() + m.StartSessions().pack())
            await r.readexactly(48 + 32)
            assert await asyncio.wait_for(r.read(), 20) == b""
            w.close()
            assert lst.stats["timeouts_empty_test"] == 1
        finally:
            await lst.close()

    asyncio.run(main())
