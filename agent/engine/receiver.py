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
    bad_error_estimate: int = 0  # RFC 4656 §4.1.2: Multiplier 0, "considered corrupt and discarded"
    over_cap: int = 0  # a session without an expected count that reached MAX_RECORDS
    after_stop: int = 0  # arrived after Stop-Sessions: the session is over (RFC 4656 §3.8)
    stop_discarded: int = 0  # records (received or lost) dropped by the §3.8 Timeout window


# Records one session keeps when it has no expected count (Number of Packets bounds the
# others: one record per sequence number below it).
MAX_RECORDS = 1 << 20


class OwampReceiver:
    """Receiver state of one OWAMP-Test session.

    One record per sequence number: a duplicate (RFC 4656 §4.2 lets a receiver see them)
    is counted in ``counters.duplicates`` and not stored, so a peer replaying one packet
    cannot grow our memory; the first copy is the one Fetch-Session reports."""

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
        self._stopped = False
        # RFC 4656 §3.8 window, set by stop(): lost records whose computed send time falls
        # in [lo, hi] are discarded too; without a schedule, lost seqs from _cut_seq on.
        self._window: tuple[int, int] | None = None
        self._cut_seq: int | None = None

    def on_packet(self, data: bytes, rx_ns: int, ttl: int | None, rx_source: str = "sw") -> ArrivalRecord | None:
        c = self.counters
        c.received += 1
        if self._stopped:
            c.after_stop += 1
            return None
        try:
            p = decode_sender(data, Proto.OWAMP, self.security, self.crypto)
        except HmacError:
            c.bad_hmac += 1
            return None
        except PacketError:
            c.short += 1
            return None
        if not p.error_estimate & 0xFF:
            # RFC 4656 §4.1.2: "Multiplier MUST NOT be set to zero. If Multiplier is zero, the
            # packet SHOULD be considered corrupt and discarded."
            c.bad_error_estimate += 1
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
            c.duplicates += 1  # counted, not stored: records stay bounded by the sequence space
            return None
        if self.expected is None and len(self.records) >= MAX_RECORDS:
            c.over_cap += 1
            return None
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

    def _send_ns(self, seq: int, timestamp: int, error_estimate: int) -> int:
        """A packet's computed send time: its §5 scheduled time when the session has a
        schedule (the same clock for received and lost packets, so trimming biases neither
        loss nor duplicates), else the sender's Timestamp."""
        if self._schedule is not None and self._start_ns is not None:
            return self._start_ns + self._schedule.offset_ns(seq)
        return (unix_ns_from_ptp if error_estimate & 0x4000 else unix_ns_from_ntp)(timestamp)

    def stop(self, now_ns: int) -> int:
        """Stop-Sessions received at ``now_ns``. RFC 4656 §3.8: the receiver "MUST discard
        any packet records -- including lost packet records -- with a (computed) send time
        that falls between the current time minus Timeout and the current time". Later
        packets are not recorded (``after_stop``). Returns the records discarded now (lost
        records in the window are left out by fetch_records). Timeout 0 (no Timeout
        given): nothing is in the window."""
        if self._stopped:
            return 0
        self._stopped = True
        if not self._timeout_ns:
            return 0
        lo, hi = now_ns - self._timeout_ns, now_ns
        keep: list[ArrivalRecord] = []
        cut: int | None = None
        for r in self.records:
            if lo <= self._send_ns(r.seq, r.send_timestamp, r.send_error) <= hi:
                cut = r.seq if cut is None else min(cut, r.seq)
            else:
                keep.append(r)
        dropped = len(self.records) - len(keep)
        if dropped:
            self.records[:] = keep  # _seen keeps their seqs: neither a record nor lost
            self.counters.stop_discarded += dropped
        self._window = (lo, hi)
        self._cut_seq = cut
        return dropped

    def _lost_in_window(self, seq: int) -> bool:
        if self._window is None:
            return False
        if self._schedule is not None and self._start_ns is not None:
            lo, hi = self._window
            return lo <= self._start_ns + self._schedule.offset_ns(seq) <= hi
        # No schedule: a lost packet has no computed send time. Seqs are sent in order,
        # so one numbered after a record the window discarded was sent within it too.
        return self._cut_seq is not None and seq > self._cut_seq

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
            # Next Seqno is the sender's claim (Stop-Sessions, RFC 4656 §3.8): bound it by
            # the packets this session could have recorded at all (Number of Packets; seq
            # numbers at or above it were refused as out_of_range), else a peer claiming
            # 0xFFFFFFFF makes us build four billion lost records (issue 11, row 1).
            if self.expected is not None:
                next_seqno = min(next_seqno, self.expected)
            elif self._seen:
                next_seqno = min(next_seqno, max(self._seen) + 1)
            else:
                next_seqno = 0
            recv_err = self._err.get(time.time_ns())
            for s in range(begin, min(end + 1, next_seqno)):
                if s not in self._seen and not self._lost_in_window(s):
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
