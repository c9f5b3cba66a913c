"""Full sessions over loopback: xwamp client <-> xwamp server, every mode, TWAMP and OWAMP;
refusals; a tampered test packet is dropped and counted; abusive clients stay isolated."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from agent.control import messages as m
from agent.control.aio import (
    AsyncControlClient,
    ControlError,
    ControlListener,
    ListenerLimits,
)
from agent.control.keyring import StaticKeySource
from agent.control.server import ServerConfig
from agent.engine.packets import Proto, security_from_mode
from agent.engine.sender import TestSender
from agent.sessions.session import (
    OwampHandler,
    PingOptions,
    TwampHandler,
    owping,
    twamp_ping,
)
from netlink.secret import Secret

KEYS = StaticKeySource({"alice": Secret(b"loopback passphrase")})
CFG = ServerConfig(count=1024)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Recorder:
    """Handler factory that remembers its handlers (to read reflector/receiver counters)."""

    def __init__(self, cls) -> None:
        self.cls = cls
        self.handlers: list = []

    def __call__(self, srv):
        h = self.cls(srv)
        self.handlers.append(h)
        return h


async def _listener(twamp: bool, host: str = "127.0.0.1", factory=None, **kw) -> ControlListener:
    lst = ControlListener(factory or (TwampHandler if twamp else OwampHandler), twamp=twamp, hosts=[host], port=0,
                          config=kw.pop("config", CFG), key_source=KEYS, **kw)
    await lst.start()
    return lst


def _opts(host: str, port: int, mode: str, **kw) -> PingOptions:
    return PingOptions(host, port, count=kw.pop("count", 4), interval=0.01, wanted=(mode,), key_id="alice",
                       key_source=KEYS, wait=kw.pop("wait", 0.5), timeout=5.0, **kw)


@pytest.mark.parametrize("mode", ["unauth", "auth", "enc", "mixed"])
def test_twamp_session_every_mode(mode: str) -> None:
    async def main() -> None:
        lst = await _listener(True)
        try:
            got = []
            res = await twamp_ping(_opts("127.0.0.1", lst.addresses[0][1], mode, dscp=10), got.append)
            assert res.summary.loss.sent == 4 and res.summary.loss.received == 4
            assert len(got) == 4 and res.summary.rtt is not None and res.summary.rtt.max < 1000
            assert all(r.sender_ttl == 64 or r.sender_ttl is not None for r in res.records)
        finally:
            await lst.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["unauth", "auth", "enc"])
def test_owamp_both_directions_every_mode(mode: str) -> None:
    async def main() -> None:
        lst = await _listener(False)
        try:
            res = await owping(_opts("127.0.0.1", lst.addresses[0][1], mode))
            assert (res.forward.sent, res.forward.received) == (4, 4)
            assert (res.reverse.sent, res.reverse.received) == (4, 4)
            assert res.forward.delay is not None and len(res.forward_records) == 4
        finally:
            await lst.close()

    asyncio.run(main())


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_loopback_twamp_and_owamp() -> None:
    async def main() -> None:
        t, o = await _listener(True, "::1"), await _listener(False, "::1")
        try:
            res = await twamp_ping(_opts("::1", t.addresses[0][1], "auth", count=2))
            assert res.summary.loss.received == 2
            ow = await owping(_opts("::1", o.addresses[0][1], "enc", count=2))
            assert ow.forward.received == 2 and ow.reverse.received == 2
        finally:
            await t.close()
            await o.close()

    asyncio.run(main())


def test_bad_passphrase_refused() -> None:
    async def main() -> None:
        lst = await _listener(True)
        try:
            bad = StaticKeySource({"alice": Secret(b"not it")})
            with pytest.raises(ControlError, match="refused"):
                await twamp_ping(PingOptions("127.0.0.1", lst.addresses[0][1], wanted=("auth",), key_id="alice",
                                             key_source=bad, timeout=5))
        finally:
            await lst.close()

    asyncio.run(main())


def test_mode_not_offered_refused() -> None:
    async def main() -> None:
        lst = await _listener(True, config=ServerConfig(count=1024, modes=1))
        try:
            with pytest.raises(ControlError, match="none of"):
                await twamp_ping(_opts("127.0.0.1", lst.addresses[0][1], "enc"))
        finally:
            await lst.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["auth", "enc"])
def test_tampered_test_packet_dropped_and_counted(mode: str) -> None:
    async def main() -> None:
        rec = Recorder(TwampHandler)
        lst = await _listener(True, factory=rec)
        conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=True, wanted=[mode],
                                                key_id="alice", key_source=KEYS)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        try:
            lo = ipaddress.IPv4Address("127.0.0.1")
            acc = await conn.request_tw_session(m.RequestTWSession(lo, lo, sock.getsockname()[1], 0))
            assert acc.ok and acc.test_keys is not None
            assert await conn.start_sessions() == 0
            snd = TestSender(Proto.TWAMP, security_from_mode(conn.cli.mode), keys=acc.test_keys, count=2)
            good, bad = snd.build(0, 1), bytearray(snd.build(1, 2))
            bad[40] ^= 0x01  # inside the HMAC-covered part
            dest = ("127.0.0.1", acc.accept.port)
            loop = asyncio.get_running_loop()
            sock.sendto(bytes(bad), dest)
            sock.sendto(good, dest)
            reply = await loop.run_in_executor(None, sock.recv, 2048)
            assert snd.on_reply(reply, 3, 64) is not None and snd.on_reply(reply, 3, 64).sender_ttl is not None
            handler = rec.handlers[0]
            ep = handler.sessions[acc.accept.sid].ep
            counters = ep.counters()
            assert counters["bad_hmac"] == 1 and counters["reflected"] == 1
            with pytest.raises(socket.timeout):
                await loop.run_in_executor(None, sock.recv, 2048)  # nothing for the tampered one
            await conn.stop_sessions(1)
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_abusive_clients_do_not_disturb_others() -> None:
    async def main() -> None:
        lst = await _listener(True, limits=ListenerLimits(max_connections=16, max_per_client=3, idle_timeout=0.5))
        port = lst.addresses[0][1]
        try:
            # garbage after the greeting: that connection is closed, the server keeps serving
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert len(await r.readexactly(64)) == 64
            w.write(b"\x7f" * 400)  # Mode 0x7f7f7f7f: several security bits
            await w.drain()
            start = await asyncio.wait_for(r.read(), 2)  # Server-Start Accept=3, then close
            assert start[15] == m.ACCEPT_NOT_SUPPORTED and await r.read() == b""
            w.close()
            # garbage after a valid unauthenticated set-up: protocol error, close
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readexactly(64)
            w.write(m.SetUpResponse(1).pack() + b"\x09" * 112)
            await w.drain()
            assert len(await r.readexactly(48)) == 48 and await asyncio.wait_for(r.read(), 2) == b""
            w.close()
            # slow clients: idle ones are dropped after idle_timeout; over the per-client cap
            # a client is greeted with Modes = 0 and closed
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            r4, w4 = await asyncio.open_connection("127.0.0.1", port)
            g = m.ServerGreeting.unpack(await r4.readexactly(64))
            assert g.modes == 0
            w4.close()
            await asyncio.sleep(0.8)
            for ri, wi in idle:
                await ri.readexactly(64)
                assert await asyncio.wait_for(ri.read(), 2) == b""
                wi.close()
            # and a good client still gets full service
            res = await twamp_ping(_opts("127.0.0.1", port, "enc", count=2))
            assert res.summary.loss.received == 2
            assert lst.stats["setup_rejected"] >= 1 and lst.stats["protocol_errors"] >= 1
            assert lst.stats["refused"] >= 1 and lst.stats["timeouts"] >= 3
        finally:
            await lst.close()

    asyncio.run(main())


def test_individual_session_control_over_tcp() -> None:
    async def main() -> None:
        cfg = ServerConfig(count=1024, modes=2 | 16)
        lst = await _listener(True, config=cfg)
        conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=True, wanted=["auth"],
                                                key_id="alice", key_source=KEYS, features=16)
        try:
            lo = ipaddress.IPv4Address("127.0.0.1")
            acc = await conn.request_tw_session(m.RequestTWSession(lo, lo, 40000, 0))
            from agent.control import events as ev

            conn.cli.start_n_sessions((acc.accept.sid,))
            ack = await conn._wait(ev.StartNAckReceived)
            assert ack.ack.accept == 0 and ack.ack.sids == (acc.accept.sid,)
            conn.cli.stop_n_sessions((acc.accept.sid,))
            ack = await conn._wait(ev.StopNAckReceived)
            assert ack.ack.accept == 0
        finally:
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_session_cap_per_client_address() -> None:
    async def main() -> None:
        lst = await _listener(True, limits=ListenerLimits(max_sessions_per_client=2))
        port = lst.addresses[0][1]
        lo = ipaddress.IPv4Address("127.0.0.1")
        c1 = await AsyncControlClient.connect("127.0.0.1", port)
        c2 = await AsyncControlClient.connect("127.0.0.1", port)
        try:
            assert (await c1.request_tw_session(m.RequestTWSession(lo, lo, 40001))).ok
            assert (await c2.request_tw_session(m.RequestTWSession(lo, lo, 40002))).ok
            third = await c2.request_tw_session(m.RequestTWSession(lo, lo, 40003))
            assert third.accept.accept == m.ACCEPT_TEMPORARY_LIMIT
        finally:
            await c1.close()
            await c2.close()
            await lst.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["auth", "enc"])
def test_owamp_tampered_packet_dropped_and_counted(mode: str) -> None:
    async def main() -> None:
        rec = Recorder(OwampHandler)
        lst = await _listener(False, factory=rec)
        conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=False, wanted=[mode],
                                                key_id="alice", key_source=KEYS)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        try:
            lo = ipaddress.IPv4Address("127.0.0.1")
            acc = await conn.request_session(m.RequestSession(
                lo, lo, sock.getsockname()[1], 0, num_packets=2, slots=(m.Slot.seconds(1, 0.01),)))
            assert acc.ok and acc.test_keys is not None
            assert await conn.start_sessions() == 0
            snd = TestSender(Proto.OWAMP, security_from_mode(conn.cli.mode), keys=acc.test_keys, count=2,
                             symmetric=False)
            good, bad = snd.build(0, 1), bytearray(snd.build(1, 2))
            bad[5] ^= 0x80  # inside the first (encrypted, authenticated) block
            dest = ("127.0.0.1", acc.accept.port)
            sock.sendto(bytes(bad), dest)
            sock.sendto(good, dest)
            await asyncio.sleep(0.2)
            rcv = rec.handlers[0].sessions[acc.accept.sid].receiver
            assert rcv.counters.bad_hmac == 1 and rcv.counters.recorded == 1
            await conn.stop_sessions(1, 0, (m.SessionDescription(acc.accept.sid, 2),))
            res = await conn.fetch_session(acc.accept.sid)
            assert [r.seq for r in res.records if not r.lost] == [0]
            assert [r.seq for r in res.records if r.lost] == [1]  # the tampered one counts as lost
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_cli_server_ping_owping_on_loopback(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    keys = tmp_path / "keys"
    keys.write_text("# test key\nalice cli passphrase\n")
    keys.chmod(0o600)  # secret files readable by others are refused
    srv = subprocess.Popen([sys.executable, "-m", "agent", "server", "--listen", "127.0.0.1", "--twamp-port", "0",
                            "--owamp-port", "0", "--keyfile", str(keys), "--count", "1024", "--duration", "30"],
                           cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        ports = {}
        while len(ports) < 2:
            line = srv.stdout.readline()
            assert line, srv.stderr.read() if srv.stderr else ""
            proto, port = line.split()[2], int(line.split(" port ")[1].split(",")[0])
            ports[proto] = port

        def cli(*args: str) -> dict:
            r = subprocess.run([sys.executable, "-m", "agent", *args, "--keyfile", str(keys), "--user", "alice",
                                "-c", "3", "-i", "0.01", "--wait", "0.5", "--json"],
                               cwd=root, env=env, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        doc = cli("ping", "127.0.0.1", "--port", str(ports["TWAMP"]), "--mode", "enc", "--dscp", "10")
        assert doc["mode"] == "enc" and doc["summary"]["loss"]["received"] == 3 and len(doc["records"]) == 3
        doc = cli("owping", "127.0.0.1", "--port", str(ports["OWAMP"]), "--mode", "auth")
        assert doc["forward"]["received"] == 3 and doc["reverse"]["received"] == 3
    finally:
        srv.terminate()
        srv.wait(10)
