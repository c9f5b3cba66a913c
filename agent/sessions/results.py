"""Statistics of a test session: two-way from per-packet records (agent.engine.sender.PacketRecord,
:func:`summarize`), one-way from OWAMP Fetch-Session records (:func:`summarize_owamp`).

* RTT (RFC 5357): (T4 − T1) − (T3 − T2); T1 is the kernel TX stamp when known.
* One-way delays: forward T2 − T1, reverse T4 − T3. They mix two clocks, so they
  are *trusted* only when both clocks' Error Estimates have S = 1 (RFC 4656 §4.1.2:
  synchronised to UTC); otherwise they are still reported, marked untrusted.
* IPDV (RFC 3393 / RFC 5481 §1.2): delay difference of consecutive sequence numbers,
  both received. The clock offset cancels, so IPDV needs no synchronisation.
* Loss, told apart by direction with the reflector's own sequence numbers (a
  stateful reflector numbers what it actually reflected): gaps among reflector
  sequence numbers are reverse losses, the rest forward losses.
* Duplicates (RFC 5560): extra copies of a reply; a different reflector sequence
  number means the reflector saw two copies (forward), the same one means the copy
  was made on the way back (reverse).
* Reordering (RFC 4737 §3/§4.2): a packet is reordered if its sequence number is
  below the next expected one; extent = arrival position minus the position of the
  first earlier arrival with a larger number. Round trip uses our arrival order;
  forward uses the reflector's numbering (its arrival order); reverse compares our
  arrival order with the reflector's numbering.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from agent.engine.sender import PacketRecord

PERCENTILES = (50, 90, 95, 99)


def percentile(sorted_vals: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (p in 0..100) of an already sorted sequence."""
    if not sorted_vals:
        raise ValueError("no values")
    if len(sorted_vals) == 1:
        return float(sorted_vals[0])
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


@dataclass(slots=True)
class Stats:
    """Distribution of a delay-like quantity, in milliseconds."""

    count: int
    min: float
    max: float
    mean: float
    stdev: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of_ns(cls, values_ns: Iterable[int]) -> "Stats | None":
        v = sorted(x / 1e6 for x in values_ns)
        if not v:
            return None
        n = len(v)
        mean = sum(v) / n
        var = sum((x - mean) ** 2 for x in v) / n
        return cls(n, v[0], v[-1], mean, math.sqrt(var), *(percentile(v, p) for p in PERCENTILES))


@dataclass(slots=True)
class Reordering:
    reordered: int = 0
    ratio: float = 0.0
    max_extent: int = 0


def reordering(seqs_in_arrival_order: Sequence[int]) -> Reordering:
    """RFC 4737 reordered count, ratio and maximum extent of a single-copy arrival sequence."""
    next_exp = 0
    prefix_max: list[int] = []
    reordered = 0
    max_extent = 0
    cur = -1
    for i, s in enumerate(seqs_in_arrival_order):
        if s >= next_exp:
            next_exp = s + 1
        else:
            reordered += 1
            j = bisect.bisect_right(prefix_max, s)  # first earlier arrival with seq > s
            max_extent = max(max_extent, i - j)
        cur = max(cur, s)
        prefix_max.append(cur)
    n = len(seqs_in_arrival_order)
    return Reordering(reordered, reordered / n if n else 0.0, max_extent)


@dataclass(slots=True)
class Loss:
    sent: int
    received: int
    lost: int
    percent: float
    forward: int | None  # None: the reflector's numbering cannot tell (stateless / no replies)
    reverse: int | None
    direction_exact: bool  # False: losses after the last reply may be either direction


@dataclass(slots=True)
class Duplicates:
    total: int = 0
    forward: int = 0
    reverse: int = 0


@dataclass(slots=True)
class OneWay:
    forward: Stats | None
    reverse: Stats | None
    trusted: bool  # both clocks synchronised (S bits) on every packet used
    error_bound_ms: float | None  # largest sum of the two Error Estimates seen


@dataclass(slots=True)
class Summary:
    loss: Loss
    duplicates: Duplicates
    rtt: Stats | None
    one_way: OneWay
    ipdv_forward: Stats | None  # |IPDV|
    ipdv_reverse: Stats | None
    ipdv_rtt: Stats | None
    reorder_round_trip: Reordering
    reorder_forward: Reordering | None
    reorder_reverse: Reordering | None
    hops_forward: tuple[int, int] | None  # (min, max) TTL seen by the reflector
    hops_reverse: tuple[int, int] | None  # (min, max) TTL seen by us
    stamp_sources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _synced(packed: int | None) -> bool:
    return packed is not None and bool(packed & 0x8000)


