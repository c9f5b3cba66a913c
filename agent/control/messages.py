"""O/TWAMP-Control message codecs (RFC 4656 §3, RFC 5357 §3, RFC 5938 §3).

Every message is a frozen dataclass with ``pack() -> bytes`` (plaintext, HMAC
fields zero) and ``unpack(bytes) -> message``. HMAC fields are never filled or
checked here: which octets an HMAC covers depends on the whole direction of the
stream (RFC 4656 §3.2), so :mod:`agent.control.security` does that, using each
message's ``hmac_offsets()``. Malformed input raises :class:`ProtocolError` and
nothing else.

Encoders are strict (they refuse values that do not fit), decoders are strict on
sizes and enumerated values but ignore MBZ contents (lenient, so future uses of
those octets do not break us). RFC 6038's fields in formerly MBZ octets are decoded.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import ClassVar, Union

from agent.timefmt import ErrorEstimate

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

BLOCK = 16
HMAC_LEN = 16
SID_LEN = 16
KEYID_LEN = 80
TOKEN_LEN = 64


class ProtocolError(Exception):
    """Malformed or unexpected O/TWAMP-Control input. Never carries key material."""


# Command numbers: RFC 4656 §3.4, RFC 5357 §8.2 (TWAMP registry), RFC 5938 §3.
CMD_REQUEST_SESSION = 1  # OWAMP only; "Forbidden" in TWAMP
CMD_START_SESSIONS = 2
CMD_STOP_SESSIONS = 3
CMD_FETCH_SESSION = 4  # OWAMP only; reserved in TWAMP
CMD_REQUEST_TW_SESSION = 5
CMD_EXPERIMENTATION = 6
CMD_START_N_SESSIONS = 7
CMD_START_N_ACK = 8
CMD_STOP_N_SESSIONS = 9
CMD_STOP_N_ACK = 10

# Accept values: RFC 4656 §3.3, same in RFC 5357.
ACCEPT_OK = 0
ACCEPT_FAILURE = 1
ACCEPT_INTERNAL_ERROR = 2
ACCEPT_NOT_SUPPORTED = 3
ACCEPT_PERMANENT_LIMIT = 4
ACCEPT_TEMPORARY_LIMIT = 5
ACCEPT_NAMES = {
    0: "OK",
    1: "failure",
    2: "internal error",
    3: "not supported",
    4: "permanent resource limitation",
    5: "temporary resource limitation",
}


def _check_accept(v: int) -> int:
    if v not in ACCEPT_NAMES:
        raise ProtocolError(f"invalid Accept value {v}")
    return v


def _need(data: bytes | memoryview, n: int, what: str) -> bytes:
    if len(data) != n:
        raise ProtocolError(f"{what}: expected {n} octets, got {len(data)}")
    return bytes(data)


def _fixed(b: bytes, n: int, what: str) -> bytes:
    if not isinstance(b, (bytes, bytearray)) or len(b) != n:
        raise ValueError(f"{what} must be {n} octets")
    return bytes(b)


def _u32(v: int, what: str) -> int:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{what} out of range")
    return v


def _pad16(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


# --- Type-P descriptor (RFC 4656 §3.5) -------------------------------------------------------
# First two bits 00: the next six bits are the DSCP. 01: the next 16 bits are a PHB ID.


def typep_from_dscp(dscp: int) -> int:
    if not 0 <= dscp < 64:
        raise ValueError("DSCP must be 0..63")
    return dscp << 24


def dscp_from_typep(typep: int) -> int | None:
    """The requested DSCP, or None when the descriptor is not a DSCP one (PHB ID or reserved)."""
    if typep >> 30 != 0:
        return None
    return (typep >> 24) & 0x3F


# --- Handshake messages (RFC 4656 §3.1) ------------------------------------------------------

_GREETING = struct.Struct("!12sI16s16sI12s")


@dataclass(frozen=True, slots=True)
class ServerGreeting:
    """Server-Greeting, 64 octets. ``unused`` is the 12-octet Unused field: all zero in
    classic modes; xwamp's IPsec-bound modes carry SPI(4) and protocol(1) there
    (see :meth:`with_ipsec_hint`)."""

    SIZE: ClassVar[int] = 64

    modes: int
    challenge: bytes
    salt: bytes
    count: int
    unused: bytes = bytes(12)

    def __post_init__(self) -> None:
        _u32(self.modes, "modes")
        _u32(self.count, "count")
        _fixed(self.challenge, 16, "challenge")
        _fixed(self.salt, 16, "salt")
        _fixed(self.unused, 12, "unused")

    def pack(self) -> bytes:
        return _GREETING.pack(self.unused, self.modes, self.challenge, self.salt, self.count, bytes(12))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "ServerGreeting":
        unused, modes, challenge, salt, count, _mbz = _GREETING.unpack(_need(data, 64, "Server-Greeting"))
        return cls(modes, challenge, salt, count, unused)

    # The IPsec hint: SPI (4 octets, network order) then IP protocol (1 octet, 50 ESP / 51 AH).
    def with_ipsec_hint(self, spi: int, proto: int) -> "ServerGreeting":
        unused = struct.pack("!IB", _u32(spi, "spi"), proto & 0xFF) + bytes(7)
        return ServerGreeting(self.modes, self.challenge, self.salt, self.count, unused)

    @property
    def ipsec_hint(self) -> tuple[int, int] | None:
        """(SPI, proto) if the Unused field carries one, else None."""
        if not any(self.unused):
            return None
        spi, proto = struct.unpack_from("!IB", self.unused)
        return spi, proto


_SETUP = struct.Struct("!I80s64s16s")


@dataclass(frozen=True, slots=True)
class SetUpResponse:
    """Set-Up-Response, 164 octets. KeyID is UTF-8, zero padded (RFC 4656 §3.1)."""

    SIZE: ClassVar[int] = 164

    mode: int
    key_id: str = ""
    token: bytes = bytes(TOKEN_LEN)
    client_iv: bytes = bytes(16)

    def __post_init__(self) -> None:
        _u32(self.mode, "mode")
        if len(self.key_id.encode("utf-8")) > KEYID_LEN:
            raise ValueError("KeyID longer than 80 octets")
        _fixed(self.token, TOKEN_LEN, "token")
        _fixed(self.client_iv, 16, "client IV")

    def pack(self) -> bytes:
        return _SETUP.pack(self.mode, self.key_id.encode("utf-8"), self.token, self.client_iv)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "SetUpResponse":
        mode, kid, token, iv = _SETUP.unpack(_need(data, 164, "Set-Up-Response"))
        try:
            key_id = kid.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("KeyID is not UTF-8") from None
        return cls(mode, key_id, token, iv)

    def __repr__(self) -> str:  # the token is encrypted key material: keep it out of logs
        return f"SetUpResponse(mode={self.mode}, key_id={self.key_id!r})"


_SSTART = struct.Struct("!15sB16sQ8s")


@dataclass(frozen=True, slots=True)
class ServerStart:
    """Server-Start, 48 octets. The first 32 are always clear; the last block (Start-Time,
    MBZ) is the first block of the server's encrypted stream (RFC 4656 §3.1)."""

    SIZE: ClassVar[int] = 48
    CLEAR: ClassVar[int] = 32

    accept: int
    server_iv: bytes = bytes(16)
    start_time: int = 0  # NTP 64-bit

    def __post_init__(self) -> None:
        _check_accept(self.accept)
        _fixed(self.server_iv, 16, "server IV")

    def pack(self) -> bytes:
        return _SSTART.pack(bytes(15), self.accept, self.server_iv, self.start_time, bytes(8))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "ServerStart":
        _mbz, accept, iv, start, _mbz2 = _SSTART.unpack(_need(data, 48, "Server-Start"))
        return cls(_check_accept(accept), iv, start)


