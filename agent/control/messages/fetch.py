"""Fetch-Session and its answer: skip ranges and data records (OWAMP, RFC 4656 §3.8–3.9)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from agent.control.messages.base import (
    CMD_FETCH_SESSION,
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
from agent.engine.timefmt import ErrorEstimate

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
        return cls(read_accept(a), bool(fin), nxt, nskip, nrec)


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


