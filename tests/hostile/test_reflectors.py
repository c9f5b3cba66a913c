"""Issue 11 row 10 / item 7: reflectors. 14-40-octet requests to the STAMP reflector got a
41-octet reply (amplification); packets with hundreds of tiny TLVs cost 35x the CPU; and
authenticated STAMP and TWAMP test packets replayed were reflected again.

Now: no reply is larger than its request except where the RFC fixes the reply format
(docs/protocol-interop.md, "Reply sizes"); TLVs past tlv.MAX_TLVS are reflected unparsed;
authenticated reflectors drop a sequence number seen before (sliding window)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import socket
import struct
import subprocess
import sys
import time

from tests.hostile import harness as h

SOURCE = "127.9.0.10"


def _ntp() -> int:
    return int((time.time() + 2208988800) * (1 << 32))


def _reflect(tmp, *extra: str) -> tuple[subprocess.Popen, int, "os.PathLike"]:
    port = h.free_port()
    log = tmp / f"reflect-{port}.log"
    err = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "agent", "-v", "reflect", "--listen", "127.0.0.1", "--port",
                          str(port), "--log-interval", "0.5", "--duration", "120", *extra],
                         cwd=h.ROOT, env=h.env(), stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    assert p.stdout is not None and "listening" in p.stdout.readline()
    return p, port, log


def _ask(sock: socket.socket, port: int, data: bytes, wait: float = 0.3) -> bytes | None:
    sock.sendto(data, ("127.0.0.1", port))
    sock.settimeout(wait)
    try:
        return sock.recv(65535)
    except socket.timeout:
        return None


def _final_counters(p: subprocess.Popen) -> dict[str, int]:
    p.terminate()
    out, _ = p.communicate(timeout=30)
    line = [ln for ln in out.splitlines() if ln.startswith("xwamp reflect: ") and "received" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line.split(": ", 1)[1])}


def _stamp_unauth(seq: int, extra: bytes = b"") -> bytes:
    """RFC 8762 §4.2.1: Seq(4) Timestamp(8) Error Estimate(2) SSID(2) MBZ(28)."""
    return struct.pack("!IQHH28x", seq, _ntp(), 0x0001, 7) + extra


def test_stamp_reflector_no_amplification_and_tlv_cap(tmp_path) -> None:
    p, port, log = _reflect(tmp_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SOURCE, 0))
    try:
        for n in range(14, 41):  # TWAMP-Light-sized but shorter than its 41-octet reply
            assert _ask(sock, port, struct.pack("!IQH", n, _ntp(), 1) + bytes(n - 14), 0.05) is None
        for n in (41, 43, 44, 60, 200):
            data = struct.pack("!IQH", n, _ntp(), 1) + bytes(n - 14) if n < 44 else _stamp_unauth(n, bytes(n - 44))
            reply = _ask(sock, port, data)
            assert reply is not None and len(reply) <= len(data), (n, reply and len(reply))
        tiny = b"".join(struct.pack("!BBH", 0, 200, 0) for _ in range(300))  # 300 empty unknown TLVs
        data = _stamp_unauth(1, tiny)
        reply = _ask(sock, port, data)
        assert reply is not None and len(reply) == len(data) and reply[44:] == tiny  # reflected, not parsed
        bad_hmac_tlv = _stamp_unauth(2, struct.pack("!BBH", 0, 8, 0))  # an empty HMAC TLV: no key, kept as is
        reply = _ask(sock, port, bad_hmac_tlv)
        assert reply is not None and len(reply) == len(bad_hmac_tlv)
        time.sleep(0.6)
        _ask(sock, port, _stamp_unauth(3), 0.2)  # the drop log is due again
        c = _final_counters(p)
        assert c["short"] == 27 and c["tlv_over_cap"] == 1, c
        assert re.search(r"dropped test packets .*'tlv_over_cap': 1", log.read_text()), log.read_text()
        assert p.returncode == 0
    finally:
        sock.close()
        if p.poll() is None:
            p.kill()


def test_stamp_authenticated_replay_dropped(tmp_path) -> None:
    key = os.urandom(32)
    kf = tmp_path / "stamp.key"
    kf.write_text(key.hex())
    kf.chmod(0o600)  # others may not read a key file
    p, port, _ = _reflect(tmp_path, "--auth-key-file", str(kf))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SOURCE, 0))

    def packet(seq: int) -> bytes:
        """RFC 8762 §4.2.2: Seq(4) MBZ(12) Timestamp(8) Error Estimate(2) SSID(2) MBZ(68)
        HMAC(16): HMAC-SHA-256 over the first 96 octets, truncated to 128 bits (§4.4)."""
        body = struct.pack("!I12xQHH68x", seq, _ntp(), 0x0001, 9)
        return body + hmac.new(key, body, hashlib.sha256).digest()[:16]

    try:
        first = packet(0)
        assert _ask(sock, port, first) is not None
        assert _ask(sock, port, first) is None  # the same packet again: a replay
        assert _ask(sock, port, packet(2)) is not None
        assert _ask(sock, port, packet(1)) is not None  # late but new: inside the window
        assert _ask(sock, port, packet(1)) is None
        assert _ask(sock, port, packet(200)) is not None
        assert _ask(sock, port, packet(3)) is None  # more than the window (64) behind
        c = _final_counters(p)
        assert c["replayed"] == 3 and c["reflected"] == 4, c
    finally:
        sock.close()
        if p.poll() is None:
            p.kill()


async def _twamp_auth_replay(srv: h.Served) -> tuple[int, int]:
    from agent.engine.packets import Proto, Security
    from agent.engine.sender import TestSender

    conn = await h.attacker_client(srv.twamp, twamp=True, source=SOURCE, mode="auth", keys=srv.keys)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SOURCE, 0))
    try:
        acc = await h.twamp_session(conn, sock, padding=64)
        assert acc.ok and await conn.start_sessions() == 0
        snd = TestSender(Proto.TWAMP, Security.AUTH, keys=acc.test_keys, padding=64)
        pkt = snd.build(0, time.time_ns())
        replies = 0
        for data in (pkt, pkt, pkt, snd.build(1, time.time_ns())):
            replies += await asyncio.to_thread(_ask, sock, acc.accept.port, data) is not None
        return replies, len(pkt)
    finally:
        sock.close()
        await conn.close()


def test_twamp_authenticated_replay_dropped(tmp_path) -> None:
    srv = h.start_server(tmp_path)
    try:
        replies, _ = asyncio.run(_twamp_auth_replay(srv))
        assert replies == 2  # seq 0 once, seq 1 once: the two copies of seq 0 were replays
        srv.wait_log(r"reflector session \w+ policed: .*replayed=2")
        assert srv.alive() and srv.rss_growth() < h.RSS_BOUND
        ok = srv.ping()
        assert ok["returncode"] == 0 and h.received(ok) >= 1, ok["stderr"]
    finally:
        srv.stop()


def test_replay_window_unit() -> None:
    from agent.engine.reflector import ReplayWindow

    w = ReplayWindow()
    assert w.fresh(0xFFFFFFFE) and w.fresh(0xFFFFFFFF) and w.fresh(0)  # wraps (serial arithmetic)
    assert not w.fresh(0xFFFFFFFF) and w.fresh(5) and w.fresh(3) and not w.fresh(3)
    assert w.fresh(5 + 64) and not w.fresh(5) and w.fresh(6)  # 5 fell out of the window; 6 is still in


def test_stamp_authenticated_state_is_bounded_and_forgeries_make_none() -> None:
    """Authenticated STAMP keeps a replay window and a counter per (sender, SSID): senders
    holding the key and cycling SSIDs keep at most max_peers of each (the oldest forgotten),
    and packets with a wrong HMAC are dropped before any state is made for them."""
    from agent.engine.packets import Proto, Security
    from agent.engine.reflector import ReflectorSession
    from netlink.secret import Secret

    key = bytes(range(32))
    r = ReflectorSession(Proto.STAMP, Security.AUTH, stamp_key=Secret(key), error_estimate=0x8001)
    r.max_peers = 8

    def packet(seq: int, ssid: int, k: bytes = key) -> bytes:  # RFC 8762 §4.2.2
        body = struct.pack("!I12xQHH68x", seq, 1, 0x0001, ssid)
        return body + hmac.new(k, body, hashlib.sha256).digest()[:16]

    now = time.time_ns()
    for i in range(100):
        assert r.reflect(packet(0, i), now, 64, lambda: now, None, ("192.0.2.1", 862)) is not None
    assert len(r._windows) == 8 and r.peers == 8
    for i in range(100):
        assert r.reflect(packet(0, 1000 + i, bytes(32)), now, 64, lambda: now, None, ("192.0.2.9", i)) is None
    assert r.counters.bad_hmac == 100 and len(r._windows) == 8 and r.peers == 8
    assert all(k[1] >= 92 for k in r._windows) and all(k[1] >= 92 for k in r._seqs)  # the newest kept