# --- Session requests (RFC 4656 §3.5, RFC 5357 §3.5) -----------------------------------------

_PREAMBLE = struct.Struct("!BBBBIIHH16s16s16sIQQI8s16s")  # 112 octets


@dataclass(frozen=True, slots=True)
class Slot:
    """One OWAMP schedule slot (RFC 4656 §3.5): type 0 = exponential with this mean,
    type 1 = fixed offset. ``value`` is an NTP-format duration (32.32 seconds)."""

    EXPONENTIAL: ClassVar[int] = 0
    FIXED: ClassVar[int] = 1

    kind: int
    value: int

    def __post_init__(self) -> None:
        if self.kind not in (0, 1):
            raise ValueError("slot type must be 0 (exponential) or 1 (fixed)")
        if not 0 <= self.value < 1 << 64:
            raise ValueError("slot value out of range")

    @classmethod
    def seconds(cls, kind: int, secs: float) -> "Slot":
        return cls(kind, int(round(secs * (1 << 32))))

    @property
    def secs(self) -> float:
        return self.value / (1 << 32)

    def pack(self) -> bytes:
        return struct.pack("!B7sQ", self.kind, bytes(7), self.value)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "Slot":
        kind, _mbz, value = struct.unpack("!B7sQ", _need(data, 16, "slot"))
        if kind not in (0, 1):
            raise ProtocolError(f"unknown slot type {kind}")
        return cls(kind, value)


