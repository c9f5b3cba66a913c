"""Follow-Up Telemetry (RFC 8972 §4.7) and the late T3: TLV layout against scapy's generic STAMP TLV
and a peer written here with struct from the RFC figure (Sequence Number 4, Follow-Up Timestamp 8,
Timestamp Mode 1, Reserved 3; Length 16); the sender's correction; the TX-stamp bookkeeping; T3
patched last without breaking TWAMP authenticated mode (HMAC checked with raw `cryptography`);
and a real reflector endpoint on loopback answering with its kernel TX stamps."""

from __future__ import annotations

import asyncio
import struct

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.engine import tlv
from agent.engine.followup import ReplyTxStamps, T3Patch, parse_follow_up
from agent.engine.keys import TestKeys
from agent.engine.packets import Proto, Security
from agent.engine.reflector import ReflectorSession
from agent.engine.sender import TestSender
from agent.engine.timefmt import ntp_from_unix_ns, unix_ns_from_ntp
from agent.engine.txlag import TxLag
from agent.sessions.stamp import FollowUpCorrector, StampOptions, stamp_session
from netlink.secret import Secret

stamp = pytest.importorskip("scapy.contrib.stamp")
T0 = 1_700_000_000 * 10**9
NTP_EPOCH_OFFSET = 2_208_988_800


