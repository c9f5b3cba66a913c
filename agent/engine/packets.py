"""O/TWAMP-Test and STAMP packet layouts and codecs.

Layouts (all big-endian; offsets in octets):

TWAMP/OWAMP sender, unauthenticated (RFC 4656 §4.1.2, RFC 5357 §4.1.2)::

    0 Seq(4) 4 Timestamp(8) 12 ErrEst(2) 14 Padding...          >= 14 octets

STAMP sender, unauthenticated (RFC 8762 §4.2.1) — the TWAMP-Light format with SSID::

    0 Seq(4) 4 Timestamp(8) 12 ErrEst(2) 14 SSID(2) 16 MBZ(28)  44 octets (+TLVs)

TWAMP reflector, unauthenticated (RFC 5357 §4.2.1); STAMP puts SSID at 14 and MBZ(3) at 41::

    0 Seq 4 Timestamp 12 ErrEst 14 MBZ/SSID(2) 16 Receive-Timestamp 24 Sender-Seq
    28 Sender-Timestamp 36 Sender-ErrEst 38 MBZ(2) 40 Sender-TTL 41 Padding / MBZ(3)

Sender, authenticated/encrypted (RFC 4656 §4.1.2, RFC 5357 §4.1.2)::

    0 Seq(4) 4 MBZ(12) 16 Timestamp(8) 24 ErrEst(2) 26 MBZ(6) 32 HMAC(16) 48 Padding

STAMP sender, authenticated (RFC 8762 §4.2.2): SSID at 26, MBZ to 96, HMAC 96..112.

Reflector, authenticated/encrypted (RFC 5357 §4.2.1, errata 5045: 112 octets);
STAMP (RFC 8762 §4.3.2) is the same with SSID at 26::

    0 Seq 4 MBZ(12) 16 Timestamp 24 ErrEst 26 MBZ(6)/SSID(2)+MBZ(4) 32 Receive-Timestamp
    40 MBZ(8) 48 Sender-Seq 52 MBZ(12) 64 Sender-Timestamp 72 Sender-ErrEst 74 MBZ(6)
    80 Sender-TTL 81 MBZ(15) 96 HMAC(16) 112 Padding

The reflector answers at the sender's size where the sender padded for it: its packet
is ``max(len(sender), reflector base)`` long, and it re-uses the sender's padding
truncated at the end (RFC 5357 §4.2.1: "the highest-number octets are discarded"),
i.e. by 27 octets unauthenticated and by 64 octets authenticated (112 − 48). With
RFC 6038 Symmetrical Size the sender's own packet is already the reflector's size
(41 / 112 octets: the extra octets are MBZ), and the same rule yields equal sizes.
RFC 6038 Reflect Octets: the sender's "padding to be reflected" starts right after its
base fields (14 / 48), or after the symmetrical-size MBZ octets (41 / 112) when bit 64
was negotiated too (:func:`reflect_offset`); the reflector puts those octets first in its
own padding (right after Sender TTL / the HMAC, i.e. at 41 / 112).

Malformed, short or unauthentic input raises :class:`PacketError` (HMAC failures
raise its subclass :class:`HmacError`); nothing else escapes a decoder.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from agent.engine.crypto import (
    STAMP_HMAC_SPAN,
    StampCrypto,
    TwampTestCrypto,
)


class PacketError(ValueError):
    """A test packet that cannot be used (short, malformed, or failed authentication)."""


class HmacError(PacketError):
    """The packet's HMAC did not verify (tampered, wrong key, or corrupted)."""


class Proto(enum.Enum):
    TWAMP = "twamp"  # RFC 5357 (and TWAMP-Light)
    OWAMP = "owamp"  # RFC 4656: sender packets only
    STAMP = "stamp"  # RFC 8762/8972


class Security(enum.Enum):
    UNAUTH = "unauthenticated"
    AUTH = "authenticated"
    ENCRYPTED = "encrypted"


