"""Prometheus exposition of the agent's measurement state (docs/metrics.md lists every metric).

* :class:`XwampCollector` — a prometheus_client custom Collector over a
  :class:`agent.sessions.metrics.Snapshot` provider;
* :func:`render` — one scrape body for a snapshot, content-negotiated (text or OpenMetrics);
* :class:`MetricsServer` — a small asyncio HTTP server on its own thread and loop: it has
  the snapshot taken on the agent's loop (one callback: consistent, no locks) and renders
  it in a child process (:class:`RenderWorker`), so a large scrape neither waits behind
  nor delays the test packets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import logging
import os
import pickle
import ssl
import platform
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
)
from prometheus_client.utils import floatToGoString

from agent.sessions.metrics import SA_INFO_LABELS, Snapshot, Tunnel

log = logging.getLogger(__name__)

T = list(Tunnel.LABELS)
NS = "xwamp"


def _le(b: float) -> str:
    return floatToGoString(b)


class XwampCollector:
    """prometheus_client Collector: ``registry.register(XwampCollector(state.snapshot))``.

    ``snapshot`` must return a consistent :class:`Snapshot`; when the collector is driven
    from another thread than the loop that owns the state, pass a function that fetches
    the snapshot through the loop (see :meth:`MetricsServer` for the usual path)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # dynamic label sets: no up-front description (registry auto_describe off)

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snapshot())


# Per-tunnel families, one table each: both the Collector (families) and the fast text
# writer (render_text) are driven from these, so the two paths cannot drift apart.
# (name, help, extra label or None, ((extra label value, snapshot key), ...))
SESSION_HISTOGRAMS: tuple[tuple[str, str, str | None, tuple[tuple[str | None, str], ...]], ...] = (
    ("rtt_seconds", "Round-trip time (RFC 5357: reflector residence time removed).", None, ((None, "rtt"),)),
    ("one_way_delay_seconds", "One-way delay, only from packets whose both clocks were synchronised.", "direction",
     (("forward", "owd_forward"), ("reverse", "owd_reverse"))),
    ("ipdv_seconds", "Absolute IP packet delay variation of consecutive packets (RFC 5481).", "direction",
     (("forward", "ipdv_forward"), ("reverse", "ipdv_reverse"), ("round_trip", "ipdv_round_trip"))),
)
SESSION_COUNTERS: tuple[tuple[str, str, str | None, tuple[tuple[str | None, str], ...]], ...] = (
    ("packets_sent", "Test packets sent.", None, ((None, "sent"),)),
    ("packets_received", "Test packet replies received (first copies).", None, ((None, "received"),)),
    ("packets_lost", "Test packets lost; direction forward/reverse from the reflector's numbering, "
     "unknown when it cannot tell.", "direction",
     (("forward", "lost_forward"), ("reverse", "lost_reverse"), ("unknown", "lost_unknown"))),
    ("packets_duplicated", "Extra copies of replies (RFC 5560).", "direction",
     (("forward", "dup_forward"), ("reverse", "dup_reverse"))),
    ("packets_reordered", "Replies that arrived reordered (RFC 4737, round trip).", None, ((None, "reordered"),)),
    ("one_way_delay_untrusted", "One-way delay samples left out of the histogram: a clock was not synchronised.",
     "direction", (("forward", "owd_untrusted_forward"), ("reverse", "owd_untrusted_reverse"))),
    ("cycles", "Measurement cycles completed (loss is settled per cycle).", None, ((None, "cycles"),)),
    ("session_restarts", "Times the session was (re)started after a failure.", None, ((None, "restarts"),)),
    ("session_rebinds", "Times the session's control connection was re-established on the successor SA "
     "pair after a rekey (IPsec-bound modes).", None, ((None, "rebinds"),)),
    ("session_stops", "Sessions ended by their SA binding: sa_deleted (the bound SA died with no successor), "
     "binder_refused (the binder refused the connection).", "reason",
     (("sa_deleted", "stop_sa_deleted"), ("binder_refused", "stop_binder_refused"))),
)
# (name, help, value or None to omit the series)
SESSION_GAUGES: tuple[tuple[str, str, Callable[[Any], float | None]], ...] = (
    ("session_up", "1 when the control connection is up and test packets flow.", lambda ss: 1 if ss.up else 0),
    ("session_sa_bound", "1 when the tunnel has a live SA in each direction.", lambda ss: 1 if ss.sa_bound else 0),
    ("session_sa_keyed", "1 when the control connection is bound to the tunnel's SA pair and keyed from it "
     "(an IPsec-derived mode).", lambda ss: 1 if ss.sa_keyed else 0),
    ("peer_clock_error_seconds", "The reflector's clock Error Estimate, as last reported.",
     lambda ss: ss.peer_clock_error),
    ("last_reply_timestamp_seconds", "Unix time of the last reply.", lambda ss: ss.last_reply or None),
)
# Kernel SA counters: (name, help, index into TunnelSASnapshot.totals[direction])
TUNNEL_COUNTERS: tuple[tuple[str, str, int], ...] = (
    ("sa_bytes", "Bytes through the tunnel's SAs (kernel lifetime counter).", 0),
    ("sa_packets", "Packets through the tunnel's SAs (kernel lifetime counter).", 1),
    ("sa_replay_window_errors", "Packets dropped outside the replay window (kernel).", 2),
    ("sa_replay_errors", "Replayed packets dropped (kernel).", 3),
    ("sa_integrity_failures", "Packets that failed integrity checks (kernel).", 4),
)
REKEYS_HELP = "Rekeys seen (the tunnel's outbound SA replaced by a new one)."
SA_INFO_HELP = "The SA currently used by a tunnel in each direction (value 1)."