def _ntp(ns: int) -> int:
    """RFC 5905 NTP 64-bit from Unix ns, written here (seconds since 1900 . 2^-32 fraction)."""
    sec, frac = divmod(ns, 10**9)
    return ((sec + NTP_EPOCH_OFFSET) << 32) | (frac * (1 << 32) // 10**9)


def test_follow_up_value_layout_struct_peer_and_scapy() -> None:
    txs = ReplyTxStamps(TxLag())
    stream = (("192.0.2.9", 4000), 7)
    assert txs.follow_up(stream) == bytes(16)  # nothing stamped yet: all zero
    txs.sent(stream, 41, T0)
    txs.on_stamp(0, T0 + 12_345, "sw")
    v = txs.follow_up(stream)
    seq, ts, mode, r1, r2, r3 = struct.unpack("!IQBBBB", v)
    assert (seq, mode, r1, r2, r3) == (41, 2, 0, 0, 0)
    assert abs(ts - _ntp(T0 + 12_345)) <= 1
    # the reflector's TLV as scapy's generic STAMP TLV reads it
    sess = ReflectorSession(Proto.STAMP, stateful=False)
    sess.follow_up = lambda s, ptp: txs.follow_up(s, ptp)
    pkt = TestSender(Proto.STAMP, tlvs=[tlv.follow_up_request()], count=1, ssid=7).build(0, T0)
    out = sess.reflect(pkt, T0 + 1000, 64, lambda: T0 + 2000, None, ("192.0.2.9", 4000))
    p = stamp.STAMPSessionReflectorTestUnauthenticated(out)
    (t,) = p.tlv_objects
    assert (int(t.flags), t.type, t.len, t.value) == (0, 7, 16, v)
    # and the sender-side reading of it
    got = parse_follow_up(v)
    assert got is not None and got[0] == 41 and abs(got[1] - (T0 + 12_345)) <= 1 and got[2] == "sw"
    assert parse_follow_up(bytes(16)) is None and parse_follow_up(v[:15]) is None
    assert parse_follow_up(v[:12] + b"\x09" + bytes(3)) is None  # unknown mode: not a stamp
    # a reflector without TX stamps answers the TLV as unrecognized (U flag), as before
    plain = ReflectorSession(Proto.STAMP, stateful=False)
    q = stamp.STAMPSessionReflectorTestUnauthenticated(plain.reflect(pkt, T0 + 1, 64, lambda: T0 + 2))
    assert int(q.tlv_objects[0].flags) == 0x80


def test_sender_corrects_the_earlier_sample_from_a_struct_peer() -> None:
    """Replies built here with struct (RFC 8762 §4.3.1 reflector layout + the Follow-Up TLV)."""
    s = TestSender(Proto.STAMP, tlvs=[tlv.follow_up_request()], count=3)
    fix = FollowUpCorrector()
    sent = [s.build(n, T0 + n * 10**9) for n in range(3)]
    settled = []
    tx_real = {}
    for n, pkt in enumerate(sent):
        sseq, sts, serr = struct.unpack_from("!IQH", pkt)
        t2 = T0 + n * 10**9 + 50_000
        t3_written = t2 + 10_000
        tx_real[n] = t3_written + 30_000  # the reply really left 30 µs later
        fut = struct.pack("!IQB3x", n - 1, _ntp(tx_real[n - 1]), 2) if n else bytes(16)
        reply = struct.pack("!IQHHQIQH2xB3x", n, _ntp(t3_written), 0x0001, 0, _ntp(t2), sseq, sts, serr, 64)
        reply += struct.pack("!BBH", 0, 7, 16) + fut
        rec = s.on_reply(reply, t2 + 100_000, 64)
        settled += fix.on_record(rec)
    settled += fix.pending()
    assert [r.seq for r in settled] == [0, 1, 2]
    for r in settled[:2]:
        assert r.follow_up == "corrected" and r.t3_source == "sw"
        assert abs(r.t3_ns - tx_real[r.seq]) <= 1 and r.t3_user_ns < r.t3_ns
    last = settled[2]
    assert last.follow_up == "pending" and last.t3_ns is None and last.rtt_ns is None
    assert last.t3_user_ns is not None
    # a follow-up naming a time before that sample's T2 cannot be its reply: rejected, stays out
    s2 = TestSender(Proto.STAMP, tlvs=[tlv.follow_up_request()], count=2)
    fix2 = FollowUpCorrector()
    for n in range(2):
        sseq, sts, serr = struct.unpack_from("!IQH", s2.build(n, T0))
        fut = struct.pack("!IQB3x", 0, _ntp(T0 - 10**9), 2) if n else bytes(16)
        reply = struct.pack("!IQHHQIQH2xB3x", n, _ntp(T0 + 2), 1, 0, _ntp(T0 + 1), sseq, sts, serr, 64)
        fix2.on_record(s2.on_reply(reply + struct.pack("!BBH", 0, 7, 16) + fut, T0 + 3, 64))
    assert fix2.rejected == 1 and fix2.corrected == 0


def test_tx_stamp_bookkeeping_is_bounded_and_measures_lag() -> None:
    lag = TxLag()
    txs = ReplyTxStamps(lag)
    for i in range(5000):
        txs.sent(("p", 0), i, T0 + i)
    assert len(txs._pending) == 4096  # stamps that never come do not pile up
    txs.on_stamp(4999, T0 + 4999 + 7_000, "hw")
    assert txs.last(("p", 0)).mode == 1 and lag.recent_bound("reflector") == 7e-6
    txs.on_stamp(1, T0, "sw")  # evicted key: unmatched, no harm
    assert txs.unmatched == 1


def test_late_t3_keeps_twamp_auth_hmac_valid() -> None:
    """TWAMP authenticated: block 0 enciphered and MACed (16 octets), T3 at 16 in clear: patched
    after the HMAC, the reply still verifies (AES-ECB + HMAC-SHA1 computed here)."""
    aes, mac = bytes(range(16)), bytes(range(32, 64))
    keys = TestKeys(Secret(aes), Secret(mac))
    sess = ReflectorSession(Proto.TWAMP, Security.AUTH, keys=keys)
    pkt = TestSender(Proto.TWAMP, Security.AUTH, keys=keys, count=1).build(0, T0)
    out = bytearray(sess.reflect(pkt, T0 + 100, 64, int))
    p = T3Patch.for_session(Proto.TWAMP, Security.AUTH, False)
    assert p.offset == 16
    p.patch(out, T0 + 500)
    assert unix_ns_from_ntp(struct.unpack_from("!Q", out, 16)[0]) == pytest.approx(T0 + 500, abs=1)
    block0 = Cipher(algorithms.AES(aes), modes.ECB()).decryptor().update(bytes(out[:16]))
    h = hmac.HMAC(mac, hashes.SHA1())
    h.update(block0)
    assert bytes(out[96:112]) == h.finalize()[:16]
    # STAMP authenticated covers T3 with its HMAC: never patched; encrypted: T3 under the cipher
    assert T3Patch.for_session(Proto.STAMP, Security.AUTH, False).offset is None
    assert T3Patch.for_session(Proto.TWAMP, Security.ENCRYPTED, False).read_at is None
    assert abs(ntp_from_unix_ns(T0) - _ntp(T0)) <= 1


@pytest.mark.parametrize("late", [True, False])
def test_real_reflector_answers_with_its_kernel_tx_stamps(late: bool) -> None:
    from agent.engine.txlag import TX_LAG
    from agent.engine.udp import TwampReflectorEndpoint

    async def main():
        TX_LAG.reset()
        ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=ReflectorSession(Proto.STAMP), hardware=False,
                                    late_t3=late)
        await ep.start()
        try:
            res = await stamp_session(StampOptions("127.0.0.1", ep.port, count=5, interval=0.02, wait=0.5,
                                                   follow_up=True))
        finally:
            ep.close()
        return res, ep

    res, ep = asyncio.run(main())
    if ep.ts_config is None:
        pytest.skip("no kernel timestamps on this host")
    corrected = [r for r in res.records if r.follow_up == "corrected"]
    assert len(corrected) >= 3 and all(r.t3_source == "sw" for r in corrected)
    for r in corrected:
        assert r.t2_ns < r.t3_user_ns <= r.t3_ns  # the written T3, then the real send
    assert res.records[-1].follow_up == "pending"
    assert ep.tx is not None and ep.tx.stamped == 5

    snap = TX_LAG.snapshot()
    assert sum(snap["reflector"][1]) == 5 and sum(snap["sender"][1]) == 5
    TX_LAG.reset()


