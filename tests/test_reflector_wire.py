"""The reflector's replies, byte for byte, against a peer written here from the RFCs with
``struct`` and raw ``cryptography`` calls (never our codecs): RFC 5357 §4.2.1 (TWAMP
unauthenticated and authenticated), RFC 8762 §4.3.1 (STAMP unauthenticated), RFC 4656 §4.1.2
NTP timestamps, RFC 8186 truncated PTP timestamps.

The per-packet paths keep a per-second cache of the timestamp's seconds half; the times
below cross second boundaries, sit on 0 and 999 999 999 ns, and put T3 in another second
than T2, so a stale cache would show as a wrong octet."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.engine.keys import TestKeys
from agent.engine.packets import Proto, Security
from agent.engine.reflector import LATE_T3, ReflectorSession
from netlink.secret import Secret

AES_KEY = bytes(range(16))
HMAC_KEY = bytes(range(32, 64))
ERR = 0x8105  # S=1, scale 1, multiplier 5
S = 1_780_000_000 * 10**9  # a whole second, Unix ns

# (rx_ns, now_ns): same second, T3 across the next boundary, both on boundaries, T3 before T2,
# far apart, and back to the first second (the cache must follow).
TIMES = [
    (S + 123_456_789, S + 123_460_000),
    (S + 999_999_999, S + 10**9),
    (S + 10**9, S + 2 * 10**9 - 1),
    (S + 5 * 10**9 + 1, S + 5 * 10**9),
    (S + 7 * 10**9 + 500_000_000, S + 9 * 10**9 + 3),
    (S + 1, S + 2),
]


def ntp(ns: int) -> int:
    """RFC 4656 §4.1.2: seconds since 1900-01-01 (32 bits), fraction in 2**-32 s, rounded down."""
    sec, rem = divmod(ns, 10**9)
    return (((sec + 2_208_988_800) % 2**32) << 32) | (rem * 2**32 // 10**9)


def ptp(ns: int) -> int:
    """RFC 8186: 32-bit seconds since the (Unix-aligned) PTP epoch, 32-bit nanoseconds."""
    sec, rem = divmod(ns, 10**9)
    return ((sec % 2**32) << 32) | rem


def aes_ecb(key: bytes, block: bytes, decrypt: bool = False) -> bytes:
    c = Cipher(algorithms.AES(key), modes.ECB())
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(block) + ctx.finalize()


def hmac_sha1_16(data: bytes) -> bytes:
    h = hmac.HMAC(HMAC_KEY, hashes.SHA1())
    h.update(data)
    return h.finalize()[:16]


@pytest.mark.parametrize("use_ptp", [False, True])
@pytest.mark.parametrize("size", [14, 41, 60])
def test_twamp_unauthenticated_reply_octets(use_ptp: bool, size: int) -> None:
    r = ReflectorSession(Proto.TWAMP, ptp=use_ptp, error_estimate=ERR)
    fmt = ptp if use_ptp else ntp
    for i, (rx, now) in enumerate(TIMES):
        pad = bytes((i + k) & 0xFF for k in range(size - 14))
        req = struct.pack("!IQH", 1000 + i, 0x1122334455667788 + i, 0x0A01) + pad
        out = r.reflect(req, rx, 60 + i, lambda now=now: now)
        # RFC 5357 §4.2.1: Seq, Timestamp, Error Estimate, MBZ(2), Receive Timestamp, Sender
        # Seq, Sender Timestamp, Sender Error Estimate, MBZ(2), Sender TTL; padding minus 27.
        err = ERR | (0x4000 if use_ptp else 0)  # RFC 8186: Z says the format
        want = struct.pack("!IQHHQ", i, fmt(now), err, 0, fmt(rx)) + req[:14] + b"\0\0" + bytes([60 + i])
        want += pad[: max(0, size - 41)]
        assert out == want, i


def test_twamp_unauthenticated_late_t3_and_unknown_ttl() -> None:
    r = ReflectorSession(Proto.TWAMP, error_estimate=ERR)
    rx = S + 42
    out = r.reflect(struct.pack("!IQH", 7, 1, 0x0001), rx, None, LATE_T3)
    assert out is not None and out[4:12] == bytes(8)  # left for the adapter to write
    assert out[16:24] == struct.pack("!Q", ntp(rx)) and out[40] == 255


@pytest.mark.parametrize("size", [48, 112, 140])
def test_twamp_authenticated_reply_octets(size: int) -> None:
    keys = TestKeys(Secret(AES_KEY), Secret(HMAC_KEY))
    r = ReflectorSession(Proto.TWAMP, Security.AUTH, keys=keys, error_estimate=ERR)
    for i, (rx, now) in enumerate(TIMES):
        # Sender packet (RFC 5357 §4.1.2 authenticated): block 0 = Seq + 12 MBZ, AES-ECB;
        # Timestamp, Error Estimate, MBZ(6) in clear; HMAC-SHA1/16 over block 0's plaintext.
        b0 = struct.pack("!I12x", 500 + i)
        body = aes_ecb(AES_KEY, b0) + struct.pack("!QH6x", 0x0102030405060708 + i, 0x0A02)
        pad = bytes((3 * i + k) & 0xFF for k in range(size - 48))
        req = body + hmac_sha1_16(b0) + pad
        out = r.reflect(req, rx, 64, lambda now=now: now)
        assert out is not None
        # Reply: block 0 (Seq + MBZ) enciphered and MACed, the rest in clear, HMAC at 96.
        rb0 = struct.pack("!I12x", i)
        rest = struct.pack("!QHH4xQ8xI12xQH6xB15x", ntp(now), ERR, 0, ntp(rx), 500 + i,
                           0x0102030405060708 + i, 0x0A02, 64)
        want = aes_ecb(AES_KEY, rb0) + rest + hmac_sha1_16(rb0) + pad[: max(0, size - 112)]
        assert out == want, i
        assert aes_ecb(AES_KEY, out[:16], decrypt=True) == rb0
    # The same packet again: the replay window drops it, counted.
    assert r.reflect(req, TIMES[0][0], 64, lambda: TIMES[0][1]) is None and r.counters.replayed == 1


def test_twamp_authenticated_drops_and_counts() -> None:
    keys = TestKeys(Secret(AES_KEY), Secret(HMAC_KEY))
    r = ReflectorSession(Proto.TWAMP, Security.AUTH, keys=keys, error_estimate=ERR)
    b0 = struct.pack("!I12x", 9)
    good = aes_ecb(AES_KEY, b0) + struct.pack("!QH6x", 1, 0x0A00) + hmac_sha1_16(b0)  # multiplier 0
    assert r.reflect(good[:47], S, 64, lambda: S) is None and r.counters.short == 1
    bad = bytearray(good)
    bad[40] ^= 1
    assert r.reflect(bytes(bad), S, 64, lambda: S) is None and r.counters.bad_hmac == 1
    assert r.reflect(good, S, 64, lambda: S) is None and r.counters.bad_error_estimate == 1
    assert r.counters.reflected == 0 and r.seq == 0


@pytest.mark.parametrize("use_ptp", [False, True])
@pytest.mark.parametrize("stateful", [True, False])
def test_stamp_unauthenticated_reply_octets(use_ptp: bool, stateful: bool) -> None:
    r = ReflectorSession(Proto.STAMP, ptp=use_ptp, stateful=stateful, error_estimate=ERR)
    fmt = ptp if use_ptp else ntp
    for i, (rx, now) in enumerate(TIMES):
        # RFC 8762 §4.2.1: Seq, Timestamp, Error Estimate, SSID, MBZ(28); zero padding after.
        req = struct.pack("!IQHH28x", 70 + i, 0xAABBCCDD00112233 + i, 0x0A03, 0x1234) + bytes(i * 4)
        out = r.reflect(req, rx, 33, lambda now=now: now, None, ("192.0.2.1", 862))
        seq = i if stateful else 70 + i
        err = ERR | (0x4000 if use_ptp else 0)
        # RFC 8762 §4.3.1: Seq, Timestamp, Error Estimate, SSID, Receive Timestamp, Sender Seq,
        # Sender Timestamp, Sender Error Estimate, MBZ(2), Sender TTL, MBZ(3); padding reflected.
        want = struct.pack("!IQHHQIQH2xB3x", seq, fmt(now), err, 0x1234, fmt(rx), 70 + i,
                           0xAABBCCDD00112233 + i, 0x0A03, 33) + bytes(i * 4)
        assert out == want, i


@pytest.mark.parametrize("use_ptp", [False, True])
def test_late_t3_patch_octets_across_seconds(use_ptp: bool) -> None:
    """The adapter's late T3 write (agent.engine.followup.T3Patch) keeps its own per-second cache."""
    from agent.engine.followup import T3Patch

    p = T3Patch.for_session(Proto.TWAMP, Security.UNAUTH, use_ptp)
    fmt = ptp if use_ptp else ntp
    for now in [t for pair in TIMES for t in pair] + [0, 10**9 - 1, -1, S]:
        buf = bytearray(41)
        p.patch(buf, now)
        assert buf == bytes(4) + struct.pack("!Q", fmt(now)) + bytes(29), now