def tunnel_families(s: Snapshot) -> Iterator[Metric]:
    """The per-tunnel families (sessions and their SAs), as prometheus_client Metrics."""
    for name, doc, extra, series in SESSION_HISTOGRAMS:
        fam = HistogramMetricFamily(f"{NS}_{name}", doc, labels=T + ([extra] if extra else []))
        for ss in s.sessions:
            lv = list(ss.tunnel.values)
            for ev, key in series:
                h = ss.histograms[key]
                fam.add_metric(lv + ([ev] if ev else []), [(_le(b), c) for b, c in h.cumulative()], h.sum)
        yield fam
    for name, doc, extra, series in SESSION_COUNTERS:
        cfam = CounterMetricFamily(f"{NS}_{name}", doc, labels=T + ([extra] if extra else []))
        for ss in s.sessions:
            lv = list(ss.tunnel.values)
            for ev, key in series:
                cfam.add_metric(lv + ([ev] if ev else []), ss.counters[key])
        yield cfam
    for name, doc, get in SESSION_GAUGES:
        gfam = GaugeMetricFamily(f"{NS}_{name}", doc, labels=T)
        for ss in s.sessions:
            v = get(ss)
            if v is not None:
                gfam.add_metric(list(ss.tunnel.values), v)
        yield gfam
    for name, doc, idx in TUNNEL_COUNTERS:
        cfam = CounterMetricFamily(f"{NS}_{name}", doc, labels=T + ["direction"])
        for ts in s.tunnels:
            for d in ("in", "out"):
                cfam.add_metric(list(ts.tunnel.values) + [d], ts.totals[d][idx])
        yield cfam
    rekeys = CounterMetricFamily(f"{NS}_rekeys", REKEYS_HELP, labels=T)
    info = GaugeMetricFamily(f"{NS}_sa_info", SA_INFO_HELP, labels=T + ["direction"] + list(SA_INFO_LABELS))
    for ts in s.tunnels:
        lv = list(ts.tunnel.values)
        rekeys.add_metric(lv, ts.rekeys)
        for d in ("in", "out"):
            if d in ts.info:
                info.add_metric(lv + [d] + list(ts.info[d]), 1)
    yield rekeys
    yield info


def families(s: Snapshot) -> Iterator[Metric]:
    yield from tunnel_families(s)
    yield from agent_families(s)