def _addr_bytes(a: IPAddress, ipvn: int) -> bytes:
    if a.version != ipvn:
        raise ValueError("address family does not match IPVN")
    return a.packed.ljust(16, b"\0")


def _addr_from(raw: bytes, ipvn: int) -> IPAddress:
    if ipvn == 4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


@dataclass(frozen=True, slots=True)
class _RequestBase:
    """Fields shared by Request-Session and Request-TW-Session (the 112-octet preamble).

    A zero (unspecified) Sender or Receiver Address means "the address of the
    control connection's end" (RFC 5357 §3.5): see :meth:`resolved_addresses`.
    """

    sender_address: IPAddress = ipaddress.IPv4Address(0)
    receiver_address: IPAddress = ipaddress.IPv4Address(0)
    sender_port: int = 0
    receiver_port: int = 0
    sid: bytes = bytes(SID_LEN)
    padding_length: int = 0
    start_time: int = 0  # NTP 64-bit; 0 = as soon as possible
    timeout: int = 0  # NTP-format duration
    type_p: int = 0

    @property
    def ipvn(self) -> int:
        return self.sender_address.version

    @property
    def dscp(self) -> int | None:
        return dscp_from_typep(self.type_p)

    def _check(self) -> None:
        if self.sender_address.version != self.receiver_address.version:
            raise ValueError("sender and receiver addresses must be the same family")
        for p in (self.sender_port, self.receiver_port):
            if not 0 <= p <= 0xFFFF:
                raise ValueError("port out of range")
        _fixed(self.sid, SID_LEN, "SID")
        _u32(self.padding_length, "padding length")
        _u32(self.type_p, "Type-P")
        for t in (self.start_time, self.timeout):
            if not 0 <= t < 1 << 64:
                raise ValueError("timestamp out of range")

    def resolved_addresses(self, control_sender: IPAddress, control_receiver: IPAddress) -> tuple[IPAddress, IPAddress]:
        """Replace unspecified addresses by the control connection's addresses (RFC 5357 §3.5)."""
        s = control_sender if self.sender_address.is_unspecified else self.sender_address
        r = control_receiver if self.receiver_address.is_unspecified else self.receiver_address
        return s, r

    def _preamble(self, cmd: int, conf_sender: int, conf_receiver: int, nslots: int, npackets: int,
                  mbz: bytes = bytes(8)) -> bytes:
        v = self.ipvn
        return _PREAMBLE.pack(
            cmd, v & 0x0F, conf_sender, conf_receiver, nslots, npackets,
            self.sender_port, self.receiver_port,
            _addr_bytes(self.sender_address, v), _addr_bytes(self.receiver_address, v),
            self.sid, self.padding_length, self.start_time, self.timeout, self.type_p,
            mbz, bytes(HMAC_LEN),
        )

    @staticmethod
    def _parse_preamble(data: bytes) -> tuple:
        (cmd, ipvn_b, cs, cr, nslots, npackets, sport, rport, saddr, raddr, sid, pad,
         start, timeout, typep, _mbz, _hmac) = _PREAMBLE.unpack(data[:112])
        ipvn = ipvn_b & 0x0F  # upper nibble MBZ (older owamp wrote IPVN twice: tolerate)
        if ipvn not in (4, 6):
            raise ProtocolError(f"unsupported IPVN {ipvn}")
        return (cmd, ipvn, cs, cr, nslots, npackets, sport, rport,
                _addr_from(saddr, ipvn), _addr_from(raddr, ipvn), sid, pad, start, timeout, typep)


_REFLECT = struct.Struct("!HH4s")  # RFC 6038 §4.1: the first 4 of the 8 MBZ octets at 88