# TWAMP-Modes / OWAMP-Modes bits (RFC 4656 §3.1, RFC 5618, IANA TWAMP-Modes).
MODE_UNAUTHENTICATED = 1
MODE_AUTHENTICATED = 2
MODE_ENCRYPTED = 4
MODE_MIXED = 8  # RFC 5618: encrypted control, unauthenticated test packets
MODE_INDIVIDUAL_SESSION_CONTROL = 16  # RFC 5938
MODE_REFLECT_OCTETS = 32  # RFC 6038
MODE_SYMMETRICAL_SIZE = 64  # RFC 6038
MODE_IKEV2_DERIVED = 128  # RFC 7717
MODE_DSCP_ECN = 256  # RFC 7750 (IANA TWAMP-Modes bit 8)
MODE_PTP_TIMESTAMPS = 512  # RFC 8186 (IANA TWAMP-Modes bit 9)


def security_from_mode(mode: int) -> Security:
    """The test-packet security of a negotiated mode word (RFC 5618: mixed → unauthenticated)."""
    if mode & MODE_MIXED:
        return Security.UNAUTH
    if mode & MODE_ENCRYPTED:
        return Security.ENCRYPTED
    if mode & MODE_AUTHENTICATED:
        return Security.AUTH
    return Security.UNAUTH


# Base sizes.
TWAMP_SENDER_MIN = 14
TWAMP_REFLECTOR_BASE = 41
AUTH_SENDER_BASE = 48
AUTH_REFLECTOR_BASE = 112
STAMP_BASE = 44
STAMP_AUTH_BASE = 112
TTL_UNKNOWN = 255  # written when the kernel gave no TTL/Hop Limit

# Structs (hot-path users import these).
S_SENDER_UNAUTH = struct.Struct("!IQH")  # 14
S_STAMP_SENDER_UNAUTH = struct.Struct("!IQHH28x")  # 44
S_REFL_UNAUTH = struct.Struct("!IQHHQIQH2xB")  # 41 (SSID/MBZ at 14)
S_STAMP_REFL_UNAUTH = struct.Struct("!IQHHQIQH2xB3x")  # 44
S_SENDER_AUTH = struct.Struct("!I12xQH6x")  # 32, HMAC follows at 32
S_STAMP_SENDER_AUTH = struct.Struct("!I12xQHH68x")  # 96, HMAC at 96
S_REFL_AUTH = struct.Struct("!I12xQHH4xQ8xI12xQH6xB15x")  # 96, HMAC at 96
S_SEQ = struct.Struct("!I")


@dataclass(slots=True)
class SenderPacket:
    seq: int
    timestamp: int  # 64-bit NTP or PTP-truncated (Z bit of error_estimate tells)
    error_estimate: int  # packed 16-bit (agent.engine.timefmt.ErrorEstimate.pack())
    ssid: int = 0  # STAMP only
    extra: bytes = b""  # padding (O/TWAMP) or TLVs (STAMP)


@dataclass(slots=True)
class ReflectorPacket:
    seq: int
    timestamp: int  # T3
    error_estimate: int
    receive_timestamp: int  # T2
    sender_seq: int
    sender_timestamp: int  # T1 as the sender wrote it
    sender_error_estimate: int
    sender_ttl: int
    ssid: int = 0
    extra: bytes = b""


Crypto = TwampTestCrypto | StampCrypto | None


def _need(data: bytes | bytearray | memoryview, n: int, what: str) -> None:
    if len(data) < n:
        raise PacketError(f"{what}: {len(data)} octets, need at least {n}")


def _check_crypto(proto: Proto, sec: Security, crypto: Crypto) -> None:
    if sec is Security.UNAUTH:
        return
    if proto is Proto.STAMP:
        if sec is not Security.AUTH or not isinstance(crypto, StampCrypto):
            raise ValueError("STAMP authenticated mode needs a StampCrypto (STAMP has no encrypted mode)")
    elif not isinstance(crypto, TwampTestCrypto) or crypto.encrypted != (sec is Security.ENCRYPTED):
        raise ValueError("O/TWAMP authenticated/encrypted mode needs a matching TwampTestCrypto")


