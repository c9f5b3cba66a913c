"""Sans-IO Session-Sender (TWAMP RFC 5357 / STAMP RFC 8762; OWAMP RFC 4656 sends the same packets).

:class:`Schedule` gives each packet an absolute send time (start + offset(n)), so a
late wake-up never shifts later packets (no drift); ``fixed`` is periodic,
``poisson`` draws exponential gaps (RFC 3432 / RFC 2330 Poisson sampling).

:class:`TestSender` builds packet *n* (``build``), takes the kernel TX stamp if the
adapter gets one (``on_tx_stamp``), matches replies to what was sent
(``on_reply``), and yields one :class:`PacketRecord` per sent packet (``records``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field, fields
from typing import Iterable

from agent.engine import tlv as _tlv
from agent.engine.clockerr import ErrSource, PackedErrorEstimate
from agent.engine.counters import Counters
from agent.engine.crypto import REFLECTOR_AUTH_SPAN, StampCrypto, TwampTestCrypto
from agent.engine.keys import TestKeys
from agent.engine.packets import (
    HmacError,
    PacketError,
    Proto,
    Security,
    SenderPacket,
    decode_reflector,
    encode_sender,
    reflector_base_len,
    sender_base_len,
    session_crypto,
    symmetric_padding,
)
from agent.engine.schedule import SlotSchedule
from agent.engine.txlag import TX_LAG, widened_error
from agent.engine.timefmt import (
    ErrorEstimate,
    ntp_from_unix_ns,
    ptp_from_unix_ns,
    unix_ns_from_ntp,
    unix_ns_from_ptp,
)

_NS = 1_000_000_000


class Schedule:
    """Absolute send offsets in ns from the session start."""

    def __init__(self, kind: str, interval_s: float, seed: int | None = None) -> None:
        if interval_s < 0:
            raise ValueError("interval must be >= 0")
        if kind not in ("fixed", "poisson", "slots"):
            raise ValueError("schedule kind is 'fixed', 'poisson' or 'slots'")
        self.kind = kind
        self.interval_s = interval_s
        self._interval_ns = round(interval_s * _NS)
        self._rng = random.Random(seed)
        self._slots: SlotSchedule | None = None
        self._offsets: list[int] = [0]
        self._acc = 0.0

    @classmethod
    def fixed(cls, interval_s: float) -> "Schedule":
        return cls("fixed", interval_s)

    @classmethod
    def poisson(cls, mean_interval_s: float, seed: int | None = None) -> "Schedule":
        return cls("poisson", mean_interval_s, seed)

    @classmethod
    def from_slots(cls, sid: bytes, slots: list[tuple[int, int]]) -> "Schedule":
        """The RFC 4656 §5 schedule of Request-Session slots: what an OWAMP receiver expects."""
        self = cls("slots", 0.0)
        self._slots = SlotSchedule(sid, slots)
        return self

    def offset_ns(self, n: int) -> int:
        """Offset of packet n. fixed/poisson: packet 0 at 0, then cumulative gaps; slots:
        packet 0 at its own first delta (RFC 4656 §5)."""
        if self.kind == "fixed":
            return n * self._interval_ns
        if self._slots is not None:
            return self._slots.offset_ns(n)
        offs = self._offsets
        while len(offs) <= n:
            if self.interval_s == 0:
                offs.append(0)
                continue
            self._acc += self._rng.expovariate(1.0 / self.interval_s)
            offs.append(round(self._acc * _NS))
        return offs[n]

    def __repr__(self) -> str:
        return f"Schedule({self.kind}, {self.interval_s}s)"


@dataclass(slots=True)
class PacketRecord:
    """One sent test packet and what came back. Times are Unix ns (CLOCK_REALTIME)."""

    seq: int
    t1_ns: int  # user-space send time, as written in the packet
    size: int
    t1_kernel_ns: int | None = None  # kernel TX stamp (SO_TIMESTAMPING) when the adapter got one
    t1_source: str = "user"
    t1_error: int = 0  # packed Error Estimate written in the packet
    reflector_seq: int | None = None
    t2_ns: int | None = None  # reflector receive time
    t3_ns: int | None = None  # reflector send time
    reflector_error: int | None = None  # packed; applies to T2 and T3
    t4_ns: int | None = None  # our receive time
    t4_source: str | None = None
    t4_error: int | None = None
    sender_ttl: int | None = None  # TTL/Hop Limit the reflector saw (forward path)
    reply_ttl: int | None = None  # TTL/Hop Limit we saw (reverse path)
    reply_size: int | None = None
    arrival: int | None = None  # order of arrival among replies (for reordering)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (reflector_seq, t4_ns) of extra copies
    reply_tlvs: bytes = b""
    reflected_ok: bool | None = None  # RFC 6038: the reply carried our octets to be reflected (None: not asked)
    # RFC 8972 §4.7 Follow-Up Telemetry (agent.sessions.stamp): "corrected" — t3_ns is the reflector's
    # kernel TX stamp of this reply (t3_source hw/sw), t3_user_ns what the reply carried; "pending" —
    # asked, not (yet) answered: t3_ns is None so nothing T3-based (RTT, reverse delay) mixes it in;
    # "unsupported" — the reflector did not know the TLV: T3 as written; None — not asked.
    follow_up: str | None = None
    t3_source: str | None = None
    t3_user_ns: int | None = None

    @property
    def lost(self) -> bool:
        return self.t4_ns is None

    @property
    def t1_best_ns(self) -> int:
        return self.t1_kernel_ns if self.t1_kernel_ns is not None else self.t1_ns

    @property
    def rtt_ns(self) -> int | None:
        """RFC 5357 round trip without the reflector's residence: (T4 − T1) − (T3 − T2)."""
        if self.t4_ns is None or self.t2_ns is None or self.t3_ns is None:
            return None
        return (self.t4_ns - self.t1_best_ns) - (self.t3_ns - self.t2_ns)

    def as_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["reply_tlvs"] = self.reply_tlvs.hex()
        d["rtt_ns"] = self.rtt_ns
        return d


