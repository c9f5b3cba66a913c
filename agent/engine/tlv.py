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
    follow_up: bytes | None = None,
) -> ReflectedTlvs:
    """The reflector side of RFC 8972: fill what we know, flag what we do not.

    ``raw`` must be a well-formed TLV block (the caller falls back to plain padding
    when :func:`parse_tlvs` fails). ``counters``: (packets received, packets sent including
    this reply) for the Direct Measurement TLV. ``follow_up``: the 16-octet Follow-Up
    Telemetry value (RFC 8972 §4.7, agent.engine.followup) when this reflector keeps TX stamps;
    None answers the TLV as unrecognized.
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
        elif typ == T_FOLLOW_UP and follow_up is not None:
            if len(value) == len(follow_up):
                value = follow_up
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


# ---------------------------------------------------------------------------- sender-side TLVs
# Builders for the RFC 8972 TLVs a Session-Sender sets, and a reader of the reflector's answers.
# The Location (§4.2) and Access Report (§4.6) layouts follow the implementations cited in
# docs/wire-format.md (the RFC text itself was not reachable); the sender sends them zeroed
# and lets the reflector fill them.

T_NAMES = {T_EXTRA_PADDING: "extra-padding", T_LOCATION: "location", T_TIMESTAMP_INFO: "timestamp-info",
           T_CLASS_OF_SERVICE: "cos", T_DIRECT_MEASUREMENT: "direct-measurement",
           T_ACCESS_REPORT: "access-report", T_FOLLOW_UP: "follow-up", T_HMAC: "hmac"}
_SYNC_NAMES = {0: "unknown", SYNC_NTP: "ntp", SYNC_PTP: "ptp", SYNC_SSU_BITS: "ssu/bits", SYNC_GPS: "gps",
               SYNC_FREE_RUNNING: "free-running"}
_METHOD_NAMES = {0: "unknown", METHOD_HW: "hw", METHOD_SW: "sw", METHOD_CONTROL_PLANE: "control-plane"}


def location(dst_port: int = 0, src_port: int = 0) -> Tlv:
    """RFC 8972 §4.2 Location: Destination Port(2) Source Port(2), no sub-TLVs asked for."""
    return Tlv(0, T_LOCATION, struct.pack("!HH", dst_port & 0xFFFF, src_port & 0xFFFF))


def access_report(ident: int = 0, return_code: int = 0) -> Tlv:
    """RFC 8972 §4.6 Access Report: ID(4 bits) Resv(4 bits) Return Code(1) Reserved(2)."""
    return Tlv(0, T_ACCESS_REPORT, bytes((((ident & 0xF) << 4), return_code & 0xFF, 0, 0)))


def follow_up_request() -> Tlv:
    """RFC 8972 §4.7 Follow-Up Telemetry as the sender sends it: Length 16, value zero."""
    return Tlv(0, T_FOLLOW_UP, bytes(16))


def describe_tlvs(raw: bytes) -> list[dict[str, object]]:
    """The reflector's TLV answers, decoded for display/JSON; never raises on wire content."""
    try:
        tlvs = parse_tlvs(raw)
    except PacketError:
        return [{"type": "malformed", "octets": len(raw)}] if raw.count(0) != len(raw) else []
    out: list[dict[str, object]] = []
    for t in tlvs:
        d: dict[str, object] = {"type": T_NAMES.get(t.type, str(t.type)), "length": len(t.value)}
        flags = [n for bit, n in ((FLAG_U, "U"), (FLAG_M, "M"), (FLAG_I, "I")) if t.flags & bit]
        if flags:
            d["flags"] = "".join(flags)
        v = t.value
        if t.type == T_TIMESTAMP_INFO and len(v) == 4:
            d.update(sync_in=_SYNC_NAMES.get(v[0], str(v[0])), method_in=_METHOD_NAMES.get(v[1], str(v[1])),
                     sync_out=_SYNC_NAMES.get(v[2], str(v[2])), method_out=_METHOD_NAMES.get(v[3], str(v[3])))
        elif t.type == T_CLASS_OF_SERVICE and len(v) == 4:
            d1, d2, ecn, rp = parse_class_of_service(v)
            d.update(dscp1=d1, dscp2=d2, ecn=ecn, rp=rp)
        elif t.type == T_DIRECT_MEASUREMENT and len(v) == 12:
            s, rr, rt = struct.unpack("!III", v)
            d.update(s_txc=s, r_rxc=rr, r_txc=rt)
        elif t.type == T_FOLLOW_UP and len(v) == 16:
            seq, ts, mode = struct.unpack_from("!IQB", v)
            d.update(seq=seq, timestamp=ts, mode=_METHOD_NAMES.get(mode, str(mode)))
        elif t.type == T_LOCATION and len(v) >= 4:
            d.update(dst_port=int.from_bytes(v[:2], "big"), src_port=int.from_bytes(v[2:4], "big"))
        elif t.type == T_ACCESS_REPORT and len(v) == 4:
            d.update(id=v[0] >> 4, return_code=v[1])
        out.append(d)
    return out


def format_tlv_answers(answers: list[dict[str, object]]) -> str:
    """One short human string: ``ts-info[sync ntp, in sw, out sw] cos[dscp1 46 dscp2 0]``."""
    parts = []
    for a in answers:
        typ = str(a["type"])
        if typ in ("extra-padding", "hmac") and "flags" not in a:
            continue
        fields = [f"{k} {v}" for k, v in a.items() if k not in ("type", "length")]
        parts.append(f"{typ}[{', '.join(fields)}]" if fields else typ)
    return " ".join(parts)