def test_reflector_echoing_the_tlv_unfilled_falls_back_to_t3_as_written() -> None:
    """A reflector that copies the Follow-Up TLV back without filling it (all zero, no U flag):
    after three such answers the samples take T3 as written ("unsupported"), none stays pending."""
    s = TestSender(Proto.STAMP, tlvs=[tlv.follow_up_request()], count=6)
    fix = FollowUpCorrector()
    settled = []
    for n in range(6):
        sseq, sts, serr = struct.unpack_from("!IQH", s.build(n, T0))
        reply = struct.pack("!IQHHQIQH2xB3x", n, _ntp(T0 + 2000), 1, 0, _ntp(T0 + 1000), sseq, sts, serr, 64)
        settled += fix.on_record(s.on_reply(reply + struct.pack("!BBH", 0, 7, 16) + bytes(16), T0 + 3000, 64))
    settled += fix.pending()
    assert sorted(r.seq for r in settled) == list(range(6))
    assert all(r.follow_up == "unsupported" and r.t3_ns is not None and r.rtt_ns is not None for r in settled)


def test_reflector_tx_drain_fast_path_agrees_with_the_general_decoder() -> None:
    """The endpoint decodes its replies' software TX stamps inline (one recvmsg per reply);
    every message, ordinary or odd, must come out as timestamping.decode_tx_message says."""
    import errno
    import socket

    from agent.engine import timestamping as ts
    from agent.engine.clock import StampCounters
    from agent.engine.udp import TwampReflectorEndpoint

    def scm(s0: int, n0: int, s2: int = 0, n2: int = 0) -> tuple[int, int, bytes]:
        return (socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, struct.pack("=6q", s0, n0, 0, 0, s2, n2))

    def ee(key: int, err: int = errno.ENOMSG, origin: int = ts.SO_EE_ORIGIN_TIMESTAMPING, info: int = 0,
           level: int = ts.SOL_IP, ctype: int = ts.IP_RECVERR) -> tuple[int, int, bytes]:
        return (level, ctype, struct.pack("=IBBBBII", err, origin, 0, 0, 0, info, key))

    msgs = [
        [scm(1_700_000_000, 5), ee(0)],  # the ordinary message
        [ee(1), scm(1_700_000_001, 999_999_999)],  # other order
        [scm(1_700_000_002, 7), ee(2, level=ts.SOL_IPV6, ctype=ts.IPV6_RECVERR)],
        [scm(0, 0, 1_700_000_003, 1), ee(3)],  # hardware slot only: no PHC here
        [scm(1_700_000_004, 10**9), ee(4)],  # bad nsec
        [scm(-1, 5), ee(5)],
        [scm(1_700_000_006, 1), ee(6, err=errno.EHOSTUNREACH, origin=2)],  # an ICMP error, not a stamp
        [scm(1_700_000_007, 1), ee(7, info=1)],  # SCM_TSTAMP_SCHED
        [scm(1_700_000_008, 1)],  # no key
        [ee(9)],  # no stamp
        [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, b"\x01" * 20), ee(10)],  # truncated cmsg
        [scm(1_700_000_011, 3), ee(11), (socket.SOL_IP, 2, struct.pack("=i", 64))],  # an extra cmsg
        [],
    ]

    class Sock:
        def __init__(self) -> None:
            self.q = list(msgs)

        def recvmsg(self, _n: int, _anc: int, flags: int) -> tuple:
            assert flags & socket.MSG_ERRQUEUE
            if not self.q:
                raise BlockingIOError
            return b"", self.q.pop(0), 0, None

    class Tx:
        def __init__(self) -> None:
            self.got: list[tuple[int, int, str]] = []

        def on_stamp(self, key: int, ns: int, source: str) -> None:
            self.got.append((key, ns, source))

    cfg = ts.TimestampingConfig(False, False, True, True, None, 0)
    want = []
    for m in msgs:
        r = ts.decode_tx_message(m, config=cfg, counters=StampCounters())
        if r is not None:
            want.append((r[0], r[1].ns, r[1].source.value))
    assert [k for k, _, _ in want] == [0, 1, 2, 11]

    ep = TwampReflectorEndpoint(("127.0.0.1", 0))
    ep.sock, ep.ts_config, ep.tx = Sock(), cfg, Tx()  # type: ignore[assignment]
    ep._drain_tx()
    assert ep.tx.got == want  # type: ignore[union-attr]
    ep.sock = None