def agent_families(s: Snapshot) -> Iterator[Metric]:
    """Process-wide families: few series, whatever the number of tunnels."""
    active = GaugeMetricFamily(f"{NS}_sessions", "Measurement sessions by state.", labels=["origin", "state"])
    counts: dict[tuple[str, str], int] = {(o, st): 0 for o in ("configured", "discovered") for st in ("up", "down")}
    for ss in s.sessions:
        k = (ss.origin, "up" if ss.up else "down")
        counts[k] = counts.get(k, 0) + 1
    for (o, st), n in sorted(counts.items()):
        active.add_metric([o, st], n)
    yield active

    refusals = CounterMetricFamily(f"{NS}_binder_refusals", "Sessions the IPsec key binder refused, by reason.",
                                   labels=["reason"])
    for reason, n in sorted(s.binder_refusals.items()):
        refusals.add_metric([reason], n)
    yield refusals

    stamps = CounterMetricFamily(f"{NS}_timestamps", "Packet timestamps by where they came from.",
                                 labels=["direction", "source"])
    for d in ("tx", "rx"):
        for src in ("hw", "sw", "user"):
            stamps.add_metric([d, src], s.stamps.get(f"{d}_{src}", 0))
    for src in ("hw", "sw"):
        # t3: the peer reflector's TX stamps of our STAMP samples, via its Follow-Up Telemetry;
        # reply: our own reflector's TX stamps of its replies (what our Follow-Up answers carry).
        stamps.add_metric(["t3", src], s.stamps.get(f"t3_{src}", 0))
        stamps.add_metric(["reply", src], s.stamps.get(f"reply_{src}", 0))
    yield stamps
    if s.tx_lag:
        # agent.engine.txlag: kernel TX stamp minus the timestamp written in the packet (T3 / T1).
        lag = HistogramMetricFamily(f"{NS}_tx_stamp_lag_seconds", "How long after the timestamp written in a "
                                    "test packet the kernel sent it (TX stamp minus written stamp).", labels=["role"])
        for role, (bounds, counts, total) in sorted(s.tx_lag.items()):
            acc, buckets = 0, []
            for b, c in zip(list(bounds) + [float("inf")], counts):
                acc += c
                buckets.append((floatToGoString(b), acc))
            lag.add_metric([role], buckets, total)
        yield lag
    yield CounterMetricFamily(f"{NS}_timestamp_hw_fallbacks", "Packets on a hardware-stamping socket that got "
                              "only a software stamp.", value=s.stamps.get("hw_fallback", 0))
    yield CounterMetricFamily(f"{NS}_timestamp_hw_rx_refused", "NIC configurations where the driver refused "
                              "RX filters all and ntp-all: software RX stamps, hardware TX.",
                              value=s.stamps.get("hw_rx_refused", 0))
    yield CounterMetricFamily(f"{NS}_timestamp_phc_unconverted", "Hardware stamps dropped: no PHC to "
                              "CLOCK_REALTIME relation.", value=s.stamps.get("phc_unconverted", 0))
    if s.clock_error is not None:
        yield GaugeMetricFamily(f"{NS}_clock_error_seconds", "The local clock's error estimate (adjtimex).",
                                value=s.clock_error)
    if s.clock_synced is not None:
        yield GaugeMetricFamily(f"{NS}_clock_synchronized", "1 when the kernel says the clock is synchronised.",
                                value=1 if s.clock_synced else 0)

    srv = s.server
    yield CounterMetricFamily(f"{NS}_server_connections_accepted", "Control connections accepted.",
                              value=srv.get("connections_total", 0))
    yield CounterMetricFamily(f"{NS}_server_connections_refused", "Control connections refused (limits).",
                              value=srv.get("refused_total", 0))
    yield CounterMetricFamily(f"{NS}_control_auth_failures", "Failed control authentications (Set-Up-Response).",
                              value=srv.get("auth_failures_total", 0))
    yield CounterMetricFamily(f"{NS}_control_auth_rate_limited",
                              "Control set-ups refused because their address failed too often.",
                              value=srv.get("auth_rate_limited_total", 0))
    if s.reflector:
        # [reflector]: the STAMP Session-Reflector's packets by outcome (agent.engine.reflector).
        rf = CounterMetricFamily(f"{NS}_stamp_reflector_packets", "STAMP reflector packets by result.",
                                 labels=["result"])
        for k in sorted(s.reflector):
            if k != "peers":
                rf.add_metric([k], s.reflector[k])
        yield rf
        yield GaugeMetricFamily(f"{NS}_stamp_reflector_peers", "Senders (address, port, SSID) a stateful "
                                "STAMP reflector keeps numbers for.", value=s.reflector.get("peers", 0))
    caps = CounterMetricFamily(f"{NS}_server_caps", "Times a cap against hostile peers acted, by cap.", labels=["cap"])
    for k, v in sorted(srv.items()):
        if k.startswith("cap_"):
            caps.add_metric([k[4:]], v)
    yield caps
    reloads = CounterMetricFamily(f"{NS}_config_reloads", "Configuration reloads (SIGHUP).", labels=["result"])
    for k in ("success", "failure"):
        reloads.add_metric([k], s.reloads.get(k, 0))
    yield reloads
    failures = CounterMetricFamily(f"{NS}_agent_task_failures", "Agent tasks (session supervisors, SA "
                                   "followers, reloads) that ended unexpectedly; each was logged.", labels=["task"])
    for k, n in sorted(s.task_failures.items()):
        failures.add_metric([k], n)
    yield failures
    yield GaugeMetricFamily(f"{NS}_config_last_reload_successful", "1 when the last reload succeeded.",
                            value=1 if s.last_reload_ok else 0)
    yield GaugeMetricFamily(f"{NS}_config_last_reload_success_timestamp_seconds",
                            "Unix time of the last configuration load or reload.", value=s.last_reload_time)
    st = s.sa_table
    if st:
        yield CounterMetricFamily(f"{NS}_sa_event_overruns", "XFRM notifications lost: ENOBUFS on the "
                                  "agent's notification socket (each forces a full SA re-dump).",
                                  value=st.get("overruns", 0))
        redumps = CounterMetricFamily(f"{NS}_sa_redumps", "Full dumps of the kernel's SA table, by reason.",
                                      labels=["reason"])
        for k in ("start", "overrun", "schedule"):
            redumps.add_metric([k], st.get(f"redumps_{k}", 0))
        yield redumps
        yield CounterMetricFamily(f"{NS}_sa_lookups", "Targeted XFRM_MSG_GETSA lookups refreshing the "
                                  "counters of measured SAs.", value=st.get("lookups", 0))
        yield GaugeMetricFamily(f"{NS}_sa_table_entries", "SAs in the agent's copy of the kernel's SA table.",
                                value=st.get("size", 0))
    yield GaugeMetricFamily(f"{NS}_start_time_seconds", "Unix time the agent started.", value=s.start_time)
    build = GaugeMetricFamily(f"{NS}_build_info", "Version of the agent (value 1).", labels=["version", "python"])
    build.add_metric([s.version, platform.python_version()], 1)
    yield build