def hmac_sha256_16(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()[:16]


@pytest.mark.parametrize("use_ptp", [False, True])
@pytest.mark.parametrize("stateful", [True, False])
def test_stamp_authenticated_reply_octets(use_ptp: bool, stateful: bool) -> None:
    """RFC 8762 §4.2.2 request / §4.3.2 reply in authenticated mode: the RFC 5357 §4.2.1
    authenticated layout with the SSID after the Error Estimate, HMAC-SHA-256 truncated to 16
    octets over octets 0..95. Replays and a wrong HMAC are dropped and counted."""
    key = bytes(range(100, 132))
    r = ReflectorSession(Proto.STAMP, Security.AUTH, stamp_key=Secret(key), ptp=use_ptp, stateful=stateful,
                         error_estimate=ERR)
    fmt = ptp if use_ptp else ntp
    err = ERR | (0x4000 if use_ptp else 0)

    def request(seq: int, ssid: int, pad: int = 0) -> bytes:
        # Seq, MBZ(12), Timestamp, Error Estimate, SSID, MBZ(68), HMAC; zero padding after.
        body = struct.pack("!I12xQHH68x", seq, 0x0102030405060708 + seq, 0x0A03, ssid)
        return body + hmac_sha256_16(key, body) + bytes(pad)

    peer = ("192.0.2.1", 862)
    for i, (rx, now) in enumerate(TIMES):
        req = request(500 + i, 0x4321, pad=i * 4)
        out = r.reflect(req, rx, 44, lambda now=now: now, None, peer)
        seq = i if stateful else 500 + i
        # Seq, MBZ(12), Timestamp, Error Estimate, SSID, MBZ(4), Receive Timestamp, MBZ(8), Sender Seq,
        # MBZ(12), Sender Timestamp, Sender Error Estimate, MBZ(6), Sender TTL, MBZ(15), HMAC.
        body = struct.pack("!I12xQHH4xQ8xI12xQH6xB15x", seq, fmt(now), err, 0x4321, fmt(rx), 500 + i,
                           0x0102030405060708 + 500 + i, 0x0A03, 44)
        assert out == body + hmac_sha256_16(key, body) + bytes(i * 4), i
    assert r.reflect(request(500, 0x4321), S, 44, lambda: S, None, peer) is None and r.counters.replayed == 1
    assert r.reflect(request(500, 0x4322), S, 44, lambda: S, None, peer) is not None  # another SSID: its own window
    bad = bytearray(request(900, 0x4321))
    bad[30] ^= 1
    assert r.reflect(bytes(bad), S, 44, lambda: S, None, peer) is None and r.counters.bad_hmac == 1
    assert r.reflect(request(901, 0x4321)[:111], S, 44, lambda: S, None, peer) is None and r.counters.short == 1
    assert r.counters.received == len(TIMES) + 4 and r.counters.reflected == len(TIMES) + 1