def _err_s(packed: int | None) -> float:
    if packed is None:
        return math.inf
    return (packed & 0xFF) * 2.0 ** (((packed >> 8) & 0x3F) - 32)


def _loss(records: Sequence[PacketRecord], got: list[PacketRecord], stateless: bool) -> Loss:
    sent = len(records)
    lost = sent - len(got)
    pct = 100.0 * lost / sent if sent else 0.0
    if not got or stateless:
        return Loss(sent, len(got), lost, pct, None if lost else 0, None if lost else 0, lost == 0)
    refl = {r.reflector_seq for r in got if r.reflector_seq is not None}
    for r in got:
        refl.update(d[0] for d in r.duplicates)
    reverse = max(refl) + 1 - len(refl)
    forward = max(0, lost - reverse)
    last = max(records, key=lambda r: r.seq)
    return Loss(sent, len(got), lost, pct, forward, reverse, not last.lost)


def summarize(records: Sequence[PacketRecord], reflector_stateful: bool | None = True) -> Summary:
    """``reflector_stateful``: True for TWAMP (RFC 5357 §4.2.1: the reflector numbers its own
    packets), False for a stateless STAMP reflector (it copies our numbers), None to guess
    (all reflector numbers equal ours ⇒ stateless)."""
    records = sorted(records, key=lambda r: r.seq)
    got = [r for r in records if not r.lost]
    if reflector_stateful is None:
        stateless = all(r.reflector_seq == r.seq for r in got)
    else:
        stateless = not reflector_stateful

    dup = Duplicates()
    for r in got:
        for rseq, _t in r.duplicates:
            dup.total += 1
            if rseq == r.reflector_seq:
                dup.reverse += 1
            else:
                dup.forward += 1

    rtt = Stats.of_ns(r.rtt_ns for r in got if r.rtt_ns is not None)

    fwd = [r.t2_ns - r.t1_best_ns for r in got if r.t2_ns is not None]
    rev = [r.t4_ns - r.t3_ns for r in got if r.t3_ns is not None and r.t4_ns is not None]
    trusted = bool(got) and all(
        _synced(r.t1_error) and _synced(r.reflector_error) and _synced(r.t4_error) for r in got
    )
    bound = max((max(_err_s(r.t1_error), _err_s(r.t4_error)) + _err_s(r.reflector_error) for r in got), default=None)
    one_way = OneWay(
        Stats.of_ns(fwd),
        Stats.of_ns(rev),
        trusted,
        None if bound is None or math.isinf(bound) else bound * 1e3,
    )

    # IPDV over consecutive sequence numbers (RFC 5481 §1.2 "IPDV with selection function").
    by_seq = {r.seq: r for r in got}
    ipf: list[int] = []
    ipr: list[int] = []
    ipt: list[int] = []
    for r in got:
        p = by_seq.get(r.seq - 1)
        if p is None:
            continue
        if r.t2_ns is not None and p.t2_ns is not None:
            ipf.append(abs((r.t2_ns - r.t1_best_ns) - (p.t2_ns - p.t1_best_ns)))
        if r.t3_ns is not None and p.t3_ns is not None and r.t4_ns is not None and p.t4_ns is not None:
            ipr.append(abs((r.t4_ns - r.t3_ns) - (p.t4_ns - p.t3_ns)))
        if r.rtt_ns is not None and p.rtt_ns is not None:
            ipt.append(abs(r.rtt_ns - p.rtt_ns))

    arrival = sorted(got, key=lambda r: r.arrival if r.arrival is not None else r.seq)
    rt = reordering([r.seq for r in arrival])
    ro_f = ro_r = None
    if got and not stateless:
        by_refl = sorted(got, key=lambda r: r.reflector_seq or 0)
        ro_f = reordering([r.seq for r in by_refl])
        # Reverse: reflector numbers renumbered densely so that its gaps (reverse loss) are not "reordering".
        rank = {r.reflector_seq: i for i, r in enumerate(by_refl)}
        ro_r = reordering([rank[r.reflector_seq] for r in arrival])

    ttl_f = [r.sender_ttl for r in got if r.sender_ttl is not None]
    ttl_r = [r.reply_ttl for r in got if r.reply_ttl is not None]
    sources: dict[str, int] = {}
    for r in records:
        sources[f"tx_{r.t1_source}"] = sources.get(f"tx_{r.t1_source}", 0) + 1
        if r.t4_source:
            sources[f"rx_{r.t4_source}"] = sources.get(f"rx_{r.t4_source}", 0) + 1
        if r.follow_up is not None and not r.lost:  # T3: the reflector's TX stamp, or why not
            k = f"t3_{r.t3_source}" if r.follow_up == "corrected" else f"t3_{r.follow_up}"
            sources[k] = sources.get(k, 0) + 1

    return Summary(
        loss=_loss(records, got, stateless),
        duplicates=dup,
        rtt=rtt,
        one_way=one_way,
        ipdv_forward=Stats.of_ns(ipf),
        ipdv_reverse=Stats.of_ns(ipr),
        ipdv_rtt=Stats.of_ns(ipt),
        reorder_round_trip=rt,
        reorder_forward=ro_f,
        reorder_reverse=ro_r,
        hops_forward=(min(ttl_f), max(ttl_f)) if ttl_f else None,
        hops_reverse=(min(ttl_r), max(ttl_r)) if ttl_r else None,
        stamp_sources=sources,
    )