def session_crypto(proto: Proto, sec: Security, keys=None, stamp_key=None,
                   reflector_auth_span: int = 16) -> TwampTestCrypto | StampCrypto | None:
    """The per-session crypto a mode needs: none (unauthenticated), STAMP's HMAC-SHA-256
    (RFC 8762 §4.4; STAMP has no encrypted mode), or O/TWAMP's AES + HMAC-SHA1 from the
    control plane's TestKeys (RFC 4656 §4.1.2). ValueError when the keys are missing."""
    if sec is Security.UNAUTH:
        return None
    if proto is Proto.STAMP:
        if stamp_key is None or sec is Security.ENCRYPTED:
            raise ValueError("STAMP authenticated mode needs stamp_key (no encrypted mode)")
        return StampCrypto(stamp_key)
    if keys is None:
        raise ValueError("authenticated/encrypted O/TWAMP needs TestKeys")
    return TwampTestCrypto(keys, sec is Security.ENCRYPTED, reflector_auth_span)


def sender_base_len(proto: Proto, sec: Security) -> int:
    if proto is Proto.STAMP:
        return STAMP_BASE if sec is Security.UNAUTH else STAMP_AUTH_BASE
    return TWAMP_SENDER_MIN if sec is Security.UNAUTH else AUTH_SENDER_BASE


def reflector_base_len(proto: Proto, sec: Security) -> int:
    if proto is Proto.STAMP:
        return STAMP_BASE if sec is Security.UNAUTH else STAMP_AUTH_BASE
    return TWAMP_REFLECTOR_BASE if sec is Security.UNAUTH else AUTH_REFLECTOR_BASE


def reflect_offset(mode: int, proto: Proto = Proto.TWAMP) -> int:
    """Where the RFC 6038 padding to be reflected starts in a sender packet of this mode:
    after the base fields, or after the Symmetrical Size MBZ octets when bit 64 is set."""
    sec = security_from_mode(mode)
    return reflector_base_len(proto, sec) if mode & MODE_SYMMETRICAL_SIZE else sender_base_len(proto, sec)


def symmetric_padding(proto: Proto, sec: Security) -> int:
    """Padding a sender needs so that the reflector answers at the same size (RFC 5357 §4.2.1, RFC 6038)."""
    return reflector_base_len(proto, sec) - sender_base_len(proto, sec)


# --------------------------------------------------------------------------- sender


def encode_sender(pkt: SenderPacket, proto: Proto, sec: Security, crypto: Crypto = None) -> bytes:
    _check_crypto(proto, sec, crypto)
    if sec is Security.UNAUTH:
        if proto is Proto.STAMP:
            return S_STAMP_SENDER_UNAUTH.pack(pkt.seq, pkt.timestamp, pkt.error_estimate, pkt.ssid) + pkt.extra
        return S_SENDER_UNAUTH.pack(pkt.seq, pkt.timestamp, pkt.error_estimate) + pkt.extra
    if proto is Proto.STAMP:
        assert isinstance(crypto, StampCrypto)
        head = S_STAMP_SENDER_AUTH.pack(pkt.seq, pkt.timestamp, pkt.error_estimate, pkt.ssid)
        return head + crypto.mac(head) + pkt.extra
    assert isinstance(crypto, TwampTestCrypto)
    plain = S_SENDER_AUTH.pack(pkt.seq, pkt.timestamp, pkt.error_estimate)
    tag = crypto.mac(plain[: crypto.sender_span])
    span = crypto.sender_cipher_span
    return crypto.encrypt(plain, span) + plain[span:] + tag + pkt.extra


