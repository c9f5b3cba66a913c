"""Honest transmit times: the reflector's kernel TX stamps, RFC 8972 §4.7 Follow-Up Telemetry,
and the late patch of the timestamp field (docs/timestamping.md, "Timestamps written into packets").

A timestamp inside a packet must be written before the send; whatever runs between that
clock read and the moment the packet leaves counts as network delay. Three remedies live here:

* :class:`ReplyTxStamps` — the reflector asks the kernel for a TX stamp of every reply
  (SO_TIMESTAMPING, OPT_ID keys), keeps, per STAMP test session (sender address and port,
  SSID), the real transmit time of the last reply, and measures the lag (stamp − T3 written)
  into agent.engine.txlag (role "reflector").
* :func:`follow_up_value` — the Follow-Up Telemetry TLV value the reflector answers with:
  Sequence Number (4) = the reflector Sequence Number of the previous reply of that session,
  Follow-Up Timestamp (8) = its kernel TX stamp (same format as the reply's timestamps),
  Timestamp Mode (1) = 1 hardware / 2 software (the Timestamp Information TLV's method
  values), Reserved (3). All zero when no earlier reply has been stamped yet.
* :class:`T3Patch` — build the reply completely, *then* read the clock and write only the
  8-octet Timestamp field into it, then send; for the formats whose Timestamp no HMAC or
  cipher covers (TWAMP and STAMP unauthenticated, TWAMP authenticated with the 16-octet
  reflector span). STAMP authenticated mode covers T3 with its HMAC, so it relies on
  Follow-Up Telemetry.

The layout of the Follow-Up Telemetry TLV comes from RFC 8972 §4.7's figure (Sequence Number,
Follow-Up Timestamp, Timestamp Mode, Reserved; Length 16), as reproduced at
user.informatik.uni-bremen.de/~cabo/rfc/rfc8972 (follow-up-telemetry-tlv-2.txt); the section's
prose was not reachable, so the field semantics above are xwamp's reading of the names.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Hashable, NamedTuple

from agent.engine.packets import Proto, Security
from agent.engine.timefmt import ntp_from_unix_ns, ptp_from_unix_ns, unix_ns_from_ntp, unix_ns_from_ptp
from agent.engine.txlag import TX_LAG, TxLag

FUT_LEN = 16
MODE_NONE, MODE_HW, MODE_SW = 0, 1, 2  # Timestamp Information TLV method values (RFC 8972 §4.3)
_FUT = struct.Struct("!IQB3x")
_Q = struct.Struct("!Q")
MAX_STREAMS = 65536
MAX_PENDING = 4096


class LastTx(NamedTuple):
    seq: int  # the reflector's Sequence Number of that reply
    ns: int  # its kernel (or hardware) TX stamp, Unix ns
    mode: int  # MODE_HW / MODE_SW


class ReplyTxStamps:
    """Reflector side: which reply each OPT_ID key was, and the last stamped reply per session."""

    def __init__(self, lag: TxLag = TX_LAG, role: str = "reflector") -> None:
        self.lag, self.role = lag, role
        self.next_key = 0
        self._pending: OrderedDict[int, tuple[Hashable, int, int]] = OrderedDict()
        self._last: OrderedDict[Hashable, LastTx] = OrderedDict()
        # Streams whose sender asked for Follow-Up Telemetry: their replies are all stamped
        # (agent.engine.udp stamps the others by sample only). Bounded like _last.
        self.asking: dict[Hashable, None] = {}
        self.stamped = 0
        self.unmatched = 0

    def sent(self, stream: Hashable, seq: int, t3_ns: int) -> None:
        """A reply went to the kernel (successful send): key it as the kernel will (OPT_ID)."""
        self._pending[self.next_key] = (stream, seq, t3_ns)
        self.next_key += 1
        if len(self._pending) > MAX_PENDING:  # stamps that never came (a driver may drop some)
            self._pending.popitem(last=False)

    def send_failed(self) -> None:
        """Kernels before 6.8 used up an OPT_ID key on a failed send too: nothing to match."""

    def on_stamp(self, key: int, ns: int, source: str) -> None:
        p = self._pending.pop(key, None)
        if p is None:
            self.unmatched += 1
            return
        stream, seq, t3_ns = p
        self.lag.observe(self.role, ns, t3_ns)
        self.stamped += 1
        last = self._last
        last[stream] = LastTx(seq, ns, MODE_HW if source == "hw" else MODE_SW)
        last.move_to_end(stream)
        if len(last) > MAX_STREAMS:
            last.popitem(last=False)

    def last(self, stream: Hashable) -> LastTx | None:
        return self._last.get(stream)

    def follow_up(self, stream: Hashable, ptp: bool = False) -> bytes:
        asking = self.asking
        if stream not in asking:
            if len(asking) >= MAX_STREAMS:
                del asking[next(iter(asking))]
            asking[stream] = None
        return follow_up_value(self._last.get(stream), ptp)


def follow_up_value(last: LastTx | None, ptp: bool = False) -> bytes:
    """RFC 8972 §4.7 value (16 octets) for the reply after ``last``; zeros when unknown."""
    if last is None:
        return bytes(FUT_LEN)
    ts = ptp_from_unix_ns(last.ns) if ptp else ntp_from_unix_ns(last.ns)
    return _FUT.pack(last.seq & 0xFFFFFFFF, ts, last.mode)


def parse_follow_up(value: bytes, ptp: bool = False) -> tuple[int, int, str] | None:
    """(reflector seq, TX time in Unix ns, "hw"/"sw") from a reflector's Follow-Up value; None
    when it is not 16 octets or carries no stamp (all zero / unknown mode)."""
    if len(value) != FUT_LEN:
        return None
    seq, ts, mode = _FUT.unpack(value)
    if ts == 0 or mode not in (MODE_HW, MODE_SW):
        return None
    ns = unix_ns_from_ptp(ts) if ptp else unix_ns_from_ntp(ts)
    return seq, ns, "hw" if mode == MODE_HW else "sw"


class T3Patch:
    """Per session format: where its replies carry T3 (``read_at``; None when enciphered),
    whether nothing covers it so it can be written last (``offset``), and the SSID (STAMP)."""

    __slots__ = ("offset", "read_at", "ssid_at", "ptp", "_sec")

    def __init__(self, offset: int | None, read_at: int | None, ssid_at: int | None, ptp: bool) -> None:
        self.offset, self.read_at, self.ssid_at, self.ptp = offset, read_at, ssid_at, ptp
        self._sec = (-(1 << 62), 0)  # (Unix ns at the start of the last second written, its seconds half)

    @classmethod
    def for_session(cls, proto: Proto, security: Security, ptp: bool, reflector_span: int = 16) -> "T3Patch":
        stamp = proto is Proto.STAMP
        if security is Security.UNAUTH:  # Seq(4) Timestamp(8) ErrEst(2) SSID(2): TWAMP and STAMP alike
            return cls(4, 4, 14 if stamp else None, ptp)
        if security is Security.AUTH:  # Seq(4) MBZ(12) Timestamp(8) ErrEst(2) SSID(2)
            # TWAMP authenticated: only block 0 (Seq + MBZ) is enciphered and MACed (agent.engine.crypto);
            # STAMP authenticated: the HMAC covers octets 0..95, Timestamp included.
            late = proto is Proto.TWAMP and reflector_span <= 16
            return cls(16 if late else None, 16, 28 if stamp else None, ptp)
        return cls(None, None, None, ptp)  # encrypted: T3 is under the cipher

    def patch(self, reply: bytearray, now_ns: int) -> None:
        """Write ``now_ns`` as the reply's Timestamp (T3), in place. Per packet, right after the
        clock read: the seconds half is kept per second (as timefmt does), the fraction is
        RFC 4656 §4.1.2's 2**-32 s rounded down, or RFC 8186's nanoseconds."""
        start, hi = self._sec
        rem = now_ns - start
        if not 0 <= rem < 1_000_000_000:
            ts = ptp_from_unix_ns(now_ns) if self.ptp else ntp_from_unix_ns(now_ns)
            rem = now_ns % 1_000_000_000
            self._sec = (now_ns - rem, ts & 0xFFFFFFFF00000000)
        else:
            ts = hi | (rem if self.ptp else (rem << 32) // 1_000_000_000)
        _Q.pack_into(reply, self.offset, ts)

    def value(self, now_ns: int) -> int:
        """The 64-bit Timestamp :meth:`patch` writes for ``now_ns``, same cache (a batch of replies
        sent in one sendmmsg shares one clock read; agent.engine.udp packs it into each)."""
        start, hi = self._sec
        rem = now_ns - start
        if not 0 <= rem < 1_000_000_000:
            ts = ptp_from_unix_ns(now_ns) if self.ptp else ntp_from_unix_ns(now_ns)
            rem = now_ns % 1_000_000_000
            self._sec = (now_ns - rem, ts & 0xFFFFFFFF00000000)
            return ts
        return hi | (rem if self.ptp else (rem << 32) // 1_000_000_000)

    def read_ns(self, reply: bytes | bytearray) -> int | None:
        """The T3 a reply carries, when it is in clear."""
        if self.read_at is None or len(reply) < self.read_at + 8:
            return None
        ts = _Q.unpack_from(reply, self.read_at)[0]
        return unix_ns_from_ptp(ts) if self.ptp else unix_ns_from_ntp(ts)

    def ssid(self, reply: bytes | bytearray) -> int:
        a = self.ssid_at
        return int.from_bytes(reply[a : a + 2], "big") if a is not None and len(reply) >= a + 2 else 0


__all__ = ["ReplyTxStamps", "follow_up_value", "parse_follow_up", "T3Patch", "LastTx", "FUT_LEN"]
