"""Start-Sessions, Stop-Sessions and their acks, and RFC 5938 Start/Stop-N-Sessions
(RFC 4656 §3.7–3.8, RFC 5357 §3.7–3.8, RFC 5938 §3)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from agent.control.messages.base import (
    CMD_START_N_ACK,
    CMD_START_N_SESSIONS,
    CMD_START_SESSIONS,
    CMD_STOP_N_ACK,
    CMD_STOP_N_SESSIONS,
    CMD_STOP_SESSIONS,
    HMAC_LEN,
    SID_LEN,
    ProtocolError,
    _check_accept,
    read_accept,
    _fixed,
    _need,
    _pad16,
    _u32,
)

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
        return cls(read_accept(_need(data, 32, "Start-Ack")[0]))


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
        return cls(read_accept(accept), n, tuple(descs))


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
        return cls(sids, read_accept(accept) if cls.HAS_ACCEPT else 0)


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