def decode_sender(data: bytes | bytearray | memoryview, proto: Proto, sec: Security, crypto: Crypto = None) -> SenderPacket:
    _check_crypto(proto, sec, crypto)
    data = bytes(data)
    if sec is Security.UNAUTH:
        if proto is Proto.STAMP:
            _need(data, STAMP_BASE, "STAMP sender packet")
            seq, ts, err, ssid = S_STAMP_SENDER_UNAUTH.unpack_from(data)
            return SenderPacket(seq, ts, err, ssid, data[STAMP_BASE:])
        _need(data, TWAMP_SENDER_MIN, "sender packet")
        seq, ts, err = S_SENDER_UNAUTH.unpack_from(data)
        return SenderPacket(seq, ts, err, 0, data[TWAMP_SENDER_MIN:])
    if proto is Proto.STAMP:
        assert isinstance(crypto, StampCrypto)
        _need(data, STAMP_AUTH_BASE, "STAMP authenticated sender packet")
        if not crypto.verify(data[STAMP_HMAC_SPAN:STAMP_AUTH_BASE], data[:STAMP_HMAC_SPAN]):
            raise HmacError("STAMP sender packet HMAC mismatch")
        seq, ts, err, ssid = S_STAMP_SENDER_AUTH.unpack_from(data)
        return SenderPacket(seq, ts, err, ssid, data[STAMP_AUTH_BASE:])
    assert isinstance(crypto, TwampTestCrypto)
    _need(data, AUTH_SENDER_BASE, "authenticated sender packet")
    span = crypto.sender_cipher_span
    plain = crypto.decrypt(data, span) + data[span:32]
    if not crypto.verify(plain[: crypto.sender_span], data[32:48]):
        raise HmacError("sender packet HMAC mismatch")
    seq, ts, err = S_SENDER_AUTH.unpack_from(plain)
    return SenderPacket(seq, ts, err, 0, data[AUTH_SENDER_BASE:])


# ------------------------------------------------------------------------ reflector


def encode_reflector(pkt: ReflectorPacket, proto: Proto, sec: Security, crypto: Crypto = None) -> bytes:
    _check_crypto(proto, sec, crypto)
    args = (
        pkt.seq,
        pkt.timestamp,
        pkt.error_estimate,
        pkt.ssid if proto is Proto.STAMP else 0,
        pkt.receive_timestamp,
        pkt.sender_seq,
        pkt.sender_timestamp,
        pkt.sender_error_estimate,
        pkt.sender_ttl,
    )
    if sec is Security.UNAUTH:
        s = S_STAMP_REFL_UNAUTH if proto is Proto.STAMP else S_REFL_UNAUTH
        return s.pack(*args) + pkt.extra
    plain = S_REFL_AUTH.pack(*args)
    if isinstance(crypto, StampCrypto):
        return plain + crypto.mac(plain) + pkt.extra
    assert isinstance(crypto, TwampTestCrypto)
    tag = crypto.mac(plain[: crypto.reflector_span])
    span = crypto.reflector_cipher_span
    return crypto.encrypt(plain, span) + plain[span:] + tag + pkt.extra


def decode_reflector(
    data: bytes | bytearray | memoryview, proto: Proto, sec: Security, crypto: Crypto = None
) -> ReflectorPacket:
    _check_crypto(proto, sec, crypto)
    data = bytes(data)
    if sec is Security.UNAUTH:
        s = S_STAMP_REFL_UNAUTH if proto is Proto.STAMP else S_REFL_UNAUTH
        _need(data, s.size, "reflector packet")
        seq, ts, err, ssid, rts, sseq, sts, serr, ttl = s.unpack_from(data)
        return ReflectorPacket(seq, ts, err, rts, sseq, sts, serr, ttl, ssid if proto is Proto.STAMP else 0, data[s.size :])
    _need(data, AUTH_REFLECTOR_BASE, "authenticated reflector packet")
    if isinstance(crypto, StampCrypto):
        if not crypto.verify(data[96:112], data[:96]):
            raise HmacError("STAMP reflector packet HMAC mismatch")
        plain = data[:96]
    else:
        assert isinstance(crypto, TwampTestCrypto)
        span = crypto.reflector_cipher_span
        plain = crypto.decrypt(data, span) + data[span:96]
        if not crypto.verify(plain[: crypto.reflector_span], data[96:112]):
            raise HmacError("reflector packet HMAC mismatch")
    seq, ts, err, ssid, rts, sseq, sts, serr, ttl = S_REFL_AUTH.unpack_from(plain)
    return ReflectorPacket(seq, ts, err, rts, sseq, sts, serr, ttl, ssid if proto is Proto.STAMP else 0, data[112:])


def reflected_length(sender_len: int, proto: Proto, sec: Security) -> int:
    """Length of the reflector's answer to a sender packet of ``sender_len`` octets (RFC 5357 §4.2.1)."""
    return max(sender_len, reflector_base_len(proto, sec))