def render(snapshot: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
    """The scrape body and its Content-Type: OpenMetrics through prometheus_client if the
    scraper asks for it, else the classic text format through :func:`render_text`."""
    encoder, content_type = choose_encoder(accept or "")
    if content_type.startswith("text/plain"):
        return render_text(snapshot), CONTENT_TYPE_PLAIN_0_0_4
    registry = CollectorRegistry(auto_describe=False)
    registry.register(XwampCollector(lambda: snapshot))
    return encoder(registry), content_type


class _Families:
    def __init__(self, fams: Callable[[], Iterator[Metric]]) -> None:
        self._fams = fams

    def collect(self) -> Iterator[Metric]:
        return self._fams()


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float | int) -> str:
    if isinstance(v, int):
        return f"{v}.0"
    return floatToGoString(v)


def render_text(s: Snapshot) -> bytes:
    """Text format 0.0.4, written directly: prometheus_client's generic path costs ~40 µs
    per sample, i.e. seconds of GIL for a thousand tunnels' ~150k samples, which would
    delay test packets. Per-tunnel families come from the same tables as the Collector
    (tests compare both outputs); the few process-wide ones go through prometheus_client."""
    out: list[str] = []
    w = out.append
    sess = [(ss, ",".join(f'{k}="{_esc(v)}"' for k, v in zip(Tunnel.LABELS, ss.tunnel.values))) for ss in s.sessions]
    les: dict[tuple[float, ...], list[str]] = {}
    for name, doc, extra, series in SESSION_HISTOGRAMS:
        n = f"{NS}_{name}"
        w(f"# HELP {n} {_help(doc)}\n# TYPE {n} histogram\n")
        for ss, lbl in sess:
            for ev, key in series:
                h = ss.histograms[key]
                le = les.get(h.bounds)
                if le is None:
                    le = les[h.bounds] = [_le(b) for b in h.bounds] + ["+Inf"]
                l2 = f'{lbl},{extra}="{ev}"' if extra else lbl
                acc = 0
                for b, c in zip(le, h.counts):
                    acc += c
                    w(f'{n}_bucket{{{l2},le="{b}"}} {acc}.0\n')
                w(f"{n}_count{{{l2}}} {acc}.0\n{n}_sum{{{l2}}} {_num(h.sum)}\n")
    for name, doc, extra, series in SESSION_COUNTERS:
        n = f"{NS}_{name}_total"
        w(f"# HELP {n} {_help(doc)}\n# TYPE {n} counter\n")
        for ss, lbl in sess:
            c = ss.counters
            for ev, key in series:
                w(f'{n}{{{lbl},{extra}="{ev}"}} {_num(c[key])}\n' if extra else f"{n}{{{lbl}}} {_num(c[key])}\n")
    for name, doc, get in SESSION_GAUGES:
        n = f"{NS}_{name}"
        w(f"# HELP {n} {_help(doc)}\n# TYPE {n} gauge\n")
        for ss, lbl in sess:
            v = get(ss)
            if v is not None:
                w(f"{n}{{{lbl}}} {_num(v)}\n")
    tun = [(ts, ",".join(f'{k}="{_esc(v)}"' for k, v in zip(Tunnel.LABELS, ts.tunnel.values))) for ts in s.tunnels]
    for name, doc, idx in TUNNEL_COUNTERS:
        n = f"{NS}_{name}_total"
        w(f"# HELP {n} {_help(doc)}\n# TYPE {n} counter\n")
        for ts, lbl in tun:
            for d in ("in", "out"):
                w(f'{n}{{{lbl},direction="{d}"}} {_num(ts.totals[d][idx])}\n')
    n = f"{NS}_rekeys_total"
    w(f"# HELP {n} {_help(REKEYS_HELP)}\n# TYPE {n} counter\n")
    for ts, lbl in tun:
        w(f"{n}{{{lbl}}} {_num(ts.rekeys)}\n")
    n = f"{NS}_sa_info"
    w(f"# HELP {n} {_help(SA_INFO_HELP)}\n# TYPE {n} gauge\n")
    for ts, lbl in tun:
        for d in ("in", "out"):
            if d in ts.info:
                extra_l = ",".join(f'{k}="{_esc(v)}"' for k, v in zip(SA_INFO_LABELS, ts.info[d]))
                w(f'{n}{{{lbl},direction="{d}",{extra_l}}} 1.0\n')
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(lambda: agent_families(s)))  # type: ignore[arg-type]
    return "".join(out).encode() + generate_latest(registry)