@dataclass(frozen=True, slots=True)
class RequestTWSession(_RequestBase):
    """Request-TW-Session (cmd 5), 112 octets (RFC 5357 §3.5). Conf-Sender, Conf-Receiver,
    Number of Schedule Slots and Number of Packets are all zero.

    RFC 6038 Reflect Octets (mode bit 32) uses the first four of the eight MBZ octets after
    Type-P: ``octets_to_reflect`` (2 octets at 88; the server copies them into Accept-Session's
    Reflected Octets) and ``reflect_length`` ("Length of padding to reflect", 2 octets at 90;
    how many octets of the sender's padding come back in each reflector packet). Zero when
    the mode was not negotiated (docs/protocol-interop.md lists the sources of the offsets).
    """

    SIZE: ClassVar[int] = 112
    COMMAND: ClassVar[int] = CMD_REQUEST_TW_SESSION

    octets_to_reflect: int = 0
    reflect_length: int = 0

    def __post_init__(self) -> None:
        self._check()
        for v in (self.octets_to_reflect, self.reflect_length):
            if not 0 <= v <= 0xFFFF:
                raise ValueError("RFC 6038 fields are 16-bit")

    def pack(self) -> bytes:
        return self._preamble(CMD_REQUEST_TW_SESSION, 0, 0, 0, 0,
                              _REFLECT.pack(self.octets_to_reflect, self.reflect_length, bytes(4)))

    @staticmethod
    def hmac_offsets(n: int | None = None) -> tuple[int, ...]:
        return (96,)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "RequestTWSession":
        data = _need(data, 112, "Request-TW-Session")
        cmd, ipvn, cs, cr, nslots, npackets, sport, rport, sa, ra, sid, pad, start, to, tp = cls._parse_preamble(data)
        if cmd != CMD_REQUEST_TW_SESSION:
            raise ProtocolError("not a Request-TW-Session")
        if cs or cr or nslots or npackets:
            # perfSONAR refuses these too: in TWAMP the roles and schedule are implied.
            raise ProtocolError("Request-TW-Session with Conf-Sender/Receiver, slots or packets set")
        octets, length, _mbz = _REFLECT.unpack_from(data, 88)
        return cls(sa, ra, sport, rport, sid, pad, start, to, tp, octets, length)


@dataclass(frozen=True, slots=True)
class RequestSession(_RequestBase):
    """Request-Session (OWAMP cmd 1): 112-octet preamble with an HMAC at 96, then one
    16-octet block per schedule slot, then a second HMAC (RFC 4656 §3.5).

    ``conf_receiver`` set means the server is to receive (the client sends);
    ``conf_sender`` set means the server is to send.
    """

    COMMAND: ClassVar[int] = CMD_REQUEST_SESSION
    MAX_SLOTS: ClassVar[int] = 1 << 16  # a decoder limit against absurd allocations

    conf_sender: bool = False
    conf_receiver: bool = True
    num_packets: int = 0
    slots: tuple[Slot, ...] = ()

    def __post_init__(self) -> None:
        self._check()
        if self.conf_sender == self.conf_receiver:
            raise ValueError("exactly one of conf_sender / conf_receiver must be set")
        _u32(self.num_packets, "number of packets")
        if not self.slots:
            raise ValueError("Request-Session needs at least one schedule slot")

    @property
    def size(self) -> int:
        return 112 + BLOCK * len(self.slots) + HMAC_LEN

    def pack(self) -> bytes:
        pre = self._preamble(CMD_REQUEST_SESSION, int(self.conf_sender), int(self.conf_receiver),
                             len(self.slots), self.num_packets)
        return pre + b"".join(s.pack() for s in self.slots) + bytes(HMAC_LEN)

    def hmac_offsets(self) -> tuple[int, ...]:
        return (96, 112 + BLOCK * len(self.slots))

    @staticmethod
    def length_from_first_block(block: bytes) -> int:
        nslots = struct.unpack_from("!I", block, 4)[0]
        if nslots > RequestSession.MAX_SLOTS:
            raise ProtocolError("too many schedule slots")
        return 112 + BLOCK * nslots + HMAC_LEN

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "RequestSession":
        data = bytes(data)
        if len(data) < 112:
            raise ProtocolError("Request-Session truncated")
        cmd, ipvn, cs, cr, nslots, npackets, sport, rport, sa, ra, sid, pad, start, to, tp = cls._parse_preamble(data)
        if cmd != CMD_REQUEST_SESSION:
            raise ProtocolError("not a Request-Session")
        if nslots == 0 or nslots > cls.MAX_SLOTS:
            raise ProtocolError("Request-Session slot count invalid")
        _need(data, 112 + BLOCK * nslots + HMAC_LEN, "Request-Session")
        if cs > 1 or cr > 1 or cs == cr:
            raise ProtocolError("Request-Session: exactly one of Conf-Sender/Conf-Receiver must be 1")
        slots = tuple(Slot.unpack(data[112 + BLOCK * i: 128 + BLOCK * i]) for i in range(nslots))
        return cls(sa, ra, sport, rport, sid, pad, start, to, tp, bool(cs), bool(cr), npackets, slots)


