"""Measurement state the exporter reads.

Threading model: every object here is mutated only by the agent's asyncio loop
thread (session runners, the supervisor), with plain ints and lists: no lock on
the per-packet path. :meth:`MetricsState.snapshot` copies everything into
immutable tuples; it must run on the loop thread too (the exporter's HTTP
handler lives on the loop, takes the snapshot there — a few ms for a thousand
sessions — and renders the text in a worker thread). A snapshot is therefore
consistent: a histogram's count always equals the sum of its buckets.

Tunnels are labelled by name / peer / reqid, never by SPI: SPIs change at every
rekey and would churn series. Kernel SA counters are summed across rekeys per
tunnel and direction, so they stay monotonic.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from agent.engine.txlag import TX_LAG

if TYPE_CHECKING:
    from agent.engine.sender import PacketRecord
    from agent.sessions.results import Summary
    from netlink.records import SA

RECENT = 256  # replies remembered for IPDV pairing when replies arrive out of order


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Labels of one measured tunnel/peer (the series identity)."""

    name: str
    peer: str  # remote address
    reqid: str = ""  # IPsec reqid, "" when unknown / not IPsec-bound
    protocol: str = "twamp"

    LABELS = ("name", "peer", "reqid", "protocol")

    @property
    def values(self) -> tuple[str, str, str, str]:
        return (self.name, self.peer, self.reqid, self.protocol)


