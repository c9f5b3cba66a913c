"""Wire layouts of the O/TWAMP-Control messages, built octet by octet in the tests, plus
hypothesis fuzzing of every decoder (only ProtocolError may escape)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control import messages as m
from agent.engine.timefmt import ErrorEstimate

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def test_server_greeting_layout() -> None:
    g = m.ServerGreeting(modes=0x0F, challenge=b"C" * 16, salt=b"S" * 16, count=1024)
    b = g.pack()
    assert len(b) == 64
    assert b[:12] == bytes(12)
    assert b[12:16] == b"\x00\x00\x00\x0f"
    assert b[16:32] == b"C" * 16 and b[32:48] == b"S" * 16
    assert b[48:52] == (1024).to_bytes(4, "big")
    assert b[52:] == bytes(12)
    assert m.ServerGreeting.unpack(b) == g


def test_greeting_ipsec_hint_in_unused() -> None:
    g = m.ServerGreeting(2, bytes(16), bytes(16), 1024).with_ipsec_hint(0xC0FFEE01, 50)
    b = g.pack()
    assert b[:5] == bytes.fromhex("c0ffee01") + b"\x32" and b[5:12] == bytes(7)
    assert m.ServerGreeting.unpack(b).ipsec_hint == (0xC0FFEE01, 50)
    assert m.ServerGreeting(2, bytes(16), bytes(16), 1024).ipsec_hint is None


def test_setup_response_layout_and_repr_hides_token() -> None:
    s = m.SetUpResponse(2, "alice", b"T" * 64, b"I" * 16)
    b = s.pack()
    assert len(b) == 164
    assert b[:4] == b"\x00\x00\x00\x02"
    assert b[4:84] == b"alice" + bytes(75)
    assert b[84:148] == b"T" * 64 and b[148:] == b"I" * 16
    assert m.SetUpResponse.unpack(b) == s
    assert "TTTT" not in repr(s)
    # RFC 7717 §5.3: a binary KeyID (SPIi | SPIr | zeros) is no protocol error; its raw
    # octets reach the key source whole, trailing zero octets of an SPI included
    kid = bytes.fromhex("ff00000000000000" "0102030405060700") + bytes(64)
    got = m.SetUpResponse.unpack(b[:4] + kid + b[84:])
    assert got.key_id_raw == kid and got.token == b"T" * 64
    assert m.SetUpResponse(2, "", b"T" * 64, b"I" * 16, kid).pack()[4:84] == kid


def test_server_start_layout() -> None:
    s = m.ServerStart(0, b"V" * 16, 0x0102030405060708)
    b = s.pack()
    assert b[:15] == bytes(15) and b[15] == 0 and b[16:32] == b"V" * 16
    assert b[32:40] == bytes.fromhex("0102030405060708") and b[40:] == bytes(8)
    # RFC 4656 §3.3: a receiver "MUST interpret all values of Accept other than these
    # reserved values as 1" (issue 13: this used to raise)
    assert m.ServerStart.unpack(b[:15] + b"\x09" + b[16:]).accept == m.ACCEPT_FAILURE


def test_request_tw_session_layout() -> None:
    r = m.RequestTWSession(V4("192.0.2.1"), V4("192.0.2.2"), 5000, 6000, padding_length=0x01020304,
                           start_time=0x1111111122222222, timeout=0x3333333344444444, type_p=m.typep_from_dscp(46))
    b = r.pack()
    assert len(b) == 112
    assert b[0] == 5 and b[1] == 4 and b[2:4] == b"\0\0"
    assert b[4:12] == bytes(8)  # slots, packets
    assert b[12:14] == (5000).to_bytes(2, "big") and b[14:16] == (6000).to_bytes(2, "big")
    assert b[16:20] == bytes([192, 0, 2, 1]) and b[20:32] == bytes(12)
    assert b[32:36] == bytes([192, 0, 2, 2]) and b[36:48] == bytes(12)
    assert b[48:64] == bytes(16)
    assert b[64:68] == bytes([1, 2, 3, 4])  # Padding Length big-endian
    assert b[68:76] == bytes.fromhex("1111111122222222") and b[76:84] == bytes.fromhex("3333333344444444")
    assert b[84:88] == bytes([46, 0, 0, 0])  # first two bits 00, then the 6-bit DSCP (RFC 4656 §3.5)
    assert b[88:] == bytes(24)
    assert m.RequestTWSession.unpack(b) == r
    assert r.dscp == 46


def test_request_tw_session_ipv6_and_unspecified() -> None:
    r = m.RequestTWSession(V6("::"), V6("2001:db8::2"), 1, 2)
    b = r.pack()
    assert b[1] == 6 and b[16:32] == bytes(16) and b[32:48] == V6("2001:db8::2").packed
    back = m.RequestTWSession.unpack(b)
    assert back.resolved_addresses(V6("2001:db8::1"), V6("2001:db8::9")) == (V6("2001:db8::1"), V6("2001:db8::2"))


def test_request_tw_session_tolerates_old_double_ipvn() -> None:
    b = bytearray(m.RequestTWSession(V4("1.1.1.1"), V4("2.2.2.2")).pack())
    b[1] = 0x44  # old owamp wrote IPVN in both nibbles
    assert m.RequestTWSession.unpack(bytes(b)).ipvn == 4
    b[1] = 0x05
    with pytest.raises(m.ProtocolError):
        m.RequestTWSession.unpack(bytes(b))


def test_request_session_owamp_slots() -> None:
    slots = (m.Slot(0, 0x0000000080000000), m.Slot(1, 0x0000000100000000))
    r = m.RequestSession(V4("10.0.0.1"), V4("10.0.0.2"), 0, 0, conf_receiver=True, num_packets=100, slots=slots)
    b = r.pack()
    assert len(b) == 112 + 32 + 16
    assert b[0] == 1 and b[2] == 0 and b[3] == 1
    assert struct.unpack_from("!II", b, 4) == (2, 100)
    assert b[112] == 0 and b[113:120] == bytes(7) and b[120:128] == bytes.fromhex("0000000080000000")
    assert b[128] == 1 and b[136:144] == bytes.fromhex("0000000100000000")
    assert r.hmac_offsets() == (96, 144)
    assert m.RequestSession.length_from_first_block(b[:16]) == len(b)
    assert m.RequestSession.unpack(b) == r


def test_accept_session_layout() -> None:
    a = m.AcceptSession(0, 0x1234, b"s" * 16)
    b = a.pack()
    assert b[0] == 0 and b[1] == 0 and b[2:4] == b"\x12\x34" and b[4:20] == b"s" * 16 and b[20:] == bytes(28)
    assert m.AcceptSession.unpack(b) == a
    # an unassigned Accept reads as 1 (RFC 4656 §3.3; issue 13: this used to raise)
    assert m.AcceptSession.unpack(b"\x07" + b[1:]).accept == m.ACCEPT_FAILURE


def test_start_stop_layouts() -> None:
    assert m.StartSessions().pack() == b"\x02" + bytes(31)
    assert m.StartAck(5).pack() == b"\x05" + bytes(31)
    tw = m.StopSessions(0, 3).pack()
    assert tw == b"\x03\x00\x00\x00\x00\x00\x00\x03" + bytes(24)
    assert m.StopSessions.unpack(tw) == m.StopSessions(0, 3)


def test_owamp_stop_sessions_with_skip_ranges() -> None:
    d1 = m.SessionDescription(b"a" * 16, 10, ((2, 3),))  # 24 + 8 = 32
    d2 = m.SessionDescription(b"b" * 16, 7, ((1, 1), (4, 5)))  # 24 + 16 = 40 -> 48
    s = m.StopSessions(0, 2, (d1, d2))
    b = s.pack()
    assert len(b) == 16 + 32 + 48 + 16
    assert b[16:32] == b"a" * 16 and struct.unpack_from("!IIII", b, 32) == (10, 1, 2, 3)
    assert b[48:64] == b"b" * 16 and struct.unpack_from("!IIIIII", b, 64) == (7, 2, 1, 1, 4, 5)
    assert b[88:96] == bytes(8)  # padding of the second description
    assert m.StopSessions.needed_length(b, owamp=True) == len(b)
    assert m.StopSessions.needed_length(b[:60], owamp=True) is None
    assert m.StopSessions.unpack(b, owamp=True) == s


def test_fetch_layouts() -> None:
    f = m.FetchSession(b"x" * 16, 5, 9)
    b = f.pack()
    assert b[0] == 4 and b[1:8] == bytes(7) and struct.unpack_from("!II", b, 8) == (5, 9) and b[16:32] == b"x" * 16
    assert m.FetchSession.unpack(b) == f
    a = m.FetchAck(0, True, 11, 1, 3)
    ab = a.pack()
    assert ab[:16] == bytes([0, 1, 0, 0]) + struct.pack("!III", 11, 1, 3)
    assert m.FetchAck.unpack(ab) == a
    ee = ErrorEstimate(True, False, 10, 3)
    rec = m.DataRecord(7, 0x0102030405060708, ee, 0x1112131415161718, ee, 64)
    rb = rec.pack()
    assert len(rb) == 25
    assert rb[:4] == b"\0\0\0\x07" and rb[4:6] == ee.pack().to_bytes(2, "big") and rb[8:16] == bytes.fromhex("0102030405060708")
    assert rb[16:24] == bytes.fromhex("1112131415161718") and rb[24] == 64
    recs = m.FetchRecords((rec, rec))
    assert len(recs.pack()) == 64 + 16 and recs.hmac_offsets() == (64,)
    assert m.FetchRecords.unpack(recs.pack(), 2) == recs
    sk = m.FetchSkipRanges(((1, 2),))
    assert sk.pack() == struct.pack("!II", 1, 2) + bytes(8) + bytes(16)


def test_n_sessions_layouts() -> None:
    s = m.StartNSessions((b"1" * 16, b"2" * 16))
    b = s.pack()
    assert b[:16] == b"\x07" + bytes(11) + b"\x00\x00\x00\x02" and b[16:48] == b"1" * 16 + b"2" * 16
    assert len(b) == 64 and m.StartNSessions.unpack(b) == s
    ack = m.StopNAck((b"1" * 16,), accept=3)
    assert ack.pack()[:2] == b"\x0a\x03" and m.StopNAck.unpack(ack.pack()) == ack
    assert m.StartNAck.unpack(m.StartNAck((), 0).pack()).sids == ()
    with pytest.raises(m.ProtocolError):
        m.StopNSessions.unpack(ack.pack())


def test_typep_and_sid() -> None:
    assert m.dscp_from_typep(m.typep_from_dscp(63)) == 63
    assert m.dscp_from_typep(0x40000000) is None  # PHB ID form
    sid = m.make_sid(V4("192.0.2.7"), 0x0102030405060708, b"rand")
    assert sid == bytes([192, 0, 2, 7]) + bytes.fromhex("0102030405060708") + b"rand"


# ---- fuzzing: decoders accept or raise ProtocolError, nothing else ----

FIXED = [m.ServerGreeting, m.SetUpResponse, m.ServerStart, m.RequestTWSession, m.AcceptSession,
         m.StartSessions, m.StartAck, m.FetchSession, m.FetchAck, m.DataRecord, m.Slot]
VARIABLE = [m.RequestSession, m.StartNSessions, m.StartNAck, m.StopNSessions, m.StopNAck]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIXED + VARIABLE), st.binary(max_size=300))
def test_fuzz_decoders(cls, data: bytes) -> None:
    try:
        cls.unpack(data)
    except m.ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(FIXED), st.data())
def test_fuzz_decoders_right_size(cls, data) -> None:
    size = 25 if cls is m.DataRecord else 16 if cls is m.Slot else cls.SIZE
    blob = data.draw(st.binary(min_size=size, max_size=size))
    try:
        cls.unpack(blob)
    except m.ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_stop_sessions(data: bytes, owamp: bool) -> None:
    try:
        m.StopSessions.needed_length(data, owamp)
        m.StopSessions.unpack(data, owamp=owamp)
    except m.ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 6))
def test_fuzz_fetch_parts(data: bytes, n: int) -> None:
    for f in (m.FetchSkipRanges.unpack, m.FetchRecords.unpack):
        try:
            f(data, n)
        except m.ProtocolError:
            pass
