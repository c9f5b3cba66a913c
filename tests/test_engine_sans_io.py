"""Sans-IO reflector, sender and OWAMP receiver: interop traps and counters."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine import tlv
from agent.engine.keys import TestKeys
from agent.engine.packets import Proto, Security, decode_reflector
from agent.engine.receiver import OwampReceiver, decode_fetch_records
from agent.engine.reflector import ReflectorSession
from agent.engine.sender import Schedule, TestSender
from agent.engine.timefmt import ntp_from_unix_ns, unix_ns_from_ntp
from netlink.secret import Secret

KEYS = TestKeys(Secret(bytes(range(16))), Secret(bytes(range(32))))
SKEY = Secret(b"k" * 32)
T0 = 1_780_000_000_000_000_000


def clock(start: int = T0 + 5_000, step: int = 1_000):
    c = itertools.count(start, step)
    return lambda: next(c)


def test_twamp_unauth_reflector_fields_and_sizes() -> None:
    r = ReflectorSession(error_estimate=0x8105)
    s = struct.pack("!IQH", 9, ntp_from_unix_ns(T0), 0x0A01)
    for sender_len, want in ((14, 41), (41, 41), (100, 100)):
        pad = bytes(range(sender_len - 14))
        out = r.reflect(s + pad, T0 + 1_000, 57, clock())
        assert out is not None and len(out) == want
        p = decode_reflector(out, Proto.TWAMP, Security.UNAUTH)
        assert p.sender_seq == 9 and p.sender_ttl == 57
        assert p.sender_timestamp == ntp_from_unix_ns(T0) and p.sender_error_estimate == 0x0A01
        assert p.error_estimate == 0x8105
        assert unix_ns_from_ntp(p.receive_timestamp) == pytest.approx(T0 + 1_000, abs=1)
        assert unix_ns_from_ntp(p.timestamp) == pytest.approx(T0 + 5_000, abs=1)  # T3 from now_ns, not T2
        if sender_len == 100:
            assert p.extra == pad[: 100 - 41]  # highest-numbered 27 octets discarded
    assert r.seq == 3  # own counter, independent of the sender's


def test_reflector_ttl_unknown_is_255_and_short_counted() -> None:
    r = ReflectorSession(error_estimate=1)
    assert r.reflect(b"\x00" * 13, T0, 64, clock()) is None
    out = r.reflect(b"\x00" * 13 + b"\x01", T0, None, clock())  # Error Estimate Multiplier 1
    assert out is not None and out[40] == 255
    assert r.counters.short == 1 and r.counters.reflected == 1


@pytest.mark.parametrize("sec", [Security.AUTH, Security.ENCRYPTED])
def test_auth_exchange_sizes_and_tamper(sec: Security) -> None:
    snd = TestSender(Proto.TWAMP, sec, keys=KEYS, count=3, error_estimate=0x8001)
    ref = ReflectorSession(Proto.TWAMP, sec, keys=KEYS, error_estimate=0x8002)
    d = snd.build(0, T0)
    assert len(d) == 112  # RFC 6038 symmetrical: 48 + 64 MBZ
    out = ref.reflect(d, T0 + 10_000, 60, clock(T0 + 20_000))
    assert out is not None and len(out) == 112
    rec = snd.on_reply(out, T0 + 40_000, 61)
    assert rec is not None and rec.rtt_ns == pytest.approx(30_000, abs=2)
    bad = bytearray(snd.build(1, T0 + 1))
    bad[1] ^= 0xFF  # inside the encrypted/HMAC-covered first block
    assert ref.reflect(bytes(bad), T0, 60, clock()) is None
    assert ref.counters.bad_hmac == 1
    out2 = bytearray(ref.reflect(snd.build(2, T0 + 2), T0 + 3, 60, clock()) or b"")
    out2[3] ^= 1
    assert snd.on_reply(bytes(out2), T0 + 9, 60) is None and snd.counters.bad_hmac == 1


def test_auth_reflector_answers_at_sender_size_minus_64() -> None:
    snd = TestSender(Proto.TWAMP, Security.AUTH, keys=KEYS, padding=152, error_estimate=1)
    ref = ReflectorSession(Proto.TWAMP, Security.AUTH, keys=KEYS, error_estimate=1)
    d = snd.build(0, T0)
    assert len(d) == 200
    out = ref.reflect(d, T0, 1, clock())
    assert out is not None and len(out) == 200 and out[112:] == d[48:136]


def test_stamp_stateful_vs_stateless() -> None:
    stateful = ReflectorSession(Proto.STAMP, error_estimate=1)
    stateless = ReflectorSession(Proto.STAMP, stateful=False, error_estimate=1)
    snd = TestSender(Proto.STAMP, ssid=5, error_estimate=1)
    for n in (100, 101):
        d = snd.build(n, T0)
        a = decode_reflector(stateful.reflect(d, T0, 64, clock(), peer="p1") or b"", Proto.STAMP, Security.UNAUTH)
        b = decode_reflector(stateless.reflect(d, T0, 64, clock(), peer="p1") or b"", Proto.STAMP, Security.UNAUTH)
        assert a.seq == n - 100 and b.seq == n and a.ssid == 5
    # another SSID from the same peer gets its own counter
    other = TestSender(Proto.STAMP, ssid=6, error_estimate=1)
    a = decode_reflector(stateful.reflect(other.build(0, T0), T0, 64, clock(), peer="p1") or b"", Proto.STAMP, Security.UNAUTH)
    assert a.seq == 0 and stateful.peers == 2


def test_stamp_tlvs_reflected() -> None:
    snd = TestSender(
        Proto.STAMP,
        error_estimate=0x8001,
        tlvs=[tlv.extra_padding(8), tlv.timestamp_info(), tlv.class_of_service(46), tlv.Tlv(0, 200, b"xyz!"),
              tlv.direct_measurement(7)],
    )
    ref = ReflectorSession(Proto.STAMP, error_estimate=0x8001)
    d = snd.build(0, T0)
    out = ref.reflect(d, T0, 64, clock(), tos=(10 << 2) | 1, rx_source="hw")
    assert out is not None and len(out) == len(d)
    got = tlv.parse_tlvs(out[44:])
    assert [t.type for t in got] == [1, 3, 4, 200, 5]
    assert got[4].value == (7).to_bytes(4, "big") + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
    assert got[0].value == bytes(8)
    assert got[1].value == bytes((tlv.SYNC_NTP, tlv.METHOD_HW, tlv.SYNC_NTP, tlv.METHOD_SW))
    assert tlv.parse_class_of_service(got[2].value) == (46, 10, 1, 0)
    assert got[3].flags & tlv.FLAG_U and got[3].value == b"xyz!"
    assert ref.reply_dscp == 46


def test_stamp_hmac_tlv_and_auth() -> None:
    snd = TestSender(Proto.STAMP, Security.AUTH, stamp_key=SKEY, error_estimate=1, tlvs=[tlv.class_of_service(8)])
    ref = ReflectorSession(Proto.STAMP, Security.AUTH, stamp_key=SKEY, error_estimate=1)
    d = bytearray(snd.build(0, T0))
    out = ref.reflect(bytes(d), T0, 64, clock())
    assert out is not None
    rec = snd.on_reply(out, T0 + 50_000, 64)
    assert rec is not None and tlv.parse_tlvs(rec.reply_tlvs)[-1].flags == 0
    assert ref.reflect(bytes(d), T0, 64, clock()) is None and ref.counters.replayed == 1  # same seq again
    d = bytearray(snd.build(1, T0))
    d[113] ^= 1  # inside a TLV after the base HMAC: base OK, HMAC TLV fails -> I flag
    out = ref.reflect(bytes(d), T0, 64, clock())
    assert out is not None and tlv.parse_tlvs(out[112:])[-1].flags & tlv.FLAG_I
    assert ref.counters.tlv_hmac_failed == 1
    d[5] ^= 1  # base packet tampered: dropped
    assert ref.reflect(bytes(d), T0, 64, clock()) is None and ref.counters.bad_hmac == 1


def test_stamp_listener_answers_twamp_light_and_zero_padding() -> None:
    ref = ReflectorSession(Proto.STAMP, error_estimate=1)
    light = TestSender(Proto.TWAMP, error_estimate=1, padding=27)  # RFC 5357 §4.1.2: padded to the reply's size
    out = ref.reflect(light.build(0, T0), T0, 64, clock())
    assert out is not None and len(out) == 41
    short = TestSender(Proto.TWAMP, error_estimate=1, padding=0).build(1, T0)
    assert ref.reflect(short, T0, 64, clock()) is None and ref.counters.short == 1  # no amplification
    zero_padded = TestSender(Proto.STAMP, error_estimate=1).build(0, T0) + bytes(20)
    out = ref.reflect(zero_padded, T0, 64, clock())
    assert out is not None and out[44:] == bytes(20)
    junk = TestSender(Proto.STAMP, error_estimate=1).build(0, T0) + b"\x01\x02\xff\xff\x05"
    out = ref.reflect(junk, T0, 64, clock())
    assert out is not None and out[44:] == b"\x01\x02\xff\xff\x05" and ref.counters.malformed_tlv == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=160), st.sampled_from(["twamp", "stamp", "auth", "enc", "sauth"]))
def test_fuzz_reflect_never_raises(data: bytes, kind: str) -> None:
    sess = {
        "twamp": lambda: ReflectorSession(error_estimate=1),
        "stamp": lambda: ReflectorSession(Proto.STAMP, error_estimate=1),
        "auth": lambda: ReflectorSession(Proto.TWAMP, Security.AUTH, keys=KEYS, error_estimate=1),
        "enc": lambda: ReflectorSession(Proto.TWAMP, Security.ENCRYPTED, keys=KEYS, error_estimate=1),
        "sauth": lambda: ReflectorSession(Proto.STAMP, Security.AUTH, stamp_key=SKEY, error_estimate=1),
    }[kind]()
    sess.reflect(data, T0, 64, clock())
    snd = TestSender(Proto.STAMP if kind in ("stamp", "sauth") else Proto.TWAMP, error_estimate=1)
    snd.build(0, T0)
    snd.on_reply(data, T0, 64)


def test_sender_duplicates_and_unknown() -> None:
    snd = TestSender(error_estimate=1)
    ref = ReflectorSession(error_estimate=1)
    d = snd.build(0, T0)
    out = ref.reflect(d, T0 + 1, 64, clock())
    assert out is not None
    snd.on_reply(out, T0 + 10, 64)
    snd.on_reply(out, T0 + 11, 64)
    stray = ReflectorSession(error_estimate=1).reflect(TestSender(error_estimate=1).build(5, T0), T0, 64, clock())
    assert snd.on_reply(stray or b"", T0, 64) is None
    assert snd.counters.duplicates == 1 and snd.counters.unknown_seq == 1
    assert snd.records()[0].duplicates == [(0, T0 + 11)]


def test_schedule_absolute_no_drift() -> None:
    f = Schedule.fixed(0.01)
    assert f.offset_ns(1000) == 10_000_000_000
    p = Schedule.poisson(0.01, seed=1)
    offs = [p.offset_ns(n) for n in range(2000)]
    assert offs == sorted(offs) and offs[0] == 0
    assert offs[-1] / 1999 == pytest.approx(10_000_000, rel=0.1)
    assert Schedule.poisson(0.01, seed=1).offset_ns(1999) == offs[-1]  # reproducible


def test_fetch_record_layout() -> None:
    from agent.engine.receiver import FETCH_RECORD

    raw = FETCH_RECORD.pack(7, 0x8001, 0x8002, 0x1111111122222222, 0x3333333344444444, 61)
    assert raw.hex() == "00000007" "8001" "8002" "1111111122222222" "3333333344444444" "3d"


@pytest.mark.parametrize("sec", [Security.UNAUTH, Security.AUTH, Security.ENCRYPTED])
def test_owamp_receiver_and_fetch(sec: Security) -> None:
    keys = KEYS if sec is not Security.UNAUTH else None
    snd = TestSender(Proto.OWAMP, sec, keys=keys, error_estimate=0x8001)
    rcv = OwampReceiver(sec, keys=keys, error_estimate=0x8002, expected=4)
    for n in (0, 2, 2):
        rcv.on_packet(snd.build(n, T0 + n), T0 + 1000 + n, 60)
    bad = bytearray(snd.build(3, T0))
    bad[0] ^= 1
    rcv.on_packet(bytes(bad), T0, 60)
    recs = decode_fetch_records(rcv.fetch_records(next_seqno=4))
    seqs = [r[0] for r in recs]
    assert seqs == [0, 2, 1, 3]  # one record per sequence number: the duplicate is counted only
    # Seq, Send-ErrEst, Recv-ErrEst, Send-Timestamp, Recv-Timestamp, TTL
    assert recs[0][1] == 0x8001 and recs[0][2] == 0x8002 and recs[0][5] == 60
    assert unix_ns_from_ntp(recs[0][3]) == pytest.approx(T0, abs=1)
    assert unix_ns_from_ntp(recs[0][4]) == pytest.approx(T0 + 1000, abs=1)
    assert recs[2][4] == 0 and recs[2][1] & 0xFF  # lost: receive timestamp 0, multiplier non-zero
    assert rcv.counters.duplicates == 1
    if sec is Security.UNAUTH:
        assert rcv.counters.short == 0  # flipped seq just shifts the seq
    else:
        assert rcv.counters.bad_hmac == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_fetch_records(data: bytes) -> None:
    from agent.engine.packets import PacketError

    try:
        recs = decode_fetch_records(data)
    except PacketError:
        return
    assert len(recs) * 25 == len(data)


def test_owamp_receiver_validity_tests() -> None:
    sched = Schedule.from_slots(bytes(16), [(1, 1 << 32)])  # literal 1 s: packet n at start + (n+1) s
    rcv = OwampReceiver(error_estimate=1, timeout_s=2.0, schedule=sched, start_ns=T0)
    snd = TestSender(Proto.OWAMP, error_estimate=1)
    assert rcv.on_packet(snd.build(0, T0 + 1_000_000_000), T0 + 1_000_100_000, 64) is not None
    assert rcv.on_packet(snd.build(1, T0 + 9_000_000_000), T0 + 9_000_100_000, 64) is None  # 7 s off schedule
    assert rcv.on_packet(snd.build(2, T0 + 3_000_000_000), T0 + 6_000_000_000, 64) is None  # 3 s in flight
    assert rcv.counters.invalid_time == 2


def test_ptp_reflector_with_ntp_sender() -> None:
    """RFC 8186: each side's Z bit tells the format of its own timestamps."""
    snd = TestSender(error_estimate=0x8001)  # NTP
    ref = ReflectorSession(ptp=True, error_estimate=0xC001)  # PTP, Z=1
    out = ref.reflect(snd.build(0, T0), T0 + 10_000, 64, clock(T0 + 20_000))
    rec = snd.on_reply(out or b"", T0 + 40_000, 64)
    assert rec is not None and rec.t2_ns == T0 + 10_000 and rec.t3_ns == T0 + 20_000
    assert rec.rtt_ns == 30_000