class MetricsServer:
    """``GET /metrics``. ``start()`` must be awaited on the loop that owns the state."""

    MAX_HEADER = 16384
    TIMEOUT = 60.0  # the scraper's scrape_timeout is the real limit
    HEADER_TIMEOUT = 5.0  # a request's head must arrive within this (idle or slow-drip connections)
    MAX_CLIENTS = 16

    def __init__(self, snapshot: Callable[[], Snapshot], host: str, port: int, worker: bool = True,
                 threaded: bool = True, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: serve HTTPS (see :func:`tls_context`)."""
        self._snapshot = snapshot
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._clients = 0
        # Connections still reading their request head, oldest first: when all slots are
        # taken, a newcomer closes the oldest of these (issue 11 row 11: 16 idle
        # connections locked every scrape out for 60 s). Ones rendering are never cut.
        self._reading: dict[asyncio.StreamWriter, None] = {}
        self.evicted = 0
        self.worker = RenderWorker() if worker else None
        self.threaded = threaded
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Bind (errors such as EADDRINUSE raise here) and serve from the exporter thread."""
        self._main = asyncio.get_running_loop()
        if not self.threaded:
            return await self._bind()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="xwamp-exporter", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def _bind(self) -> None:
        tls: dict[str, Any] = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.HEADER_TIMEOUT} \
            if self.ssl_context is not None else {}
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True, **tls)
        if self.port == 0:  # tests: learn the ephemeral port
            self.port = self._server.sockets[0].getsockname()[1]

    async def _unbind(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.worker is not None:
            await self.worker.close()

    def _thread_main(self, ready: concurrent.futures.Future) -> None:
        # The exporter's own loop: HTTP and pipe I/O never wait behind a busy measurement
        # loop; only the snapshot itself is taken there (one callback).
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's loop, for whatever asks for "the" loop
        self._loop = loop
        try:
            loop.run_until_complete(self._bind())
        except BaseException as e:
            ready.set_exception(e)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        except Exception:  # through our log format, not threading's raw traceback on stderr
            log.exception("exporter thread failed")
        finally:
            try:
                loop.run_until_complete(self._unbind())
                pending = asyncio.all_tasks(loop)  # scrapes in flight at shutdown
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            except Exception:
                log.exception("exporter shutdown failed")
            loop.close()

    async def close(self) -> None:
        if not self.threaded:
            return await self._unbind()
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    async def _take_snapshot(self) -> Snapshot:
        """The snapshot, taken on the loop that owns the state (consistent, lock-free)."""
        main = self._main
        if main is None or main is asyncio.get_running_loop():
            return self._snapshot()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def take() -> None:
            try:
                fut.set_result(self._snapshot())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(e)

        main.call_soon_threadsafe(take)
        return await asyncio.wrap_future(fut)

    @property
    def sockname(self) -> tuple[str, int]:
        return (self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= self.MAX_CLIENTS:
            idle = next(iter(self._reading), None)
            if idle is None:  # every slot is rendering a scrape: those finish soon
                writer.close()
                return
            del self._reading[idle]
            idle.transport.abort()  # its _handle sees the reset and frees its slot
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 100 == 0:
                log.warning("metrics port: closed an idle connection for a scrape",
                            extra={"evicted_total": self.evicted})
        self._clients += 1
        self._reading[writer] = None
        try:
            await asyncio.wait_for(self._serve(reader, writer), self.TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                OSError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._reading.pop(writer, None)
            self._clients -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.HEADER_TIMEOUT)
        self._reading.pop(writer, None)
        if len(head) > self.MAX_HEADER:
            return await self._reply(writer, 431, b"header too large\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return await self._reply(writer, 400, b"bad request\n")
        method, target, _ = parts
        headers = {}
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return await self._reply(writer, 405, b"method not allowed\n", extra={"Allow": "GET, HEAD"})
        if path == "/":
            return await self._reply(writer, 200, b'<html><body><a href="/metrics">/metrics</a></body></html>\n',
                                     "text/html; charset=utf-8", head_only=method == "HEAD")
        if path != "/metrics":
            return await self._reply(writer, 404, b"not found\n")
        snap = await self._take_snapshot()
        accept = headers.get("accept")
        gz = "gzip" in headers.get("accept-encoding", "")
        body, ctype = await self._render(snap, accept, gz)
        await self._reply(writer, 200, body, ctype, head_only=method == "HEAD",
                          extra={"Content-Encoding": "gzip"} if gz else None)

    async def _render(self, snap: Snapshot, accept: str | None, gz: bool) -> tuple[bytes, str]:
        if self.worker is not None:
            try:
                return await self.worker.render(snap, accept, gz)
            except (OSError, EOFError, ValueError, pickle.PickleError, asyncio.IncompleteReadError) as e:
                # Once is enough: a worker that cannot start (e.g. the service user may not
                # execute this interpreter) would otherwise warn on every scrape.
                log.warning("render worker failed, rendering in a thread from now on",
                            extra={"error": str(e) or type(e).__name__})
                worker, self.worker = self.worker, None
                with contextlib.suppress(Exception):
                    await worker.close()
        return await asyncio.get_running_loop().run_in_executor(None, _render_encoded, snap, accept, gz)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                     head_only: bool = False, extra: dict[str, str] | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}.get(status, "")
        hdr = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
               "Connection: close"]
        hdr += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(hdr) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            # Hand the whole body to the transport: drain() at the default 64 KiB high-water
            # mark would cost a loop round trip per 64 KiB of a multi-MB scrape.
            writer.transport.set_write_buffer_limits(high=max(len(body), 1 << 16))
            writer.write(body)
        await writer.drain()


# Prometheus exporter-toolkit's client_auth_type values Python's ssl can honour.
CLIENT_AUTH_TYPES = {"NoClientCert": "CERT_NONE", "VerifyClientCertIfGiven": "CERT_OPTIONAL",
                     "RequireAndVerifyClientCert": "CERT_REQUIRED"}


def tls_context(cert_file: str, key_file: str, client_ca_file: str | None = None,
                client_auth_type: str = "NoClientCert") -> ssl.SSLContext:
    """The server TLS context of an exporter-toolkit style ``tls_server_config`` (TLS 1.2+).
    Raises OSError / ssl.SSLError / ValueError for unreadable or mismatched files."""

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)
    ctx.verify_mode = getattr(ssl, CLIENT_AUTH_TYPES[client_auth_type])
    return ctx


