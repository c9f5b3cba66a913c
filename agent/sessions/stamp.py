"""A STAMP (RFC 8762) Session-Sender session: no control channel, one UDP flow to the
reflector's port, records summarised like TWAMP's (agent.sessions.results).

Used by ``xwamp stamp`` and the agent's ``protocol = "stamp"`` peers. The HMAC key of
authenticated mode is either configured (a key file) or derived from the IPsec SA pair
the packets ride in (docs/wire-format.md §7, agent.sessions.stamp_keys).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Callable

from agent.engine import tlv as _tlv
from agent.engine import udp
from agent.engine.clock import STAMP_COUNTERS
from agent.engine.followup import parse_follow_up
from agent.engine.packets import MODE_AUTHENTICATED, MODE_UNAUTHENTICATED, Proto
from agent.engine.sender import PacketRecord
from agent.sessions import results
from netlink.secret import Secret


@dataclass
class StampOptions:
    host: str
    port: int = udp.DEFAULT_PORT
    count: int = 10
    interval: float = 1.0
    schedule: str = "fixed"  # fixed | poisson
    padding: int | None = None  # STAMP: total extra octets, sent in an Extra Padding TLV
    dscp: int = 0
    ssid: int = 0
    local_addr: str | None = None
    key: Secret | None = None  # authenticated mode (RFC 8762 §4.2.2) when set
    light: bool = False  # TWAMP-Light packet format (RFC 8762 §4.6)
    tlvs: list[_tlv.Tlv] = field(default_factory=list)
    wait: float = 2.0
    follow_up: bool = False  # RFC 8972 §4.7 Follow-Up Telemetry: correct T3 of earlier samples
    # Hardware stamps from this NIC's PHC (T1 TX; T4 RX where its filter stamps our packets).
    # The caller switches the NIC's stamping on (agent.engine.timestamping.hardware_opt_in).
    iface: str | None = None

    def validate(self) -> None:
        if self.count < 1 or self.interval < 0:
            raise ValueError("count >= 1, interval >= 0")
        if not 0 <= self.dscp < 64:
            raise ValueError("DSCP is 0..63")
        if not 0 <= self.ssid <= 0xFFFF:
            raise ValueError("SSID is 0..65535")
        if not 0 < self.port <= 0xFFFF:
            raise ValueError("port is 1..65535")
        if self.padding is not None and not 0 <= self.padding <= 9000:
            raise ValueError("padding is 0..9000 octets")
        if self.light and (self.key is not None or self.tlvs or self.follow_up):
            raise ValueError("TWAMP-Light format carries no key and no TLVs")
        if self.schedule not in ("fixed", "poisson"):
            raise ValueError("schedule is fixed or poisson")


@dataclass
class StampResult:
    records: list[PacketRecord]
    summary: results.Summary
    peer: str
    mode: str  # unauth | auth | light
    stateful: bool | None  # True: the reflector's numbering shows it is stateful; None: undecided
    tlv_answers: dict[int, list[dict[str, object]]]  # our seq -> the reflector's TLV answers
    key_tag: str = ""  # tunnel-keyed: the SA pair (SPIs, reqid; key-free)

    def to_dict(self) -> dict[str, object]:
        return {"protocol": "stamp", "peer": self.peer, "mode": self.mode,
                "reflector_stateful": self.stateful, "key_pair": self.key_tag,
                "summary": self.summary.to_dict(),
                "records": [dict(r.as_dict(), tlv_answers=self.tlv_answers.get(r.seq, [])) for r in self.records]}


MAX_FUT_WAIT = 4096  # pending samples kept for a Follow-Up at most (bounded memory)
FUT_MAX_RESIDENCE_NS = 1_000_000_000  # a Follow-Up T3 more than 1 s after T2 is not this reply's


class FollowUpCorrector:
    """Sender side of RFC 8972 §4.7: each reply's Follow-Up TLV carries the real transmit time
    of the reflector's previous reply; put it in as that sample's T3. Until then a sample's T3 is
    *pending* (t3_ns None: left out of RTT and reverse delay, never mixed in as written)."""

    def __init__(self) -> None:
        self._waiting: dict[int, PacketRecord] = {}  # reflector seq -> pending record
        self.corrected = 0
        self.rejected = 0  # Follow-Up values that cannot be the reply they name
        self.empty = 0  # answers carrying no stamp (ours: only the very first reply of a session)
        self.ignored = False  # the reflector echoes the TLV without filling it: T3 as written

    def on_record(self, rec: PacketRecord) -> list[PacketRecord]:
        """Returns the records now settled (corrected, or not asked/unsupported), in order."""
        out: list[PacketRecord] = []
        fut = None
        answered = False
        if rec.reply_tlvs:
            try:
                tlvs = _tlv.parse_tlvs(rec.reply_tlvs)
            except Exception:  # PacketError: a reflector that returns garbage answers no TLV
                tlvs = []
            for t in tlvs:
                if t.type == _tlv.T_FOLLOW_UP:
                    answered = not t.flags & (_tlv.FLAG_U | _tlv.FLAG_M)
                    if answered:
                        ptp = bool((rec.reflector_error or 0) & 0x4000)
                        fut = parse_follow_up(t.value, ptp)
        if answered and fut is None and not self.corrected:
            self.empty += 1
            if self.empty >= 3 and not self.ignored:
                # A reflector that copies our TLVs back unfilled (RFC 8762 without RFC 8972, or one
                # that ignores this TLV) would leave every sample pending: take T3 as written.
                self.ignored = True
                for r in self.pending():
                    r.follow_up, r.t3_ns = "unsupported", r.t3_user_ns
                    out.append(r)
        if not answered or self.ignored:
            rec.follow_up = "unsupported"
            out.append(rec)
        else:
            rec.follow_up, rec.t3_user_ns, rec.t3_ns = "pending", rec.t3_ns, None
            if rec.reflector_seq is not None:
                if len(self._waiting) >= MAX_FUT_WAIT:
                    self._waiting.pop(next(iter(self._waiting)))
                self._waiting[rec.reflector_seq] = rec
        if fut is not None:
            seq, ns, src = fut
            prev = self._waiting.pop(seq, None)
            if prev is not None and prev is not rec:
                if prev.t2_ns is not None and 0 <= ns - prev.t2_ns <= FUT_MAX_RESIDENCE_NS:
                    prev.t3_ns, prev.t3_source, prev.follow_up = ns, src, "corrected"
                    self.corrected += 1
                    STAMP_COUNTERS.add("t3", src)  # xwamp_timestamps_total{direction="t3"}
                else:
                    self.rejected += 1
                out.insert(0, prev)
        return out

    def pending(self) -> list[PacketRecord]:
        """What never got its Follow-Up (the last reply of a run, lost replies after it): flagged."""
        left = sorted(self._waiting.values(), key=lambda r: r.seq)
        self._waiting.clear()
        return left


def _sender_tlvs(opt: StampOptions) -> list[_tlv.Tlv]:
    tlvs = list(opt.tlvs)
    if opt.follow_up and not any(t.type == _tlv.T_FOLLOW_UP for t in tlvs):
        tlvs.append(_tlv.follow_up_request())
    # RFC 8972 §4.8: HMAC TLV last; the sender codec appends it when keyed.
    return [t for t in tlvs if t.type != _tlv.T_HMAC]


async def stamp_session(opt: StampOptions, on_record: Callable[[PacketRecord], None] | None = None,
                        stop: asyncio.Event | None = None, sock: socket.socket | None = None,
                        record_hook: Callable[[list[PacketRecord]], None] | None = None) -> StampResult:
    """Send ``opt.count`` packets to ``opt.host:opt.port`` and summarise the replies.

    ``record_hook`` sees the records before they are summarised (Follow-Up correction)."""
    opt.validate()
    want_hmac_tlv = any(t.type == _tlv.T_HMAC for t in opt.tlvs)
    tlvs = _sender_tlvs(opt)
    if want_hmac_tlv and opt.key is None:
        raise ValueError("the HMAC TLV needs a key (--auth-key-file or a tunnel key)")
    if opt.light:
        proto, mode, pad = Proto.TWAMP, MODE_UNAUTHENTICATED, opt.padding
    else:
        proto = Proto.STAMP
        mode = MODE_AUTHENTICATED if opt.key is not None else MODE_UNAUTHENTICATED
        pad = opt.padding
    local = (opt.local_addr or "", 0)
    fix = FollowUpCorrector() if any(t.type == _tlv.T_FOLLOW_UP for t in tlvs) else None

    def settle(rec: PacketRecord) -> None:
        if fix is None:
            if on_record is not None:
                on_record(rec)
            return
        for r in fix.on_record(rec):
            if on_record is not None:
                on_record(r)

    records = await udp.run_twamp_sender(
        local, (opt.host, opt.port), mode, None, count=opt.count, interval=opt.interval,
        schedule=opt.schedule, padding=pad, dscp=opt.dscp or None, proto=proto, stamp_key=opt.key,
        ssid=opt.ssid, tlvs=tlvs, timeout=opt.wait, iface=opt.iface, hardware=bool(opt.iface),
        on_record=settle, sock=sock,
        stop=stop)
    if fix is not None:
        for r in fix.pending():
            if on_record is not None:
                on_record(r)
    if record_hook is not None:
        record_hook(records)
    got = [r for r in records if not r.lost]
    # A stateful reflector numbers what it reflected (RFC 8762 §4.3.1); numbers equal to ours
    # fit a stateless one as well as a stateful one that lost nothing forward: undecided.
    stateful = True if any(r.reflector_seq != r.seq for r in got) else None
    answers = {r.seq: _tlv.describe_tlvs(r.reply_tlvs) for r in got if r.reply_tlvs}
    name = "light" if opt.light else ("auth" if opt.key is not None else "unauth")
    return StampResult(records, results.summarize(records, reflector_stateful=stateful), opt.host, name,
                       stateful, answers)


__all__ = ["StampOptions", "StampResult", "stamp_session"]