def format_reply(rec: PacketRecord, peer: str = "") -> str:
    """One ping-like line per reply."""
    if rec.lost:
        return f"seq={rec.seq} lost"
    rtt = rec.rtt_ns
    parts = [f"{rec.reply_size} bytes from {peer}:" if peer else f"{rec.reply_size} bytes:", f"seq={rec.seq}"]
    if rec.reflector_seq is not None:
        parts.append(f"rseq={rec.reflector_seq}")
    parts.append(f"ttl={rec.sender_ttl}/{rec.reply_ttl}")
    if rtt is not None:
        parts.append(f"rtt={rtt / 1e6:.3f} ms")
    if rec.t2_ns is not None and rec.t4_ns is not None and rec.t3_ns is not None:
        mark = "" if (_synced(rec.t1_error) and _synced(rec.reflector_error)) else "?"
        parts.append(f"fwd={(rec.t2_ns - rec.t1_best_ns) / 1e6:.3f}{mark} rev={(rec.t4_ns - rec.t3_ns) / 1e6:.3f}{mark} ms")
    if rec.duplicates:
        parts.append(f"(DUP x{len(rec.duplicates)})")
    return " ".join(parts)


def format_summary(s: Summary, peer: str = "") -> str:
    """A ping-like closing block."""
    lines = [f"--- {peer or 'test session'} statistics ---"]
    L = s.loss
    direction = ""
    if L.lost and L.forward is not None:
        direction = f" (forward {L.forward}, reverse {L.reverse}{'' if L.direction_exact else ', approx.'})"
    lines.append(f"{L.sent} packets transmitted, {L.received} received, {L.percent:.1f}% packet loss{direction}")
    if s.rtt:
        r = s.rtt
        lines.append(f"rtt min/avg/max/mdev = {r.min:.3f}/{r.mean:.3f}/{r.max:.3f}/{r.stdev:.3f} ms, p50 {r.p50:.3f} p95 {r.p95:.3f} p99 {r.p99:.3f} ms")
    ow = s.one_way
    if ow.forward and ow.reverse:
        note = "clocks synchronised" if ow.trusted else "clocks NOT synchronised: one-way values untrusted"
        err = f", error <= {ow.error_bound_ms:.3f} ms" if ow.error_bound_ms is not None else ""
        lines.append(
            f"one-way fwd min/avg/max = {ow.forward.min:.3f}/{ow.forward.mean:.3f}/{ow.forward.max:.3f} ms, "
            f"rev {ow.reverse.min:.3f}/{ow.reverse.mean:.3f}/{ow.reverse.max:.3f} ms ({note}{err})"
        )
    if s.ipdv_forward or s.ipdv_reverse:
        f = s.ipdv_forward.mean if s.ipdv_forward else float("nan")
        b = s.ipdv_reverse.mean if s.ipdv_reverse else float("nan")
        lines.append(f"ipdv mean |fwd| {f:.3f} ms, |rev| {b:.3f} ms")
    extra = []
    if s.duplicates.total:
        extra.append(f"{s.duplicates.total} duplicates (fwd {s.duplicates.forward}, rev {s.duplicates.reverse})")
    if s.reorder_round_trip.reordered:
        extra.append(f"{s.reorder_round_trip.reordered} reordered ({100 * s.reorder_round_trip.ratio:.1f}%)")
    if s.hops_forward and s.hops_reverse:
        extra.append(f"ttl at reflector {s.hops_forward[0]}..{s.hops_forward[1]}, here {s.hops_reverse[0]}..{s.hops_reverse[1]}")
    if extra:
        lines.append(", ".join(extra))
    return "\n".join(lines)


