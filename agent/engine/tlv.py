"""RFC 8972 STAMP TLVs: parsing, building and the reflector's TLV processing.

TLV = Flags(1: U M I R R R R R, U the most significant bit) Type(1) Length(2) Value.
Types handled: 1 Extra Padding, 3 Timestamp Information, 4 Class of Service,
5 Direct Measurement, 8 HMAC (must be last). Any other type is reflected unchanged with the U flag set
(RFC 8972 §4: "Unrecognized").
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from agent.engine.crypto import HMAC_LEN, StampCrypto
from agent.engine.packets import PacketError

FLAG_U = 0x80  # unrecognized type
FLAG_M = 0x40  # malformed
FLAG_I = 0x20  # integrity (HMAC) check failed

T_EXTRA_PADDING = 1
T_LOCATION = 2
T_TIMESTAMP_INFO = 3
T_CLASS_OF_SERVICE = 4
T_DIRECT_MEASUREMENT = 5
T_ACCESS_REPORT = 6
T_FOLLOW_UP = 7
T_HMAC = 8

# RFC 8972 §4.3 Timestamp Information: synchronization source and timestamping method.
SYNC_NTP = 1
SYNC_PTP = 2
SYNC_SSU_BITS = 3
SYNC_GPS = 4
SYNC_FREE_RUNNING = 5
METHOD_HW = 1
METHOD_SW = 2
METHOD_CONTROL_PLANE = 3

_HDR = struct.Struct("!BBH")
# TLVs parsed in one packet at most. RFC 8972 sets no limit; a sender needs a handful
# (padding, timestamp info, CoS, direct measurement, HMAC). Beyond this the block is
# reflected unparsed: hundreds of 4-octet TLVs would cost a reflector 35x its CPU per packet.
MAX_TLVS = 16


class TooManyTlvs(PacketError):
    """More than MAX_TLVS TLVs in one packet."""
_HANDLED = frozenset((T_EXTRA_PADDING, T_TIMESTAMP_INFO, T_CLASS_OF_SERVICE, T_HMAC))


class Tlv(NamedTuple):
    flags: int
    type: int
    value: bytes

    def encode(self) -> bytes:
        return _HDR.pack(self.flags, self.type, len(self.value)) + self.value


def parse_tlvs(data: bytes | bytearray | memoryview) -> list[Tlv]:
    """All TLVs of ``data``; :class:`PacketError` when a Length runs past the end or HMAC is not last."""
    data = bytes(data)
    out: list[Tlv] = []
    off, n = 0, len(data)
    while off < n:
        if n - off < 4:
            raise PacketError("truncated TLV header")
        flags, typ, length = _HDR.unpack_from(data, off)
        end = off + 4 + length
        if end > n:
            raise PacketError("TLV length runs past the packet")
        if len(out) >= MAX_TLVS:
            raise TooManyTlvs(f"more than {MAX_TLVS} TLVs")
        out.append(Tlv(flags, typ, data[off + 4 : end]))
        off = end
    for t in out[:-1]:
        if t.type == T_HMAC:
            raise PacketError("HMAC TLV is not the last TLV")
    return out


def encode_tlvs(tlvs: list[Tlv]) -> bytes:
    return b"".join(t.encode() for t in tlvs)


def class_of_service(dscp1: int, dscp2: int = 0, ecn: int = 0, rp: int = 0) -> Tlv:
    """RFC 8972 §4.4: DSCP1(6) DSCP2(6) ECN(2) RP(2) Reserved(16)."""
    word = ((dscp1 & 0x3F) << 26) | ((dscp2 & 0x3F) << 20) | ((ecn & 3) << 18) | ((rp & 3) << 16)
    return Tlv(0, T_CLASS_OF_SERVICE, word.to_bytes(4, "big"))


def parse_class_of_service(value: bytes) -> tuple[int, int, int, int]:
    if len(value) != 4:
        raise PacketError("Class of Service TLV must be 4 octets")
    w = int.from_bytes(value, "big")
    return (w >> 26) & 0x3F, (w >> 20) & 0x3F, (w >> 18) & 3, (w >> 16) & 3


def timestamp_info(sync_in: int = 0, method_in: int = 0, sync_out: int = 0, method_out: int = 0) -> Tlv:
    return Tlv(0, T_TIMESTAMP_INFO, bytes((sync_in, method_in, sync_out, method_out)))


def direct_measurement(s_txc: int) -> Tlv:
    """RFC 8972 §4.5: the sender's transmit counter; the reflector fills its Rx/Tx counters."""
    return Tlv(0, T_DIRECT_MEASUREMENT, (s_txc & 0xFFFFFFFF).to_bytes(4, "big") + bytes(8))


