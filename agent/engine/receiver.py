"""Sans-IO OWAMP-Test receiver (RFC 4656 §4.2) and the Fetch-Session data records (§3.8).

The receiver checks each sender packet (length, HMAC in authenticated/encrypted
modes), and records Seq, the sender's Timestamp + Error Estimate, our receive time
(kernel RX stamp) + Error Estimate, and the received TTL. ``fetch_records`` encodes
them as the 25-octet records a Fetch-Session answer carries (Seq, Send and Receive
Error Estimates, Send and Receive Timestamps, TTL), with lost packets (no arrival)
as records whose Receive Timestamp is 0.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from agent.engine.clockerr import ErrSource, PackedErrorEstimate
from agent.engine.counters import Counters
from agent.engine.keys import TestKeys
from agent.engine.packets import (
    TTL_UNKNOWN,
    HmacError,
    PacketError,
    Proto,
    Security,
    decode_sender,
    session_crypto,
)
from agent.engine.timefmt import (
    ntp_from_unix_ns,
    ptp_from_unix_ns,
    unix_ns_from_ntp,
    unix_ns_from_ptp,
)

# RFC 4656 §3.8 data record (checked against perfSONAR's encoder):
# 0 Seq(4) 4 Send-ErrEst(2) 6 Recv-ErrEst(2) 8 Send-Timestamp(8) 16 Recv-Timestamp(8) 24 TTL(1)
FETCH_RECORD = struct.Struct("!IHHQQB")
assert FETCH_RECORD.size == 25


@dataclass(slots=True)
class ArrivalRecord:
    seq: int
    send_timestamp: int  # raw 64-bit, as the sender wrote it
    send_error: int  # packed
    recv_ns: int
    recv_timestamp: int  # raw 64-bit (NTP or PTP, like the sender's)
    recv_error: int  # packed
    ttl: int
    size: int
    recv_source: str = "sw"


@dataclass(slots=True)
class ReceiverCounters(Counters):
    received: int = 0
    recorded: int = 0
    short: int = 0
    bad_hmac: int = 0
    duplicates: int = 0
    out_of_range: int = 0  # seq >= expected count
    invalid_time: int = 0  # RFC 4656 §4.2: send time more than Timeout off


class OwampReceiver:
    """Receiver state of one OWAMP-Test session."""

    def __init__(
        self,
        security: Security = Security.UNAUTH,
        *,
        keys: TestKeys | None = None,
        ptp: bool = False,
        error_estimate: ErrSource = None,
        expected: int | None = None,
        timeout_s: float | None = None,
        schedule=None,
        start_ns: int | None = None,
    ) -> None:
        """``timeout_s`` (Request-Session Timeout) enables the RFC 4656 §4.2 validity tests:
        discard a packet whose send Timestamp is more than Timeout from its receive time,
        or (with ``schedule``, an agent.engine.sender.Schedule, and ``start_ns``) from its
        scheduled send time."""
        self.security = security
        self.expected = expected
        self._timeout_ns = None if timeout_s is None else round(timeout_s * 1e9)
        self._schedule = schedule
        self._start_ns = start_ns
        self.counters = ReceiverCounters()
        self._ts = ptp_from_unix_ns if ptp else ntp_from_unix_ns
        self._err = PackedErrorEstimate(error_estimate, ptp)
        self._err.get(time.time_ns())  # warm the cache: the first adjtimex read is slow
        self.crypto = session_crypto(Proto.OWAMP, security, keys)
        self.records: list[ArrivalRecord] = []
        self._seen: set[int] = set()

    def on_packet(self, data: bytes, rx_ns: int, ttl: int | None, rx_source: str = "sw") -> ArrivalRecord | None:
        c = self.counters
        c.received += 1
        try:
            p = decode_sender(data, Proto.OWAMP, self.security, self.crypto)
        except HmacError:
            c.bad_hmac += 1
            return None
        except PacketError:
            c.short += 1
            return None
        if self.expected is not None and p.seq >= self.expected:
            c.out_of_range += 1
            return None
        if self._timeout_ns is not None:
            sent_ns = (unix_ns_from_ptp if p.error_estimate & 0x4000 else unix_ns_from_ntp)(p.timestamp)
            late = abs(rx_ns - sent_ns) > self._timeout_ns
            if not late and self._schedule is not None and self._start_ns is not None:
                late = abs(sent_ns - (self._start_ns + self._schedule.offset_ns(p.seq))) > self._timeout_ns
            if late:
                c.invalid_time += 1
                return None
        if p.seq in self._seen:
            c.duplicates += 1  # RFC 4656 keeps duplicates as records too
        self._seen.add(p.seq)
        rec = ArrivalRecord(
            p.seq,
            p.timestamp,
            p.error_estimate,
            rx_ns,
            self._ts(rx_ns),
            self._err.get(rx_ns),
            TTL_UNKNOWN if ttl is None else ttl,
            len(data),
            rx_source,
        )
        self.records.append(rec)
        c.recorded += 1
        return rec

    def fetch_records(self, begin: int = 0, end: int = 0xFFFFFFFF, next_seqno: int | None = None) -> bytes:
        """Fetch-Session data records for begin <= seq <= end, in arrival order.

        With ``next_seqno`` (from Stop-Sessions) every seq < next_seqno that never
        arrived is appended as a lost record (Receive Timestamp 0, TTL 255).
        """
        out = [
            FETCH_RECORD.pack(r.seq, r.send_error, r.recv_error, r.send_timestamp, r.recv_timestamp, r.ttl)
            for r in self.records
            if begin <= r.seq <= end
        ]
        if next_seqno is not None:
            # Next Seqno comes from the peer's Stop-Sessions: never past what the session was
            # asked to send (RFC 4656 §3.8), or 2^32 lost records exhaust our memory.
            if self.expected is not None:
                next_seqno = min(next_seqno, self.expected)
            recv_err = self._err.get(time.time_ns())
            for s in range(begin, min(end + 1, next_seqno)):
                if s not in self._seen:
                    # Lost: Receive Timestamp 0; Send Timestamp the scheduled time when known
                    # (Error Estimate multiplier 1: it must not be 0).
                    sent = 0
                    if self._schedule is not None and self._start_ns is not None:
                        sent = self._ts(self._start_ns + self._schedule.offset_ns(s))
                    out.append(FETCH_RECORD.pack(s, 1, recv_err, sent, 0, TTL_UNKNOWN))
        return b"".join(out)


def decode_fetch_records(data: bytes) -> list[tuple[int, int, int, int, int, int]]:
    if len(data) % FETCH_RECORD.size:
        raise PacketError("fetch data is not a whole number of 25-octet records")
    return [FETCH_RECORD.unpack_from(data, o) for o in range(0, len(data), FETCH_RECORD.size)]