def test_stateful_peer_table_is_bounded() -> None:
    ref = ReflectorSession(Proto.STAMP, error_estimate=1)
    ref.max_peers = 3
    snd = TestSender(Proto.STAMP, error_estimate=1)
    d = snd.build(0, T0)
    for p in range(5):
        ref.reflect(d, T0, 64, clock(), None, ("192.0.2.1", 1000 + p))
    assert ref.peers == 3


def test_stateful_stamp_counters_per_sender_and_ssid() -> None:
    """RFC 8762 §4.3.1 stateful reflector: its own Sequence Number per (sender, SSID),
    whether the sender's address object is reused (the fast path's cached cell) or new
    each time; forget_peer restarts a sender even while its cell is cached."""
    ref = ReflectorSession(Proto.STAMP, error_estimate=1)

    def pkt(ssid: int) -> bytes:  # RFC 8762 §4.2.1 unauthenticated: SSID at octets 16-17
        return struct.pack("!IQHH", 7, ntp_from_unix_ns(T0), 1, ssid) + bytes(28)

    def seq(peer, ssid: int) -> int:
        out = ref.reflect(pkt(ssid), T0, 64, clock(), None, peer)
        assert out is not None
        return struct.unpack_from("!I", out)[0]

    a, b = ("192.0.2.1", 1000), ("192.0.2.2", 1000)
    got = [seq(a, 1), seq(a, 1), seq(b, 1), seq(a, 2), seq(a, 1), seq(("192.0.2.1", 1000), 1), seq(b, 1)]
    assert got == [0, 1, 0, 0, 2, 3, 1]
    ref.forget_peer(a)
    assert seq(a, 1) == 0 and seq(a, 1) == 1 and seq(b, 1) == 2
    assert ref.peers == 2  # (a, 1) and (b, 1)
    ref.forget_peer(b)  # while b's cell is the cached one
    assert seq(b, 1) == 0 and ref.peers == 2 and seq(a, 1) == 2 and seq(b, 1) == 1
    ref.max_peers = 2  # (c, 1) evicts the oldest, (a, 1), which then restarts
    c = ("192.0.2.3", 1000)
    assert seq(a, 1) == 3 and seq(c, 1) == 0 and ref.peers == 2
    assert seq(b, 1) == 2 and seq(a, 1) == 0
