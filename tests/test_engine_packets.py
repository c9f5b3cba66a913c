"""Test-packet layouts (against scapy's independent STAMP decoder), crypto vectors, decoder fuzzing."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine import tlv
from agent.engine.crypto import StampCrypto, TwampTestCrypto
from agent.engine.keys import TestKeys
from agent.engine.packets import (
    HmacError,
    PacketError,
    Proto,
    ReflectorPacket,
    Security,
    SenderPacket,
    decode_reflector,
    decode_sender,
    encode_reflector,
    encode_sender,
    reflected_length,
    security_from_mode,
)
from netlink.secret import Secret

stamp = pytest.importorskip("scapy.contrib.stamp")

AES_KEY = bytes(range(16))
HMAC_KEY = bytes(range(100, 132))
KEYS = TestKeys(Secret(AES_KEY), Secret(HMAC_KEY))
STAMP_KEY = Secret(b"stamp-key-" + bytes(22))
NTP_TS = (3_900_000_000 << 32) | (1 << 31)


def _ref(seq: int = 11, ssid: int = 0) -> ReflectorPacket:
    return ReflectorPacket(
        seq=seq,
        timestamp=NTP_TS + 5000,
        error_estimate=0x8103,
        receive_timestamp=NTP_TS + 1000,
        sender_seq=77,
        sender_timestamp=NTP_TS,
        sender_error_estimate=0x0A01,
        sender_ttl=63,
        ssid=ssid,
    )


# ----------------------------------------------------------------- layouts vs scapy


def test_stamp_sender_unauth_matches_scapy() -> None:
    ours = encode_sender(SenderPacket(5, NTP_TS, 0x8105, 7), Proto.STAMP, Security.UNAUTH)
    assert len(ours) == 44
    p = stamp.STAMPSessionSenderTestUnauthenticated(ours)
    assert (p.seq, p.ssid, p.err_estimate.S, p.err_estimate.scale, p.err_estimate.multiplier) == (5, 7, 1, 1, 5)
    assert float(p.ts) == pytest.approx(3_900_000_000.5)
    assert bytes(p) == ours
    # and the other way round: scapy builds, we decode
    built = bytes(stamp.STAMPSessionSenderTestUnauthenticated(seq=9, ssid=3))
    d = decode_sender(built, Proto.STAMP, Security.UNAUTH)
    assert (d.seq, d.ssid, len(built)) == (9, 3, 44)


def test_stamp_reflector_unauth_matches_scapy() -> None:
    ours = encode_reflector(_ref(ssid=0x1234), Proto.STAMP, Security.UNAUTH)
    assert len(ours) == 44
    p = stamp.STAMPSessionReflectorTestUnauthenticated(ours)
    assert (p.seq, p.ssid, p.seq_sender, p.ttl_sender) == (11, 0x1234, 77, 63)
    assert (p.err_estimate.S, p.err_estimate.multiplier) == (1, 3)
    assert (p.err_estimate_sender.S, p.err_estimate_sender.scale, p.err_estimate_sender.multiplier) == (0, 10, 1)
    assert float(p.ts_sender) == pytest.approx(3_900_000_000.5)
    assert bytes(p) == ours


def test_twamp_reflector_unauth_is_stamp_prefix_without_ssid() -> None:
    """RFC 5357 §4.2.1 reflector = STAMP reflector minus SSID (MBZ) and the trailing MBZ(3)."""
    ours = encode_reflector(_ref(), Proto.TWAMP, Security.UNAUTH)
    assert len(ours) == 41
    p = stamp.STAMPSessionReflectorTestUnauthenticated(ours + bytes(3))
    assert (p.seq, p.ssid, p.seq_sender, p.ttl_sender) == (11, 0, 77, 63)
    # offsets that interop depends on: T3 at 4, T2 at 16, sender fields at 24/28/36, TTL at 40
    assert struct.unpack_from("!Q", ours, 4)[0] == NTP_TS + 5000
    assert struct.unpack_from("!Q", ours, 16)[0] == NTP_TS + 1000
    assert struct.unpack_from("!IQH", ours, 24) == (77, NTP_TS, 0x0A01)
    assert ours[40] == 63


def test_twamp_sender_unauth_14_octets() -> None:
    ours = encode_sender(SenderPacket(1, NTP_TS, 0x8001), Proto.TWAMP, Security.UNAUTH)
    assert ours == struct.pack("!IQH", 1, NTP_TS, 0x8001)
    p = stamp.STAMPSessionSenderTestUnauthenticated(ours + bytes(30))
    assert p.seq == 1


def test_stamp_tlv_flags_and_scapy() -> None:
    t = tlv.Tlv(tlv.FLAG_U, 99, b"abcd").encode()
    p = stamp.STAMPTestTLV(t)
    # RFC 8972 §4: U is the most significant bit of Flags (scapy 2.8.0 names that bit "R").
    assert (int(p.flags), p.type, p.len, p.value) == (0x80, 99, 4, b"abcd")
    assert tlv.parse_tlvs(t + tlv.class_of_service(46).encode())[1].type == tlv.T_CLASS_OF_SERVICE


def test_reflected_length_rules() -> None:
    assert reflected_length(14, Proto.TWAMP, Security.UNAUTH) == 41
    assert reflected_length(41, Proto.TWAMP, Security.UNAUTH) == 41
    assert reflected_length(200, Proto.TWAMP, Security.UNAUTH) == 200
    assert reflected_length(48, Proto.TWAMP, Security.AUTH) == 112
    assert reflected_length(112, Proto.TWAMP, Security.ENCRYPTED) == 112


def test_security_from_mode() -> None:
    assert security_from_mode(1) is Security.UNAUTH
    assert security_from_mode(2) is Security.AUTH
    assert security_from_mode(4) is Security.ENCRYPTED
    assert security_from_mode(8 | 4) is Security.UNAUTH  # RFC 5618 mixed


# ----------------------------------------------------------------- crypto vectors


def _ecb(pt: bytes) -> bytes:
    e = Cipher(algorithms.AES(AES_KEY), modes.ECB()).encryptor()
    return e.update(pt) + e.finalize()


def _cbc0(pt: bytes) -> bytes:
    e = Cipher(algorithms.AES(AES_KEY), modes.CBC(bytes(16))).encryptor()
    return e.update(pt) + e.finalize()


def _sha1(data: bytes) -> bytes:
    h = hmac.HMAC(HMAC_KEY, hashes.SHA1())
    h.update(data)
    return h.finalize()[:16]


def _sha256(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()[:16]


SENDER_PLAIN = struct.pack("!I12xQH6x", 42, NTP_TS, 0x8101)


def test_sender_authenticated_vector() -> None:
    c = TwampTestCrypto(KEYS, encrypted=False)
    got = encode_sender(SenderPacket(42, NTP_TS, 0x8101, extra=b"P" * 8), Proto.TWAMP, Security.AUTH, c)
    want = _ecb(SENDER_PLAIN[:16]) + SENDER_PLAIN[16:32] + _sha1(SENDER_PLAIN[:16]) + b"P" * 8
    assert got == want
    assert decode_sender(got, Proto.TWAMP, Security.AUTH, c).seq == 42


def test_sender_encrypted_vector() -> None:
    c = TwampTestCrypto(KEYS, encrypted=True)
    got = encode_sender(SenderPacket(42, NTP_TS, 0x8101), Proto.OWAMP, Security.ENCRYPTED, c)
    assert got == _cbc0(SENDER_PLAIN[:32]) + _sha1(SENDER_PLAIN[:32])
    assert decode_sender(got, Proto.OWAMP, Security.ENCRYPTED, c).timestamp == NTP_TS


@pytest.mark.parametrize("encrypted", [False, True])
def test_reflector_vectors(encrypted: bool) -> None:
    c = TwampTestCrypto(KEYS, encrypted=encrypted)
    sec = Security.ENCRYPTED if encrypted else Security.AUTH
    got = encode_reflector(_ref(), Proto.TWAMP, sec, c)
    plain = struct.pack("!I12xQH6xQ8xI12xQH6xB15x", 11, NTP_TS + 5000, 0x8103, NTP_TS + 1000, 77, NTP_TS, 0x0A01, 63)
    if encrypted:
        want = _cbc0(plain) + _sha1(plain)
    else:
        want = _ecb(plain[:16]) + plain[16:] + _sha1(plain[:16])
    assert len(got) == 112 and got == want
    assert decode_reflector(got, Proto.TWAMP, sec, c) == _ref()


def test_reflector_auth_span_96_option() -> None:
    c = TwampTestCrypto(KEYS, encrypted=False, reflector_auth_span=96)
    got = encode_reflector(_ref(), Proto.TWAMP, Security.AUTH, c)
    plain = struct.pack("!I12xQH6xQ8xI12xQH6xB15x", 11, NTP_TS + 5000, 0x8103, NTP_TS + 1000, 77, NTP_TS, 0x0A01, 63)
    assert got[96:] == _sha1(plain)


def test_stamp_auth_vectors() -> None:
    c = StampCrypto(STAMP_KEY)
    key = STAMP_KEY.reveal()
    s = encode_sender(SenderPacket(3, NTP_TS, 0x8001, 9), Proto.STAMP, Security.AUTH, c)
    plain = struct.pack("!I12xQHH68x", 3, NTP_TS, 0x8001, 9)
    assert s == plain + _sha256(key, plain)
    r = encode_reflector(_ref(ssid=9), Proto.STAMP, Security.AUTH, c)
    rplain = struct.pack("!I12xQHH4xQ8xI12xQH6xB15x", 11, NTP_TS + 5000, 0x8103, 9, NTP_TS + 1000, 77, NTP_TS, 0x0A01, 63)
    assert r == rplain + _sha256(key, rplain)
    assert decode_reflector(r, Proto.STAMP, Security.AUTH, c).ssid == 9


def test_hmac_tlv_vector() -> None:
    c = StampCrypto(STAMP_KEY)
    pre = tlv.class_of_service(10).encode()
    body = tlv.sender_tlvs([tlv.class_of_service(10)], c, 5)
    assert body == pre + b"\x00\x08\x00\x10" + _sha256(STAMP_KEY.reveal(), b"\x00\x00\x00\x05" + pre)


@pytest.mark.parametrize("sec", [Security.AUTH, Security.ENCRYPTED])
def test_tampered_packets_raise_hmac_error(sec: Security) -> None:
    c = TwampTestCrypto(KEYS, encrypted=sec is Security.ENCRYPTED)
    good = bytearray(encode_sender(SenderPacket(1, NTP_TS, 1), Proto.TWAMP, sec, c))
    good[2] ^= 1
    with pytest.raises(HmacError):
        decode_sender(bytes(good), Proto.TWAMP, sec, c)
    r = bytearray(encode_reflector(_ref(), Proto.TWAMP, sec, c))
    r[100] ^= 0x40
    with pytest.raises(HmacError):
        decode_reflector(bytes(r), Proto.TWAMP, sec, c)
    wrong = TwampTestCrypto(TestKeys(Secret(bytes(16)), Secret(HMAC_KEY)), encrypted=sec is Security.ENCRYPTED)
    with pytest.raises(HmacError):
        decode_reflector(encode_reflector(_ref(), Proto.TWAMP, sec, c), Proto.TWAMP, sec, wrong)


def test_no_key_material_in_repr() -> None:
    c = TwampTestCrypto(KEYS, encrypted=True)
    s = StampCrypto(STAMP_KEY)
    for text in (repr(c), repr(s), repr(KEYS)):
        assert AES_KEY.hex() not in text and HMAC_KEY.hex() not in text and "stamp-key" not in text


# ----------------------------------------------------------------- fuzzing

_CODECS = [
    (Proto.TWAMP, Security.UNAUTH, None),
    (Proto.STAMP, Security.UNAUTH, None),
    (Proto.TWAMP, Security.AUTH, TwampTestCrypto(KEYS, False)),
    (Proto.TWAMP, Security.ENCRYPTED, TwampTestCrypto(KEYS, True)),
    (Proto.STAMP, Security.AUTH, StampCrypto(STAMP_KEY)),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, len(_CODECS) - 1))
def test_fuzz_decoders_raise_only_packet_error(data: bytes, i: int) -> None:
    proto, sec, c = _CODECS[i]
    for fn in (decode_sender, decode_reflector):
        try:
            fn(data, proto, sec, c)
        except PacketError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_tlv_parser(data: bytes) -> None:
    try:
        tlvs = tlv.parse_tlvs(data)
    except PacketError:
        return
    assert tlv.encode_tlvs(tlvs) == data


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**16 - 1), st.binary(max_size=40))
def test_roundtrip_sender(seq: int, ts: int, err: int, pad: bytes) -> None:
    for proto, sec, c in _CODECS:
        p = SenderPacket(seq, ts, err, 0, pad)
        assert decode_sender(encode_sender(p, proto, sec, c), proto, sec, c) == p
