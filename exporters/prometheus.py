"""Prometheus exposition of the agent's measurement state (docs/metrics.md lists every metric).

* :class:`XwampCollector` — a prometheus_client custom Collector over a
  :class:`agent.metrics.Snapshot` provider;
* :func:`render` — one scrape body for a snapshot, content-negotiated (text or OpenMetrics);
* :class:`MetricsServer` — a small asyncio HTTP server on the agent's loop: it takes the
  snapshot on the loop (consistent, no locks) and renders in a worker thread (so a large
  scrape never delays test packets).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import platform
from typing import Callable, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from agent.metrics import SA_INFO_LABELS, Snapshot, Tunnel

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


def families(s: Snapshot) -> Iterator[Metric]:
    def hist(name: str, doc: str, extra: list[str] | None = None) -> HistogramMetricFamily:
        return HistogramMetricFamily(f"{NS}_{name}", doc, labels=T + (extra or []), unit="")

    rtt = hist("rtt_seconds", "Round-trip time (RFC 5357: reflector residence time removed).")
    owd = hist("one_way_delay_seconds", "One-way delay, only from packets whose both clocks were synchronised.",
               ["direction"])
    ipdv = hist("ipdv_seconds", "Absolute IP packet delay variation of consecutive packets (RFC 5481).", ["direction"])
    for ss in s.sessions:
        lv = list(ss.tunnel.values)
        for fam, key, extra in ((rtt, "rtt", []), (owd, "owd_forward", ["forward"]), (owd, "owd_reverse", ["reverse"]),
                                (ipdv, "ipdv_forward", ["forward"]), (ipdv, "ipdv_reverse", ["reverse"]),
                                (ipdv, "ipdv_round_trip", ["round_trip"])):
            h = ss.histograms[key]
            fam.add_metric(lv + extra, [(_le(b), c) for b, c in h.cumulative()], h.sum)
    yield rtt
    yield owd
    yield ipdv

    def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
        return CounterMetricFamily(f"{NS}_{name}", doc, labels=T + (extra or []))

    sent = counter("packets_sent", "Test packets sent.")
    received = counter("packets_received", "Test packet replies received (first copies).")
    lost = counter("packets_lost", "Test packets lost; direction forward/reverse from the reflector's numbering, "
                   "unknown when it cannot tell.", ["direction"])
    dup = counter("packets_duplicated", "Extra copies of replies (RFC 5560).", ["direction"])
    reord = counter("packets_reordered", "Replies that arrived reordered (RFC 4737, round trip).")
    untrusted = counter("one_way_delay_untrusted", "One-way delay samples left out of the histogram: "
                        "a clock was not synchronised.", ["direction"])
    cycles = counter("cycles", "Measurement cycles completed (loss is settled per cycle).")
    restarts = counter("session_restarts", "Times the session was (re)started after a failure.")
    up = GaugeMetricFamily(f"{NS}_session_up", "1 when the control connection is up and test packets flow.", labels=T)
    bound = GaugeMetricFamily(f"{NS}_session_sa_bound", "1 when the tunnel has a live SA in each direction.", labels=T)
    peer_err = GaugeMetricFamily(f"{NS}_peer_clock_error_seconds",
                                 "The reflector's clock Error Estimate, as last reported.", labels=T)
    last = GaugeMetricFamily(f"{NS}_last_reply_timestamp_seconds", "Unix time of the last reply.", labels=T)
    for ss in s.sessions:
        lv = list(ss.tunnel.values)
        c = ss.counters
        sent.add_metric(lv, c["sent"])
        received.add_metric(lv, c["received"])
        lost.add_metric(lv + ["forward"], c["lost_forward"])
        lost.add_metric(lv + ["reverse"], c["lost_reverse"])
        lost.add_metric(lv + ["unknown"], c["lost_unknown"])
        dup.add_metric(lv + ["forward"], c["dup_forward"])
        dup.add_metric(lv + ["reverse"], c["dup_reverse"])
        reord.add_metric(lv, c["reordered"])
        untrusted.add_metric(lv + ["forward"], c["owd_untrusted_forward"])
        untrusted.add_metric(lv + ["reverse"], c["owd_untrusted_reverse"])
        cycles.add_metric(lv, c["cycles"])
        restarts.add_metric(lv, c["restarts"])
        up.add_metric(lv, 1 if ss.up else 0)
        bound.add_metric(lv, 1 if ss.sa_bound else 0)
        if ss.peer_clock_error is not None:
            peer_err.add_metric(lv, ss.peer_clock_error)
        if ss.last_reply:
            last.add_metric(lv, ss.last_reply)
    yield from (sent, received, lost, dup, reord, untrusted, cycles, restarts, up, bound, peer_err, last)

    active = GaugeMetricFamily(f"{NS}_sessions", "Measurement sessions by state.", labels=["origin", "state"])
    counts: dict[tuple[str, str], int] = {(o, st): 0 for o in ("configured", "discovered") for st in ("up", "down")}
    for ss in s.sessions:
        k = (ss.origin, "up" if ss.up else "down")
        counts[k] = counts.get(k, 0) + 1
    for (o, st), n in sorted(counts.items()):
        active.add_metric([o, st], n)
    yield active

    # Kernel SA counters, per tunnel and direction, summed across rekeys.
    sa_bytes = counter("sa_bytes", "Bytes through the tunnel's SAs (kernel lifetime counter).", ["direction"])
    sa_pkts = counter("sa_packets", "Packets through the tunnel's SAs (kernel lifetime counter).", ["direction"])
    sa_rw = counter("sa_replay_window_errors", "Packets dropped outside the replay window (kernel).", ["direction"])
    sa_rp = counter("sa_replay_errors", "Replayed packets dropped (kernel).", ["direction"])
    sa_int = counter("sa_integrity_failures", "Packets that failed integrity checks (kernel).", ["direction"])
    rekeys = counter("rekeys", "Rekeys seen (the tunnel's outbound SA replaced by a new one).")
    info = GaugeMetricFamily(f"{NS}_sa_info", "The SA currently used by a tunnel in each direction (value 1).",
                             labels=T + ["direction"] + list(SA_INFO_LABELS))
    for ts in s.tunnels:
        lv = list(ts.tunnel.values)
        for d in ("in", "out"):
            b, p, rw, rp, integ = ts.totals[d]
            sa_bytes.add_metric(lv + [d], b)
            sa_pkts.add_metric(lv + [d], p)
            sa_rw.add_metric(lv + [d], rw)
            sa_rp.add_metric(lv + [d], rp)
            sa_int.add_metric(lv + [d], integ)
            if d in ts.info:
                info.add_metric(lv + [d] + list(ts.info[d]), 1)
        rekeys.add_metric(lv, ts.rekeys)
    yield from (sa_bytes, sa_pkts, sa_rw, sa_rp, sa_int, rekeys, info)

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
    yield stamps
    yield CounterMetricFamily(f"{NS}_timestamp_hw_fallbacks", "Packets on a hardware-stamping socket that got "
                              "only a software stamp.", value=s.stamps.get("hw_fallback", 0))
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
    reloads = CounterMetricFamily(f"{NS}_config_reloads", "Configuration reloads (SIGHUP).", labels=["result"])
    for k in ("success", "failure"):
        reloads.add_metric([k], s.reloads.get(k, 0))
    yield reloads
    yield GaugeMetricFamily(f"{NS}_config_last_reload_successful", "1 when the last reload succeeded.",
                            value=1 if s.last_reload_ok else 0)
    yield GaugeMetricFamily(f"{NS}_config_last_reload_success_timestamp_seconds",
                            "Unix time of the last configuration load or reload.", value=s.last_reload_time)
    yield GaugeMetricFamily(f"{NS}_start_time_seconds", "Unix time the agent started.", value=s.start_time)
    build = GaugeMetricFamily(f"{NS}_build_info", "Version of the agent (value 1).", labels=["version", "python"])
    build.add_metric([s.version, platform.python_version()], 1)
    yield build


def render(snapshot: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
    """The scrape body and its Content-Type (OpenMetrics if the scraper asks for it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(XwampCollector(lambda: snapshot))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsServer:
    """``GET /metrics`` on the asyncio loop that owns the state."""

    MAX_HEADER = 16384
    TIMEOUT = 10.0
    MAX_CLIENTS = 16

    def __init__(self, snapshot: Callable[[], Snapshot], host: str, port: int) -> None:
        self._snapshot = snapshot
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        if self.port == 0:  # tests: learn the ephemeral port
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def sockname(self) -> tuple[str, int]:
        return (self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= self.MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            await asyncio.wait_for(self._serve(reader, writer), self.TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._clients -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
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
        snap = self._snapshot()  # on the loop: consistent
        accept = headers.get("accept")
        gz = "gzip" in headers.get("accept-encoding", "")
        loop = asyncio.get_running_loop()
        body, ctype = await loop.run_in_executor(None, _render_encoded, snap, accept, gz)
        await self._reply(writer, 200, body, ctype, head_only=method == "HEAD",
                          extra={"Content-Encoding": "gzip"} if gz else None)

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
            writer.write(body)
        await writer.drain()


def _render_encoded(snap: Snapshot, accept: str | None, gz: bool) -> tuple[bytes, str]:
    body, ctype = render(snap, accept)
    return (gzip.compress(body, 1) if gz else body), ctype