@dataclass(slots=True)
class SenderCounters(Counters):
    sent: int = 0
    replies: int = 0
    duplicates: int = 0
    bad_hmac: int = 0
    malformed: int = 0
    unknown_seq: int = 0  # replies to a sequence number we never sent
    reflect_mismatch: int = 0  # RFC 6038: replies whose reflected octets differ from what we sent
    tx_stamp_rejected: int = 0  # kernel TX stamps before the packet's own user T1: a misattributed OPT_ID key
    bad_error_estimate: int = 0  # TWAMP reply with Error Estimate Multiplier 0 (RFC 4656 §4.1.2)


class TestSender:
    """Session-Sender state of one test session."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        proto: Proto = Proto.TWAMP,
        security: Security = Security.UNAUTH,
        *,
        keys: TestKeys | None = None,
        stamp_key=None,
        padding: int | None = None,
        symmetric: bool = True,
        ssid: int = 0,
        count: int = 10,
        schedule: Schedule | None = None,
        ptp: bool = False,
        error_estimate: ErrSource = None,
        tlvs: Iterable[_tlv.Tlv] = (),
        reflector_auth_span: int = REFLECTOR_AUTH_SPAN,
        random_padding: bool = True,
        reflect: tuple[int, int] | None = None,
        server_octets: int = 0,
    ) -> None:
        """``reflect``: RFC 6038 Reflect Octets, (offset in our packet where the padding to be
        reflected starts, its length): those octets are random (``server_octets`` first when
        the Accept-Session asked for them, RFC 6038 §4.2) and every reply must carry them at
        the start of its padding (else ``counters.reflect_mismatch``)."""
        self.proto = proto
        self.security = security
        self.count = count
        self.schedule = schedule or Schedule.fixed(1.0)
        self.ssid = ssid
        self.ptp = ptp
        self.counters = SenderCounters()
        self._ts = ptp_from_unix_ns if ptp else ntp_from_unix_ns
        # RFC 4656 §4.1.2: the estimate covers T1's lag behind the real send too (agent.engine.txlag).
        self._err = PackedErrorEstimate(error_estimate if error_estimate is not None
                                        else widened_error("sender", ptp), ptp)
        self._err_rx = PackedErrorEstimate(error_estimate, ptp)  # T4 is a kernel RX stamp: no send lag
        self._err.get(time.time_ns())  # warm the cache: the first adjtimex read is slow
        self.crypto: TwampTestCrypto | StampCrypto | None = session_crypto(proto, security, keys, stamp_key,
                                                                            reflector_auth_span)
        self._tlv_crypto = StampCrypto(stamp_key) if proto is Proto.STAMP and stamp_key is not None else None
        self._tlvs = list(tlvs)
        if proto is Proto.STAMP and padding:
            # STAMP carries extra length in an Extra Padding TLV (RFC 8972 §4.2), not bare octets.
            self._tlvs.insert(0, _tlv.extra_padding(max(0, padding - 4)))
            padding = 0
        symmetric = symmetric and proto is Proto.TWAMP  # OWAMP has no reply; STAMP is symmetric already
        if padding is None:
            padding = symmetric_padding(proto, security) if symmetric else 0
        self.padding = padding
        # RFC 4656 §4.1.2: padding SHOULD be pseudo-random; RFC 6038 symmetrical size wants
        # the octets that stand in for the reflector's fields to be zero (MBZ).
        mbz = min(padding, symmetric_padding(proto, security)) if symmetric else 0
        pad = bytearray(mbz) + (os.urandom(padding - mbz) if random_padding else bytes(padding - mbz))
        self._expect_reflected: bytes | None = None
        if reflect is not None and reflect[1]:
            start = reflect[0] - sender_base_len(proto, security)
            if start < 0 or start + reflect[1] > padding:
                raise ValueError("the padding to be reflected must lie inside the padding")
            octets = bytearray(os.urandom(reflect[1]))
            if server_octets:
                octets[:2] = server_octets.to_bytes(2, "big")[: reflect[1]]
            pad[start : start + reflect[1]] = octets
            self._expect_reflected = bytes(octets)
        self._pad = bytes(pad)
        self._refl_at = reflector_base_len(proto, security)
        self._records: dict[int, PacketRecord] = {}
        self._arrivals = 0

    # ------------------------------------------------------------------ sending

    def send_time_ns(self, n: int, start_ns: int) -> int:
        return start_ns + self.schedule.offset_ns(n)

    def build(self, n: int, now_ns: int) -> bytes:
        """Packet ``n`` stamped with T1 = ``now_ns`` (take it right before the send call)."""
        err = self._err.get(now_ns)
        extra = self._pad
        if self.proto is Proto.STAMP and self._tlvs:
            extra = _tlv.sender_tlvs(self._tlvs, self._tlv_crypto, n)
        pkt = SenderPacket(n, self._ts(now_ns), err, self.ssid, extra)
        data = encode_sender(pkt, self.proto, self.security, self.crypto)
        self._records[n] = PacketRecord(n, now_ns, len(data), t1_error=err)
        self.counters.sent += 1
        return data

    def on_tx_stamp(self, seq: int, ns: int, source: str) -> bool:
        """The kernel TX stamp of packet ``seq``; it replaces T1 in the computations. Refused
        (False, counted) if it precedes the user T1: the kernel cannot stamp a packet before
        it was handed over, so the stamp belongs to another packet; T1 stays the user stamp."""
        rec = self._records.get(seq)
        if rec is None:
            return False
        if ns < rec.t1_ns:
            self.counters.tx_stamp_rejected += 1
            return False
        rec.t1_kernel_ns = ns
        rec.t1_source = source
        TX_LAG.observe("sender", ns, rec.t1_ns)  # what the user-space T1 in the packet missed
        return True

    def t1_user_ns(self, seq: int) -> int | None:
        rec = self._records.get(seq)
        return None if rec is None else rec.t1_ns

    # ------------------------------------------------------------------ receiving

    def on_reply(self, data: bytes, rx_ns: int, ttl: int | None, rx_source: str = "sw") -> PacketRecord | None:
        """Match a reflector packet to what we sent; ``None`` (counted) if it does not match or verify."""
        try:
            r = decode_reflector(data, self.proto, self.security, self.crypto)
        except HmacError:
            self.counters.bad_hmac += 1
            return None
        except PacketError:
            self.counters.malformed += 1
            return None
        if self.proto is not Proto.STAMP and not r.error_estimate & 0xFF:
            # RFC 4656 §4.1.2: "If Multiplier is zero, the packet SHOULD be considered corrupt
            # and discarded" (TWAMP reuses the field, RFC 5357 §4.2.1).
            self.counters.bad_error_estimate += 1
            return None
        rec = self._records.get(r.sender_seq)
        if rec is None:
            self.counters.unknown_seq += 1
            return None
        want = self._expect_reflected
        reflected_ok = None if want is None else data[self._refl_at : self._refl_at + len(want)] == want
        if reflected_ok is False:
            self.counters.reflect_mismatch += 1
        if rec.t4_ns is not None:
            rec.duplicates.append((r.seq, rx_ns))
            self.counters.duplicates += 1
            return rec
        self.counters.replies += 1
        rec.reflector_seq = r.seq
        # The reflector's Z bit says which format *it* wrote (RFC 8186), whatever ours is.
        from_ts = unix_ns_from_ptp if r.error_estimate & 0x4000 else unix_ns_from_ntp
        rec.t2_ns = from_ts(r.receive_timestamp)
        rec.t3_ns = from_ts(r.timestamp)
        rec.reflector_error = r.error_estimate
        rec.t4_ns = rx_ns
        rec.t4_source = rx_source
        rec.t4_error = self._err_rx.get(rx_ns)
        rec.sender_ttl = r.sender_ttl
        rec.reply_ttl = ttl
        rec.reply_size = len(data)
        rec.arrival = self._arrivals
        rec.reply_tlvs = r.extra if self.proto is Proto.STAMP else b""
        rec.reflected_ok = reflected_ok
        self._arrivals += 1
        return rec

    def forget(self, seq: int) -> None:
        """Drop packet ``seq``'s record: a sender whose replies nobody collects (the server's
        OWAMP sender) keeps only its count, not a record per packet."""
        self._records.pop(seq, None)

    def records(self) -> list[PacketRecord]:
        return [self._records[k] for k in sorted(self._records)]

    @property
    def base_len(self) -> int:
        return sender_base_len(self.proto, self.security)


def error_estimate_of(packed: int | None) -> ErrorEstimate | None:
    return None if packed is None else ErrorEstimate.unpack(packed)