@pytest.mark.parametrize("sample_ns", [0, 10**12])
def test_reflector_stamps_follow_up_askers_always_and_others_by_sample(sample_ns: int) -> None:
    """Per-reply TX stamp requests: with a sample interval longer than the test, a TWAMP-Light
    sender's replies get one stamp (the first) while a STAMP sender asking Follow-Up gets every
    reply stamped and answered; interval 0 stamps every reply (socket-wide). The kernel's OPT_ID
    keys must keep matching the replies they belong to: each follow-up names the previous reply."""
    import socket

    from agent.engine.txlag import TX_LAG
    from agent.engine.udp import TwampReflectorEndpoint

    n = 6

    async def main():
        TX_LAG.reset()
        ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=ReflectorSession(Proto.STAMP), hardware=False,
                                    tx_sample_ns=sample_ns)
        await ep.start()
        loop = asyncio.get_running_loop()
        light = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        light.setblocking(False)
        light.connect(("127.0.0.1", ep.port))
        try:
            for i in range(n):  # TWAMP-Light: 41 octets, Error Estimate multiplier 1, no TLVs
                await loop.sock_sendall(light, struct.pack("!IQH", i, 1, 1) + bytes(27))
                await loop.sock_recv(light, 2048)
            light_stamped = ep.tx.stamped if ep.tx else None
            res = await stamp_session(StampOptions("127.0.0.1", ep.port, count=n, interval=0.01, wait=0.5,
                                                   follow_up=True))
        finally:
            light.close()
            ep.close()
        return res, ep, light_stamped

    res, ep, light_stamped = asyncio.run(main())
    if ep.ts_config is None:
        pytest.skip("no kernel timestamps on this host")
    assert ep.tx is not None
    await_stamps = ep.tx.stamped  # the last reply's stamp may still be on the error queue
    if sample_ns:
        assert ep._tx_anc is not None  # per-reply requests on this kernel
        assert light_stamped == 1
        assert await_stamps in (n, n + 1)
    else:
        assert ep._tx_anc is None and light_stamped == n
    corrected = [r for r in res.records if r.follow_up == "corrected"]
    assert len(corrected) >= n - 2 and ep.tx.unmatched == 0  # as above: a loaded host may delay one
    for r in corrected:
        assert r.t2_ns < r.t3_user_ns <= r.t3_ns
    TX_LAG.reset()


def test_reflector_falls_back_to_socket_wide_tx_stamps_when_the_kernel_refuses_per_packet_requests() -> None:
    """A kernel that refuses SO_TIMESTAMPING as a sendmsg control message (EINVAL): the socket
    asks for TX stamps itself, every reply is stamped from then on, and this reply still goes."""
    import errno
    import socket

    from agent.engine import timestamping as ts
    from agent.engine.udp import TwampReflectorEndpoint

    class Sock:
        family = socket.AF_INET

        def __init__(self) -> None:
            self.opts: list[int] = []
            self.sent: list[tuple] = []

        def sendmsg(self, bufs: list, anc: list, flags: int, addr: tuple) -> int:
            if any(level == socket.SOL_SOCKET and t == ts.SO_TIMESTAMPING for level, t, _ in anc):
                raise OSError(errno.EINVAL, "Invalid argument")
            self.sent.append(("sendmsg", bytes(bufs[0]), anc))
            return len(bufs[0])

        def sendto(self, data: bytes, addr: tuple) -> int:
            self.sent.append(("sendto", bytes(data)))
            return len(data)

        def setsockopt(self, level: int, opt: int, value: int) -> None:
            assert (level, opt) == (socket.SOL_SOCKET, ts.SO_TIMESTAMPING)
            self.opts.append(value)

    flags = ts.SOF_TIMESTAMPING_TX_SOFTWARE | ts.SOF_TIMESTAMPING_SOFTWARE | ts.SOF_TIMESTAMPING_OPT_ID
    ep = TwampReflectorEndpoint(("127.0.0.1", 0))
    ep.ts_config = ts.TimestampingConfig(False, False, True, True, None, flags)
    sock = Sock()
    ep._configure_tx(sock)  # type: ignore[arg-type]
    assert ep._tx_anc is not None and sock.opts == [flags & ~ts.SOF_TIMESTAMPING_TX_SOFTWARE]
    ep._send_stamped(sock, b"reply", ("192.0.2.1", 862), None)  # type: ignore[arg-type]
    assert ep._tx_anc is None and sock.opts[-1] == flags and sock.sent == [("sendto", b"reply")]
    ep._send_stamped(sock, b"again", ("192.0.2.1", 862), 46)  # type: ignore[arg-type]
    assert sock.sent[-1] == ("sendmsg", b"again", [(socket.SOL_IP, 1, bytes((46 << 2,)))])