_ACCEPT = struct.Struct("!BBH16sHH8s16s")


@dataclass(frozen=True, slots=True)
class AcceptSession:
    """Accept-Session, 48 octets, HMAC at 32 (RFC 4656 §3.5, RFC 5357 §3.5).

    RFC 6038 (Reflect Octets) uses the first four of the 12 MBZ octets after the SID:
    ``reflected_octets`` (2 at 20, the request's Octets to be reflected, echoed) and
    ``server_octets`` (2 at 22: octets the Session-Sender puts first in the padding to be
    reflected; 0 when the server needs none)."""

    SIZE: ClassVar[int] = 48

    accept: int
    port: int = 0
    sid: bytes = bytes(SID_LEN)
    reflected_octets: int = 0
    server_octets: int = 0

    def __post_init__(self) -> None:
        _check_accept(self.accept)
        for v in (self.port, self.reflected_octets, self.server_octets):
            if not 0 <= v <= 0xFFFF:
                raise ValueError("port / RFC 6038 octets out of range")
        _fixed(self.sid, SID_LEN, "SID")

    def pack(self) -> bytes:
        return _ACCEPT.pack(self.accept, 0, self.port, self.sid, self.reflected_octets, self.server_octets,
                            bytes(8), bytes(16))

    @staticmethod
    def hmac_offsets() -> tuple[int, ...]:
        return (32,)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "AcceptSession":
        accept, _mbz, port, sid, refl, srv, _mbz2, _hmac = _ACCEPT.unpack(_need(data, 48, "Accept-Session"))
        return cls(_check_accept(accept), port, sid, refl, srv)


# --- Start / Stop (RFC 4656 §3.7, §3.8; RFC 5357 §3.7, §3.8) ---------------------------------


@dataclass(frozen=True, slots=True)
class StartSessions:
    SIZE: ClassVar[int] = 32
    COMMAND: ClassVar[int] = CMD_START_SESSIONS

    def pack(self) -> bytes:
        return bytes([CMD_START_SESSIONS]) + bytes(31)

    @staticmethod
    def hmac_offsets() -> tuple[int, ...]:
        return (16,)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "StartSessions":
        if _need(data, 32, "Start-Sessions")[0] != CMD_START_SESSIONS:
            raise ProtocolError("not a Start-Sessions")
        return cls()


@dataclass(frozen=True, slots=True)
class StartAck:
    SIZE: ClassVar[int] = 32

    accept: int

    def __post_init__(self) -> None:
        _check_accept(self.accept)

    def pack(self) -> bytes:
        return bytes([self.accept]) + bytes(31)

    @staticmethod
    def hmac_offsets() -> tuple[int, ...]:
        return (16,)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "StartAck":
        return cls(_check_accept(_need(data, 32, "Start-Ack")[0]))


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """One OWAMP Stop-Sessions session description (RFC 4656 §3.8): SID, Next Seqno,
    skip ranges [(first, last), ...]; 24 + 8n octets padded to a block."""

    sid: bytes
    next_seqno: int
    skip_ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        _fixed(self.sid, SID_LEN, "SID")
        _u32(self.next_seqno, "next seqno")
        for a, b in self.skip_ranges:
            _u32(a, "skip range")
            _u32(b, "skip range")

    @property
    def size(self) -> int:
        return _pad16(24 + 8 * len(self.skip_ranges))

    def pack(self) -> bytes:
        body = self.sid + struct.pack("!II", self.next_seqno, len(self.skip_ranges))
        body += b"".join(struct.pack("!II", a, b) for a, b in self.skip_ranges)
        return body.ljust(self.size, b"\0")

    @staticmethod
    def length_at(buf: bytes, off: int) -> int | None:
        """Size of the description starting at ``off``, or None if more data is needed."""
        if len(buf) < off + 24:
            return None
        nskip = struct.unpack_from("!I", buf, off + 20)[0]
        if nskip > StopSessions.MAX_SKIP_RANGES:
            raise ProtocolError("too many skip ranges")
        return _pad16(24 + 8 * nskip)

    @classmethod
    def unpack_at(cls, buf: bytes, off: int) -> tuple["SessionDescription", int]:
        n = cls.length_at(buf, off)
        if n is None or len(buf) < off + n:
            raise ProtocolError("session description truncated")
        sid = buf[off: off + 16]
        nxt, nskip = struct.unpack_from("!II", buf, off + 16)
        ranges = tuple(struct.unpack_from("!II", buf, off + 24 + 8 * i) for i in range(nskip))
        return cls(sid, nxt, ranges), off + n