class Histogram:
    """Fixed-bucket histogram: ``counts[i]`` = observations in (bounds[i-1], bounds[i]],
    the last slot is > bounds[-1] (+Inf). Values in seconds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def snapshot(self) -> "HistogramSnapshot":
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket, not cumulative; len(bounds) + 1
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        out, acc = [], 0
        for b, c in zip(self.bounds + (float("inf"),), self.counts):
            acc += c
            out.append((b, acc))
        return out


def _synced(packed: int | None) -> bool:
    return packed is not None and bool(packed & 0x8000)  # Error Estimate S bit


def _err_seconds(packed: int) -> float:
    return (packed & 0xFF) * 2.0 ** (((packed >> 8) & 0x3F) - 32)


COUNTER_FIELDS = ("sent", "received", "lost_forward", "lost_reverse", "lost_unknown",
                  "dup_forward", "dup_reverse", "reordered", "owd_untrusted_forward",
                  "owd_untrusted_reverse", "cycles", "restarts", "rekeys",
                  # the control connection's SA binding (agent.sessions.bound): re-established on the
                  # successor pair after a rekey; ended because the bound SA died / was refused
                  "rebinds", "stop_sa_deleted", "stop_binder_refused")


class SessionMetrics:
    """Counters and histograms of one measurement session (one tunnel or peer)."""

    def __init__(self, tunnel: Tunnel, buckets: tuple[float, ...], ipdv_buckets: tuple[float, ...],
                 origin: str = "configured") -> None:
        self.tunnel = tunnel
        self.origin = origin  # configured | discovered
        for f in COUNTER_FIELDS:
            setattr(self, f, 0)
        self.rtt = Histogram(buckets)
        self.owd_forward = Histogram(buckets)
        self.owd_reverse = Histogram(buckets)
        self.ipdv_forward = Histogram(ipdv_buckets)
        self.ipdv_reverse = Histogram(ipdv_buckets)
        self.ipdv_round_trip = Histogram(ipdv_buckets)
        self.up = False  # control connection established and test sessions running
        self.sa_bound = False  # the tunnel has a live SA pair
        self.sa_keyed = False  # the control connection is bound to and keyed from that pair
        self.peer_clock_error: float | None = None  # reflector's Error Estimate, seconds
        self.last_reply = 0.0  # unix seconds
        self._recent: dict[int, tuple[int | None, int | None, int | None]] = {}

    # counters are declared dynamically above; tell type checkers what they are
    sent: int
    received: int
    lost_forward: int
    lost_reverse: int
    lost_unknown: int
    dup_forward: int
    dup_reverse: int
    reordered: int
    owd_untrusted_forward: int
    owd_untrusted_reverse: int
    cycles: int
    restarts: int
    rekeys: int
    rebinds: int
    stop_sa_deleted: int
    stop_binder_refused: int

    # --- hot path (loop thread) ------------------------------------------------

    def on_sent(self, n: int = 1) -> None:
        self.sent += n

    def on_reply(self, rec: "PacketRecord") -> None:
        """A first copy of a reply arrived (duplicates are settled per cycle)."""
        self.received += 1
        self.last_reply = time.time()
        rtt = rec.rtt_ns
        if rtt is not None:
            self.rtt.observe(max(rtt, 0) / 1e9)
        fwd = rec.t2_ns - rec.t1_best_ns if rec.t2_ns is not None else None
        rev = rec.t4_ns - rec.t3_ns if rec.t3_ns is not None and rec.t4_ns is not None else None
        # One-way delays mix two clocks: only histogrammed when both are synchronised.
        trusted = _synced(rec.t1_error) and _synced(rec.reflector_error) and _synced(rec.t4_error)
        if fwd is not None:
            if trusted:
                self.owd_forward.observe(max(fwd, 0) / 1e9)
            else:
                self.owd_untrusted_forward += 1
        if rev is not None:
            if trusted:
                self.owd_reverse.observe(max(rev, 0) / 1e9)
            else:
                self.owd_untrusted_reverse += 1
        if rec.reflector_error is not None:
            self.peer_clock_error = _err_seconds(rec.reflector_error)
        # IPDV (RFC 5481) pairs consecutive sequence numbers whatever order they arrive in.
        seq = rec.seq
        mine = (fwd, rev, rtt)
        for other in (self._recent.get(seq - 1), self._recent.get(seq + 1)):
            if other is None:
                continue
            for hist, a, b in ((self.ipdv_forward, fwd, other[0]), (self.ipdv_reverse, rev, other[1]),
                               (self.ipdv_round_trip, rtt, other[2])):
                if a is not None and b is not None:
                    hist.observe(abs(a - b) / 1e9)
        self._recent[seq] = mine
        self._recent.pop(seq - RECENT, None)
        if len(self._recent) > 2 * RECENT:  # a sequence restart: forget, do not grow
            self._recent.clear()
            self._recent[seq] = mine

    def end_cycle(self, summary: "Summary") -> None:
        """Losses by direction, duplicates and reordering, settled once a cycle is over."""
        loss = summary.loss
        if loss.forward is None or loss.reverse is None:
            self.lost_unknown += loss.lost
        else:
            self.lost_forward += loss.forward
            self.lost_reverse += loss.reverse
        self.dup_forward += summary.duplicates.forward
        self.dup_reverse += summary.duplicates.reverse
        self.reordered += summary.reorder_round_trip.reordered
        self.cycles += 1
        self._recent.clear()  # the next cycle restarts sequence numbers

    def observe_cycle(self, records: "Iterable[PacketRecord]", reflector_stateful: bool | None = True) -> None:
        """Convenience for runners that only look at a cycle once it is over."""
        from agent.sessions.results import summarize

        recs = list(records)
        self.on_sent(len(recs))
        for r in sorted((r for r in recs if not r.lost), key=lambda r: r.arrival if r.arrival is not None else r.seq):
            self.on_reply(r)
        self.end_cycle(summarize(recs, reflector_stateful))

    def observe_owamp(self, forward: "Iterable[Any]", forward_sent: int, reverse: "Iterable[Any]",
                      reverse_sent: int) -> None:
        """One OWAMP cycle both ways: the server's records of our packets (forward) and our
        receiver's records of its packets (reverse); agent.control.messages.DataRecord."""
        self.sent += forward_sent
        for direction, recs, sent in (("forward", list(forward), forward_sent), ("reverse", list(reverse), reverse_sent)):
            hist = self.owd_forward if direction == "forward" else self.owd_reverse
            ipdv = self.ipdv_forward if direction == "forward" else self.ipdv_reverse
            seen: dict[int, int] = {}
            dups = 0
            for r in recs:
                if r.lost:
                    continue
                if r.seq in seen:
                    dups += 1
                    continue
                from agent.engine.timefmt import unix_ns_from_ntp

                d = unix_ns_from_ntp(r.recv_time) - unix_ns_from_ntp(r.send_time)
                seen[r.seq] = d
                if r.send_error.synced and r.recv_error.synced:
                    hist.observe(max(d, 0) / 1e9)
                elif direction == "forward":
                    self.owd_untrusted_forward += 1
                else:
                    self.owd_untrusted_reverse += 1
            for seq, d in seen.items():
                prev = seen.get(seq - 1)
                if prev is not None:
                    ipdv.observe(abs(d - prev) / 1e9)
            lost = max(0, sent - len(seen))
            if direction == "forward":
                self.received += len(seen)
                self.lost_forward += lost
                self.dup_forward += dups
            else:
                self.lost_reverse += lost
                self.dup_reverse += dups
        if forward_sent or reverse_sent:
            self.last_reply = time.time()
        self.cycles += 1

    def snapshot(self) -> "SessionSnapshot":
        return SessionSnapshot(
            tunnel=self.tunnel,
            origin=self.origin,
            counters={f: getattr(self, f) for f in COUNTER_FIELDS},
            histograms={n: getattr(self, n).snapshot() for n in HISTOGRAMS},
            up=self.up,
            sa_bound=self.sa_bound,
            sa_keyed=self.sa_keyed,
            peer_clock_error=self.peer_clock_error,
            last_reply=self.last_reply,
        )


