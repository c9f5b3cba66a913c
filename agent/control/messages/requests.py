"""Session requests and their answers: Request-Session (OWAMP), Request-TW-Session (TWAMP),
Accept-Session, and the SID (RFC 4656 §3.5, RFC 5357 §3.5)."""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import ClassVar

from agent.control.messages.base import (
    BLOCK,
    CMD_REQUEST_SESSION,
    CMD_REQUEST_TW_SESSION,
    HMAC_LEN,
    SID_LEN,
    IPAddress,
    ProtocolError,
    _check_accept,
    read_accept,
    _fixed,
    _need,
    _u32,
    dscp_from_typep,
)

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
        if not (self.conf_sender or self.conf_receiver):
            raise ValueError("conf_sender or conf_receiver must be set")
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
        # RFC 4656 §3.5: "The server MUST interpret any non-zero value as 1" and "At least
        # one of Conf-Sender and Conf-Receiver MUST be 1" (both: the server refuses, Accept=3).
        if not cs and not cr:
            raise ProtocolError("Request-Session: neither Conf-Sender nor Conf-Receiver is set")
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
        return cls(read_accept(accept), port, sid, refl, srv)


# --- SID (RFC 4656 §3.5) ---------------------------------------------------------------------


def make_sid(receiver: IPAddress, ntp_now: int, rand: bytes | None = None) -> bytes:
    """SID = receiver IPv4 address (4; for IPv6 the receiver chooses 4 octets: we take the
    low 4 of the address) + NTP timestamp (8) + random (4)."""
    r = rand if rand is not None else os.urandom(4)
    return receiver.packed[-4:] + struct.pack("!Q", ntp_now) + _fixed(r, 4, "random")