@dataclass(frozen=True, slots=True)
class StopSessions:
    """Stop-Sessions (cmd 3). TWAMP: 32 octets, Number of Sessions is the real count of
    sessions being stopped (perfSONAR's twampd refuses a mismatch, including 0).
    OWAMP: header, one :class:`SessionDescription` per session the client sent, HMAC."""

    COMMAND: ClassVar[int] = CMD_STOP_SESSIONS
    MAX_SESSIONS: ClassVar[int] = 4096
    MAX_SKIP_RANGES: ClassVar[int] = 1 << 16

    accept: int
    num_sessions: int
    descriptions: tuple[SessionDescription, ...] = ()

    def __post_init__(self) -> None:
        _check_accept(self.accept)
        _u32(self.num_sessions, "number of sessions")
        if self.descriptions and len(self.descriptions) != self.num_sessions:
            raise ValueError("number of sessions must match the session descriptions")

    @property
    def size(self) -> int:
        return 16 + sum(d.size for d in self.descriptions) + HMAC_LEN

    def pack(self) -> bytes:
        head = struct.pack("!BBHI8s", CMD_STOP_SESSIONS, self.accept, 0, self.num_sessions, bytes(8))
        return head + b"".join(d.pack() for d in self.descriptions) + bytes(HMAC_LEN)

    def hmac_offsets(self) -> tuple[int, ...]:
        return (self.size - HMAC_LEN,)

    @classmethod
    def needed_length(cls, buf: bytes, owamp: bool) -> int | None:
        """Total length of the Stop-Sessions at the start of ``buf``, or None if more is needed."""
        if len(buf) < 16:
            return None
        if not owamp:
            return 32
        n = struct.unpack_from("!I", buf, 4)[0]
        if n > cls.MAX_SESSIONS:
            raise ProtocolError("Stop-Sessions: too many sessions")
        off = 16
        for _ in range(n):
            ln = SessionDescription.length_at(buf, off)
            if ln is None:
                return None
            off += ln
        return off + HMAC_LEN

    @classmethod
    def unpack(cls, data: bytes | memoryview, owamp: bool = False) -> "StopSessions":
        data = bytes(data)
        total = cls.needed_length(data, owamp)
        if total is None or total != len(data):
            raise ProtocolError("Stop-Sessions length mismatch")
        cmd, accept, _mbz, n, _mbz2 = struct.unpack_from("!BBHI8s", data)
        if cmd != CMD_STOP_SESSIONS:
            raise ProtocolError("not a Stop-Sessions")
        descs: list[SessionDescription] = []
        if owamp:
            off = 16
            for _ in range(n):
                d, off = SessionDescription.unpack_at(data, off)
                descs.append(d)
        return cls(_check_accept(accept), n, tuple(descs))