def _render_encoded(snap: Snapshot, accept: str | None, gz: bool) -> tuple[bytes, str]:
    body, ctype = render(snap, accept)
    return (gzip.compress(body, 1) if gz else body), ctype


_LEN = struct.Struct("!I")
PIPE_LIMIT = 4 << 20


class RenderWorker:
    """Renders scrapes in a child process. A thousand tunnels are ~150k samples, a few
    hundred ms of CPU: in a thread that would hold the GIL against the loop that times the
    test packets (and the scrape itself crawls under contention). The child gets a pickled
    snapshot (metrics only, no keys) on stdin and answers on stdout; it exits on EOF.
    Any failure falls back to a thread (MetricsServer._render)."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def _spawn(self) -> asyncio.subprocess.Process:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)  # only the agent talks to systemd
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from exporters.prometheus import worker_main; worker_main()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=root,
            limit=PIPE_LIMIT)  # a big read buffer: fewer loop round trips per MB

    async def render(self, snap: Snapshot, accept: str | None, gz: bool) -> tuple[bytes, str]:
        async with self._lock:  # one request in flight: the pipe is a simple request/answer stream
            if self._proc is None or self._proc.returncode is not None:
                self._proc = await self._spawn()
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            try:
                data = pickle.dumps((snap, accept, gz), protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.write(_LEN.pack(len(data)) + data)
                await proc.stdin.drain()
                (n,) = _LEN.unpack(await proc.stdout.readexactly(_LEN.size))
                body, ctype = pickle.loads(await proc.stdout.readexactly(n))
                return body, ctype
            except BaseException:
                await self._kill()  # a half-read stream cannot be reused
                raise

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except asyncio.TimeoutError:
            self._proc = proc
            await self._kill()


def worker_main() -> None:
    """The render child: length-prefixed pickles in, rendered bodies out, until EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the agent: the agent stops us (EOF)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        (n,) = _LEN.unpack(head)
        snap, accept, gz = pickle.loads(inp.read(n))
        data = pickle.dumps(_render_encoded(snap, accept, gz), protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_LEN.pack(len(data)) + data)
        out.flush()