HISTOGRAMS = ("rtt", "owd_forward", "owd_reverse", "ipdv_forward", "ipdv_reverse", "ipdv_round_trip")


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    tunnel: Tunnel
    origin: str
    counters: dict[str, int]
    histograms: dict[str, HistogramSnapshot]
    up: bool
    sa_bound: bool
    peer_clock_error: float | None
    last_reply: float
    sa_keyed: bool = False


# --- kernel SA counters --------------------------------------------------------

SA_COUNTERS = ("bytes", "packets", "replay_window", "replay", "integrity_failed")


def _sa_values(sa: "SA") -> tuple[int, int, int, int, int]:
    return (sa.current.bytes, sa.current.packets, sa.stats.replay_window, sa.stats.replay,
            sa.stats.integrity_failed)


def _alg(sa: "SA", which: str) -> str:
    a = getattr(sa, which)
    return a.name if a is not None else ""


class TunnelSAs:
    """The kernel SAs of one tunnel, per direction ("in", "out").

    Counters = values retired SAs had when last seen + values of the live ones, so a
    rekey (new SPIs, counters from zero) neither resets nor double counts."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.retired: dict[str, list[int]] = {"in": [0] * 5, "out": [0] * 5}
        self.live: dict[str, dict[tuple, tuple[int, ...]]] = {"in": {}, "out": {}}
        self.info: dict[str, tuple[str, ...]] = {}
        self.newest: dict[str, tuple | None] = {"in": None, "out": None}
        self.seen: set[tuple] = set()
        self.rekeys = 0

    def update(self, direction: str, sas: "Iterable[SA]", newest: "SA | None") -> None:
        cur = {sa.key_id: _sa_values(sa) for sa in sas}
        live = self.live[direction]
        for key, vals in live.items():
            if key not in cur:
                r = self.retired[direction]
                for i, v in enumerate(vals):
                    r[i] += v
        for key, vals in cur.items():
            old = live.get(key)
            # An SA's counters never decrease; an UPDSA with smaller values is stale.
            cur[key] = tuple(max(a, b) for a, b in zip(vals, old)) if old else vals
        self.live[direction] = cur
        new_key = newest.key_id if newest is not None else None
        if direction == "out" and new_key is not None and self.newest["out"] is not None \
                and new_key != self.newest["out"] and new_key not in self.seen:
            self.rekeys += 1
        if new_key is not None:
            self.seen.add(new_key)
            if len(self.seen) > 64:
                self.seen = {k for d in self.live.values() for k in d} | {new_key}
        self.newest[direction] = new_key
        if newest is not None:
            self.info[direction] = (
                str(newest.saddr), str(newest.daddr), _proto_name(int(newest.proto)), _mode_name(int(newest.mode)),
                str(newest.reqid), _alg(newest, "crypt"), _alg(newest, "auth"), _alg(newest, "aead"),
            )
        else:
            self.info.pop(direction, None)

    def totals(self, direction: str) -> tuple[int, ...]:
        r = self.retired[direction]
        out = list(r)
        for vals in self.live[direction].values():
            for i, v in enumerate(vals):
                out[i] += v
        return tuple(out)

    @property
    def bound(self) -> bool:
        return self.newest["in"] is not None and self.newest["out"] is not None

    def snapshot(self) -> "TunnelSASnapshot":
        return TunnelSASnapshot(self.tunnel, {d: self.totals(d) for d in ("in", "out")}, dict(self.info),
                                self.rekeys, self.bound)


SA_INFO_LABELS = ("src", "dst", "proto", "mode", "sa_reqid", "encryption", "integrity", "aead")


def _proto_name(p: int) -> str:
    return {50: "esp", 51: "ah", 108: "comp"}.get(p, str(p))


def _mode_name(m: int) -> str:
    return {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}.get(m, str(m))


@dataclass(frozen=True, slots=True)
class TunnelSASnapshot:
    tunnel: Tunnel
    totals: dict[str, tuple[int, ...]]
    info: dict[str, tuple[str, ...]]
    rekeys: int
    bound: bool


# --- the whole agent -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken: float
    sessions: tuple[SessionSnapshot, ...]
    tunnels: tuple[TunnelSASnapshot, ...]
    binder_refusals: dict[str, int]  # reason -> count
    stamps: dict[str, int]  # agent.engine.clock.StampCounters.snapshot()
    clock_error: float | None  # seconds; None when unknown
    clock_synced: bool | None
    server: dict[str, int]
    reloads: dict[str, int]  # success / failure
    last_reload_ok: bool
    last_reload_time: float
    start_time: float
    version: str
    sa_table: dict[str, int] = field(default_factory=dict)  # MetricsState.sa_table
    reflector: dict[str, int] = field(default_factory=dict)  # STAMP reflector counters (agent.engine.reflector)
    tx_lag: dict = field(default_factory=dict)  # role -> (bounds, counts, sum): agent.engine.txlag.TX_LAG
    task_failures: dict[str, int] = field(default_factory=dict)  # agent task -> unexpected ends


class MetricsState:
    """Everything the exporter shows; owned by the supervisor, mutated on the loop thread."""

    def __init__(self, buckets: tuple[float, ...], ipdv_buckets: tuple[float, ...] | None = None,
                 stamps: Callable[[], dict[str, int]] | None = None,
                 clock: Callable[[], tuple[float, bool] | None] | None = None) -> None:
        self.buckets = buckets
        self.ipdv_buckets = ipdv_buckets or buckets
        self.sessions: dict[str, SessionMetrics] = {}
        self.tunnels: dict[str, TunnelSAs] = {}
        self.binder_refusals: dict[str, int] = {}
        # Counters kept elsewhere (agent.binder.announce.Binder.refusals), summed into the snapshot.
        self.refusal_sources: list[Callable[[], Mapping[str, int]]] = []
        self.server = {"connections_total": 0, "refused_total": 0}
        self.reflector: dict[str, int] = {}  # the [reflector] STAMP endpoint's counters, when enabled
        self.reloads = {"success": 0, "failure": 0}
        self.task_failures: dict[str, int] = {}  # supervised agent tasks that ended unexpectedly
        self.last_reload_ok = True
        self.last_reload_time = time.time()
        self.start_time = time.time()
        # How the SA table is kept (docs/metrics.md "Agent"): event overruns (ENOBUFS on
        # the notification socket), full re-dumps by reason, targeted counter lookups.
        self.sa_table = {"overruns": 0, "redumps_start": 0, "redumps_overrun": 0, "redumps_schedule": 0,
                         "lookups": 0, "size": 0}
        self._stamps = stamps
        self._clock = clock

    def session(self, key: str, tunnel: Tunnel, origin: str = "configured") -> SessionMetrics:
        """The metrics of session ``key``, created on first use; kept when the same tunnel
        is restarted (counters continue), replaced if its labels changed."""
        m = self.sessions.get(key)
        if m is None or m.tunnel != tunnel:
            m = SessionMetrics(tunnel, self.buckets, self.ipdv_buckets, origin)
            self.sessions[key] = m
        return m

    def drop_session(self, key: str) -> None:
        self.sessions.pop(key, None)

    def tunnel_sas(self, key: str, tunnel: Tunnel) -> TunnelSAs:
        t = self.tunnels.get(key)
        if t is None or t.tunnel != tunnel:
            t = TunnelSAs(tunnel)
            self.tunnels[key] = t
        return t

    def drop_tunnel(self, key: str) -> None:
        self.tunnels.pop(key, None)

    def binder_refused(self, reason: str) -> None:
        k = str(getattr(reason, "value", reason))
        self.binder_refusals[k] = self.binder_refusals.get(k, 0) + 1

    def task_failed(self, task: str) -> None:
        self.task_failures[task] = self.task_failures.get(task, 0) + 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1
        self.last_reload_ok = ok
        if ok:
            self.last_reload_time = time.time()

    def snapshot(self) -> Snapshot:
        from agent import __version__

        clock = None
        if self._clock is not None:
            try:
                clock = self._clock()
            except OSError:
                clock = None
        stamps: dict[str, int] = {}
        if self._stamps is not None:
            stamps = dict(self._stamps())
        refusals = dict(self.binder_refusals)
        for src in self.refusal_sources:
            for k, n in src().items():
                refusals[str(k)] = refusals.get(str(k), 0) + int(n)
        return Snapshot(
            taken=time.time(),
            sessions=tuple(m.snapshot() for m in self.sessions.values()),
            tunnels=tuple(t.snapshot() for t in self.tunnels.values()),
            binder_refusals=refusals,
            stamps=stamps,
            clock_error=clock[0] if clock else None,
            clock_synced=clock[1] if clock else None,
            server=dict(self.server),
            reloads=dict(self.reloads),
            last_reload_ok=self.last_reload_ok,
            last_reload_time=self.last_reload_time,
            start_time=self.start_time,
            version=__version__,
            sa_table=dict(self.sa_table),
            reflector=dict(self.reflector),
            tx_lag=TX_LAG.snapshot(),
            task_failures=dict(self.task_failures),
        )


def default_clock() -> Callable[[], tuple[float, bool] | None]:
    """The local clock's error estimate (adjtimex, cached for 1 s) as (seconds, synchronised)."""
    from agent.engine.clock import ClockErrorCache

    cache = ClockErrorCache(refresh_s=1.0)

    def read() -> tuple[float, bool] | None:
        st = cache.state()
        return (st.error_seconds(), st.synced)

    return read


def default_stamps() -> Callable[[], dict[str, int]]:
    """Process-wide stamp sources (agent.engine.clock.STAMP_COUNTERS), plus the reflector's TX
    stamps of its replies (what its Follow-Up Telemetry reports as T3) as ``reply_hw``/``reply_sw``."""
    from agent.engine.clock import STAMP_COUNTERS
    from agent.engine.udp import REPLY_TX_COUNTERS

    def read() -> dict[str, int]:
        out = STAMP_COUNTERS.snapshot()
        r = REPLY_TX_COUNTERS.snapshot()
        out["reply_hw"], out["reply_sw"] = r["tx_hw"], r["tx_sw"]
        return out

    return read