# --- Fetch-Session (OWAMP, RFC 4656 §3.8) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchSession:
    """Fetch-Session (cmd 4), 48 octets, HMAC at 32. Begin 0 / End 0xFFFFFFFF = everything."""

    SIZE: ClassVar[int] = 48
    COMMAND: ClassVar[int] = CMD_FETCH_SESSION

    sid: bytes
    begin_seq: int = 0
    end_seq: int = 0xFFFFFFFF

    def __post_init__(self) -> None:
        _fixed(self.sid, SID_LEN, "SID")
        _u32(self.begin_seq, "begin seq")
        _u32(self.end_seq, "end seq")

    def pack(self) -> bytes:
        return struct.pack("!B7sII16s16s", CMD_FETCH_SESSION, bytes(7), self.begin_seq, self.end_seq, self.sid, bytes(16))

    @staticmethod
    def hmac_offsets() -> tuple[int, ...]:
        return (32,)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "FetchSession":
        cmd, _mbz, b, e, sid, _h = struct.unpack("!B7sII16s16s", _need(data, 48, "Fetch-Session"))
        if cmd != CMD_FETCH_SESSION:
            raise ProtocolError("not a Fetch-Session")
        return cls(sid, b, e)


@dataclass(frozen=True, slots=True)
class FetchAck:
    """Fetch-Ack, 32 octets, HMAC at 16. When Accept is 0 the server then sends the
    original Request-Session, the skip ranges and the data records (see
    :class:`FetchSkipRanges`, :class:`FetchRecords`)."""

    SIZE: ClassVar[int] = 32

    accept: int
    finished: bool = False
    next_seqno: int = 0
    num_skip_ranges: int = 0
    num_records: int = 0

    def __post_init__(self) -> None:
        _check_accept(self.accept)
        for v in (self.next_seqno, self.num_skip_ranges, self.num_records):
            _u32(v, "Fetch-Ack field")

    def pack(self) -> bytes:
        return struct.pack("!BBHIII16s", self.accept, int(self.finished), 0, self.next_seqno,
                           self.num_skip_ranges, self.num_records, bytes(16))

    @staticmethod
    def hmac_offsets() -> tuple[int, ...]:
        return (16,)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "FetchAck":
        a, fin, _mbz, nxt, nskip, nrec, _h = struct.unpack("!BBHIII16s", _need(data, 32, "Fetch-Ack"))
        if fin > 1:
            raise ProtocolError("Fetch-Ack Finished must be 0 or 1")
        return cls(_check_accept(a), bool(fin), nxt, nskip, nrec)


@dataclass(frozen=True, slots=True)
class FetchSkipRanges:
    """The skip ranges part of a Fetch-Session answer: 8 octets each, zero padded to a
    block, then an HMAC (RFC 4656 §3.8)."""

    ranges: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def size_for(n: int) -> int:
        return _pad16(8 * n) + HMAC_LEN

    def pack(self) -> bytes:
        body = b"".join(struct.pack("!II", _u32(a, "skip"), _u32(b, "skip")) for a, b in self.ranges)
        return body.ljust(_pad16(len(body)), b"\0") + bytes(HMAC_LEN)

    def hmac_offsets(self) -> tuple[int, ...]:
        return (_pad16(8 * len(self.ranges)),)

    @classmethod
    def unpack(cls, data: bytes | memoryview, n: int) -> "FetchSkipRanges":
        data = _need(data, cls.size_for(n), "skip ranges")
        return cls(tuple(struct.unpack_from("!II", data, 8 * i) for i in range(n)))


_REC = struct.Struct("!IHHQQB")  # 25 octets


@dataclass(frozen=True, slots=True)
class DataRecord:
    """One OWAMP packet record (RFC 4656 §3.8), 25 octets: Seq, Send ErrEst, Recv ErrEst,
    Send Timestamp, Recv Timestamp, TTL. TTL 255 = not recorded."""

    seq: int
    send_time: int
    send_error: ErrorEstimate
    recv_time: int  # 0 = lost
    recv_error: ErrorEstimate
    ttl: int = 255

    SIZE: ClassVar[int] = 25

    def pack(self) -> bytes:
        return _REC.pack(self.seq, self.send_error.pack(), self.recv_error.pack(), self.send_time, self.recv_time, self.ttl)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "DataRecord":
        seq, se, re_, st, rt, ttl = _REC.unpack(_need(data, 25, "data record"))
        return cls(seq, st, ErrorEstimate.unpack(se), rt, ErrorEstimate.unpack(re_), ttl)

    @property
    def lost(self) -> bool:
        return self.recv_time == 0