def extra_padding(n: int) -> Tlv:
    return Tlv(0, T_EXTRA_PADDING, bytes(n))


def hmac_tlv(crypto: StampCrypto, seq_bytes: bytes, preceding: bytes, flags: int = 0) -> Tlv:
    """RFC 8972 §4.8: HMAC over the base packet's Sequence Number and the preceding TLVs."""
    return Tlv(flags, T_HMAC, crypto.mac(seq_bytes, preceding))


def sender_tlvs(tlvs: list[Tlv], crypto: StampCrypto | None, seq: int) -> bytes:
    """Encode a sender's TLV list, appending the HMAC TLV when a key is given."""
    body = encode_tlvs(tlvs)
    if crypto is not None and tlvs:
        body += hmac_tlv(crypto, seq.to_bytes(4, "big"), body).encode()
    return body


def verify_hmac_tlv(tlvs: list[Tlv], raw: bytes, crypto: StampCrypto, seq_bytes: bytes) -> bool | None:
    """None if there is no HMAC TLV; else whether it verifies. ``raw`` are the TLV octets as received."""
    if not tlvs or tlvs[-1].type != T_HMAC:
        return None
    last = tlvs[-1]
    if len(last.value) != HMAC_LEN:
        return False
    preceding = raw[: len(raw) - 4 - len(last.value)]
    return crypto.verify(last.value, seq_bytes, preceding)


class ReflectedTlvs(NamedTuple):
    data: bytes  # the reflector's TLV octets
    reply_dscp: int | None  # DSCP1 the sender asked for on the reverse path (CoS TLV)
    hmac_ok: bool | None  # None: no HMAC TLV


def reflect_tlvs(
    raw: bytes,
    *,
    rx_seq_bytes: bytes,
    reply_seq_bytes: bytes,
    crypto: StampCrypto | None,
    ts_info: tuple[int, int, int, int],
    rx_tos: int | None,
    counters: tuple[int, int] | None = None,
) -> ReflectedTlvs:
    """The reflector side of RFC 8972: fill what we know, flag what we do not.

    ``raw`` must be a well-formed TLV block (the caller falls back to plain padding
    when :func:`parse_tlvs` fails). ``counters``: (packets received, packets sent including
    this reply) for the Direct Measurement TLV.
    """
    tlvs = parse_tlvs(raw)
    hmac_ok: bool | None = None
    if crypto is not None:
        hmac_ok = verify_hmac_tlv(tlvs, raw, crypto, rx_seq_bytes)
    reply_dscp: int | None = None
    out: list[bytes] = []
    for t in tlvs:
        typ, flags, value = t.type, t.flags & ~(FLAG_U | FLAG_M | FLAG_I), t.value
        if typ == T_HMAC:
            continue  # rebuilt below over the reply
        if typ == T_EXTRA_PADDING:
            pass  # reflected as received (same length keeps the sizes symmetric)
        elif typ == T_TIMESTAMP_INFO:
            if len(value) == 4:
                value = bytes(ts_info)
            else:
                flags |= FLAG_M
        elif typ == T_DIRECT_MEASUREMENT:
            # RFC 8972 §4.5: S_TxC(4) kept, R_RxC(4) and R_TxC(4) filled by the reflector.
            if len(value) == 12 and counters is not None:
                value = value[:4] + (counters[0] & 0xFFFFFFFF).to_bytes(4, "big") + (
                    counters[1] & 0xFFFFFFFF).to_bytes(4, "big")
            else:
                flags |= FLAG_M
        elif typ == T_CLASS_OF_SERVICE:
            if len(value) == 4:
                dscp1, _d2, _ecn, _rp = parse_class_of_service(value)
                tos = rx_tos if rx_tos is not None else 0
                # RP = 0: the reflected packet carries DSCP1 (the UDP adapter sets it).
                value = class_of_service(dscp1, tos >> 2, tos & 3, 0).value
                reply_dscp = dscp1
            else:
                flags |= FLAG_M
        else:
            flags |= FLAG_U
        out.append(_HDR.pack(flags, typ, len(value)) + value)
    body = b"".join(out)
    if tlvs and tlvs[-1].type == T_HMAC:
        flags = FLAG_I if hmac_ok is False else 0
        if crypto is not None and len(tlvs[-1].value) == HMAC_LEN:
            body += hmac_tlv(crypto, reply_seq_bytes, body, flags).encode()
        else:
            # No key, or a wrong-sized HMAC TLV (rebuilding it would make the reply longer
            # than the request): we cannot vouch for it; reflect it unrecognized-as-unverifiable.
            body += _HDR.pack(tlvs[-1].flags | FLAG_U, T_HMAC, len(tlvs[-1].value)) + tlvs[-1].value
    return ReflectedTlvs(body, reply_dscp, hmac_ok)