# ------------------------------------------------------------------------ OWAMP


@dataclass(slots=True)
class OwampSummary:
    """One direction, from an OWAMP receiver's records (Fetch-Session data)."""

    sent: int
    received: int
    lost: int
    percent: float
    duplicates: int
    delay: Stats | None
    trusted: bool  # both clocks synchronised (S bits) on every record used
    error_bound_ms: float | None
    ipdv: Stats | None  # |IPDV| over consecutive sequence numbers
    reorder: Reordering
    ttl: tuple[int, int] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _owamp_ns(ts: int, err: int) -> int:
    from agent.engine.timefmt import unix_ns_from_ntp, unix_ns_from_ptp

    return unix_ns_from_ptp(ts) if err & 0x4000 else unix_ns_from_ntp(ts)


def summarize_owamp(records: Iterable[tuple[int, int, int, int, int, int]], sent: int | None = None) -> OwampSummary:
    """``records``: (Seq, Send-ErrEst, Recv-ErrEst, Send-Timestamp, Recv-Timestamp, TTL) in arrival
    order, as agent.engine.receiver.decode_fetch_records returns them; a Receive Timestamp of 0
    marks a lost packet (RFC 4656 §3.8). ``sent``: Next Seqno from Stop-Sessions, if known."""
    first: dict[int, tuple[int, int, int, int, int, int]] = {}
    order: list[int] = []
    dups = 0
    lost_seqs: set[int] = set()
    for rec in records:
        seq, serr, rerr, sts, rts, ttl = rec
        if rts == 0:
            lost_seqs.add(seq)
            continue
        if seq in first:
            dups += 1
            continue
        first[seq] = rec
        order.append(seq)
    if sent is None:
        sent = max([*first, *lost_seqs], default=-1) + 1
    received = sum(1 for s in first if s < sent)
    lost = max(0, sent - received)
    delays: dict[int, int] = {}
    trusted = bool(first)
    bound = 0.0
    for seq, (_s, serr, rerr, sts, rts, _ttl) in first.items():
        delays[seq] = _owamp_ns(rts, rerr) - _owamp_ns(sts, serr)
        trusted = trusted and _synced(serr) and _synced(rerr)
        bound = max(bound, _err_s(serr) + _err_s(rerr))
    ipdv = [abs(d - delays[s - 1]) for s, d in delays.items() if s - 1 in delays]
    ttls = [r[5] for r in first.values()]
    return OwampSummary(
        sent=sent,
        received=received,
        lost=lost,
        percent=100.0 * lost / sent if sent else 0.0,
        duplicates=dups,
        delay=Stats.of_ns(delays.values()),
        trusted=trusted,
        error_bound_ms=bound * 1e3 if first else None,
        ipdv=Stats.of_ns(ipdv),
        reorder=reordering(order),
        ttl=(min(ttls), max(ttls)) if ttls else None,
    )


def format_owamp_summary(s: OwampSummary, what: str = "") -> str:
    lines = [f"--- {what or 'one-way'} statistics ---"]
    lines.append(f"{s.sent} sent, {s.received} received, {s.percent:.1f}% lost, {s.duplicates} duplicates")
    if s.delay:
        d = s.delay
        note = "" if s.trusted else " (clocks NOT synchronised: values untrusted)"
        err = f", error <= {s.error_bound_ms:.3f} ms" if s.error_bound_ms is not None else ""
        lines.append(f"one-way delay min/median/max = {d.min:.3f}/{d.p50:.3f}/{d.max:.3f} ms{err}{note}")
    if s.ipdv:
        lines.append(f"ipdv mean |ipdv| {s.ipdv.mean:.3f} ms, p95 {s.ipdv.p95:.3f} ms")
    if s.reorder.reordered:
        lines.append(f"{s.reorder.reordered} reordered ({100 * s.reorder.ratio:.1f}%)")
    if s.ttl:
        lines.append(f"ttl {s.ttl[0]}..{s.ttl[1]}")
    return "\n".join(lines)