@dataclass(frozen=True, slots=True)
class FetchRecords:
    """The data records part of a Fetch-Session answer: 25 octets each, padded, HMAC."""

    records: tuple[DataRecord, ...] = ()

    @staticmethod
    def size_for(n: int) -> int:
        return _pad16(25 * n) + HMAC_LEN

    def pack(self) -> bytes:
        body = b"".join(r.pack() for r in self.records)
        return body.ljust(_pad16(len(body)), b"\0") + bytes(HMAC_LEN)

    def hmac_offsets(self) -> tuple[int, ...]:
        return (_pad16(25 * len(self.records)),)

    @classmethod
    def unpack(cls, data: bytes | memoryview, n: int) -> "FetchRecords":
        data = _need(data, cls.size_for(n), "data records")
        return cls(tuple(DataRecord.unpack(data[25 * i: 25 * i + 25]) for i in range(n)))


# --- Individual session control (RFC 5938 §3) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _NSessions:
    """Start-N-Sessions (7), Start-N-Ack (8), Stop-N-Sessions (9), Stop-N-Ack (10):
    cmd(1) Accept-or-MBZ(1) MBZ(10) Number of Sessions(4), then the SIDs, then HMAC.

    Unlike Stop-Sessions, Number of Sessions closes the first block (offset 12). The
    RFC 5938 figures could not be read here; this matches an independent implementation
    (see the report), not the RFC text itself.
    """

    COMMAND: ClassVar[int] = 0
    HAS_ACCEPT: ClassVar[bool] = False
    MAX: ClassVar[int] = 4096

    sids: tuple[bytes, ...] = ()
    accept: int = 0

    def __post_init__(self) -> None:
        for s in self.sids:
            _fixed(s, SID_LEN, "SID")
        _check_accept(self.accept)
        if self.accept and not self.HAS_ACCEPT:
            raise ValueError("this message has no Accept field")

    @property
    def size(self) -> int:
        return 16 + SID_LEN * len(self.sids) + HMAC_LEN

    def pack(self) -> bytes:
        head = struct.pack("!BB10sI", self.COMMAND, self.accept, bytes(10), len(self.sids))
        return head + b"".join(self.sids) + bytes(HMAC_LEN)

    def hmac_offsets(self) -> tuple[int, ...]:
        return (self.size - HMAC_LEN,)

    @classmethod
    def needed_length(cls, buf: bytes) -> int | None:
        if len(buf) < 16:
            return None
        n = struct.unpack_from("!I", buf, 12)[0]
        if n > cls.MAX:
            raise ProtocolError("too many sessions")
        return 16 + SID_LEN * n + HMAC_LEN

    @classmethod
    def unpack(cls, data: bytes | memoryview):
        data = bytes(data)
        if cls.needed_length(data) != len(data):
            raise ProtocolError(f"{cls.__name__} length mismatch")
        cmd, accept, _mbz, n = struct.unpack_from("!BB10sI", data)
        if cmd != cls.COMMAND:
            raise ProtocolError(f"not a {cls.__name__}")
        sids = tuple(data[16 + SID_LEN * i: 32 + SID_LEN * i] for i in range(n))
        return cls(sids, _check_accept(accept) if cls.HAS_ACCEPT else 0)


@dataclass(frozen=True, slots=True)
class StartNSessions(_NSessions):
    COMMAND: ClassVar[int] = CMD_START_N_SESSIONS


@dataclass(frozen=True, slots=True)
class StartNAck(_NSessions):
    COMMAND: ClassVar[int] = CMD_START_N_ACK
    HAS_ACCEPT: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class StopNSessions(_NSessions):
    COMMAND: ClassVar[int] = CMD_STOP_N_SESSIONS


@dataclass(frozen=True, slots=True)
class StopNAck(_NSessions):
    COMMAND: ClassVar[int] = CMD_STOP_N_ACK
    HAS_ACCEPT: ClassVar[bool] = True


# --- SID (RFC 4656 §3.5) ---------------------------------------------------------------------


def make_sid(receiver: IPAddress, ntp_now: int, rand: bytes | None = None) -> bytes:
    """SID = receiver IPv4 address (4; for IPv6 the receiver chooses 4 octets: we take the
    low 4 of the address) + NTP timestamp (8) + random (4)."""
    r = rand if rand is not None else os.urandom(4)
    return receiver.packed[-4:] + struct.pack("!Q", ntp_now) + _fixed(r, 4, "random")


ClientCommand = Union[RequestSession, RequestTWSession, StartSessions, StopSessions, FetchSession,
                      StartNSessions, StopNSessions]
