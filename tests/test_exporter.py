"""exporters/prometheus.py + agent/sessions/metrics.py: scrape /metrics over HTTP from a running
exporter, parse it with prometheus_client's parser, compare with the session state."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.daemon.config import DEFAULT_BUCKETS
from agent.engine.sender import PacketRecord
from agent.sessions.metrics import MetricsState, Tunnel, TunnelSAs
from agent.sessions.results import summarize
from exporters.prometheus import MetricsServer, render
from netlink.fake import make_sa

SYNC = 0x8000 | (0x20 - 20) << 8 | 1  # S bit, ~1 µs error
UNSYNC = 0x0001


def rec(seq: int, t1: int, rtt_ns: int | None, *, fwd: int = 0, synced: bool = True, rseq: int | None = None,
        arrival: int | None = None) -> PacketRecord:
    e = SYNC if synced else UNSYNC
    r = PacketRecord(seq=seq, t1_ns=t1, size=64, t1_error=e)
    if rtt_ns is not None:
        r.reflector_seq = seq if rseq is None else rseq
        r.t2_ns = t1 + fwd
        r.t3_ns = r.t2_ns + 1000  # 1 µs residence, removed from RTT
        r.t4_ns = t1 + rtt_ns + 1000
        r.reflector_error = e
        r.t4_error = e
        r.arrival = seq if arrival is None else arrival
    return r


def state_with_data() -> tuple[MetricsState, Any]:
    st = MetricsState(DEFAULT_BUCKETS, stamps=lambda: {"tx_sw": 7, "rx_hw": 5, "rx_user": 1, "hw_fallback": 2},
                      clock=lambda: (2.5e-6, True))
    t = Tunnel("paris", "192.0.2.2", "7", "twamp")
    m = st.session("peer:paris", t)
    base = 1_700_000_000 * 10**9
    # 10 packets: seq 3 lost; RTTs 1 ms .. 9 ms; one-way forward 400 µs, trusted.
    records = [rec(i, base + i * 10**8, None if i == 3 else (i + 1) * 10**6, fwd=400_000,
                   rseq=i if i < 3 else i - 1) for i in range(10)]
    m.on_sent(len(records))
    for r in records:
        if not r.lost:
            m.on_reply(r)
    m.end_cycle(summarize(records))
    m.up = True
    # An untrusted session (clocks not synchronised): no one-way samples in the histogram.
    m2 = st.session("peer:lab", Tunnel("lab", "2001:db8::2", "", "twamp"))
    rs = [rec(i, base + i * 10**8, 2 * 10**6, synced=False) for i in range(4)]
    m2.observe_cycle(rs)
    ts = st.tunnel_sas("peer:paris", t)
    o = make_sa("192.0.2.1", "192.0.2.2", spi=0x1001, reqid=7, bytes_=1000, packets=10, enc_key=b"\xAA" * 16)
    i = make_sa("192.0.2.2", "192.0.2.1", spi=0x2001, reqid=7, bytes_=2000, packets=20)
    ts.update("out", [o], o)
    ts.update("in", [i], i)
    st.binder_refused("no_sa")
    st.binder_refused("no_sa")
    st.refusal_sources.append(lambda: {"keys_redacted": 3})
    return st, records


async def _http(port: int, path: str = "/metrics", method: str = "GET", headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hdr = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{hdr}\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    h = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, h, body


def scrape(st: MetricsState, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async def go() -> tuple[int, dict[str, str], bytes]:
        srv = MetricsServer(st.snapshot, "127.0.0.1", 0)
        await srv.start()
        try:
            return await _http(srv.port, **kw)
        finally:
            await srv.close()

    return asyncio.run(go())


def samples(body: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


PARIS = {"name": "paris", "peer": "192.0.2.2", "reqid": "7", "protocol": "twamp"}


def L(**kw: str) -> frozenset:
    return frozenset({**PARIS, **kw}.items())


def test_scrape_matches_session_state() -> None:
    st, records = state_with_data()
    status, headers, body = scrape(st)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    s = samples(body.decode())
    m = st.sessions["peer:paris"]
    assert s[("xwamp_packets_sent_total", L())] == m.sent == 10
    assert s[("xwamp_packets_received_total", L())] == m.received == 9
    summary = summarize(records)
    assert s[("xwamp_packets_lost_total", L(direction="forward"))] == summary.loss.forward == 1
    assert s[("xwamp_packets_lost_total", L(direction="reverse"))] == summary.loss.reverse == 0
    assert s[("xwamp_packets_lost_total", L(direction="unknown"))] == 0
    assert s[("xwamp_session_up", L())] == 1
    # RTT histogram: 9 samples of 1..10 ms minus seq 3 (4 ms), sum in seconds.
    assert s[("xwamp_rtt_seconds_count", L())] == 9
    assert s[("xwamp_rtt_seconds_sum", L())] == pytest.approx(sum((i + 1) * 1e-3 for i in range(10) if i != 3))
    assert s[("xwamp_rtt_seconds_bucket", L(le="0.001"))] == 1
    assert s[("xwamp_rtt_seconds_bucket", L(le="0.005"))] == 4  # 1, 2, 3, 5 ms
    assert s[("xwamp_rtt_seconds_bucket", L(le="+Inf"))] == 9
    assert s[("xwamp_one_way_delay_seconds_count", L(direction="forward"))] == 9
    assert s[("xwamp_one_way_delay_seconds_bucket", L(direction="forward", le="0.00025"))] == 0
    assert s[("xwamp_one_way_delay_seconds_bucket", L(direction="forward", le="0.0005"))] == 9
    # IPDV pairs of consecutive received seqs: 0-1, 1-2, 4-5 .. 8-9 = 7 pairs, 1 ms each.
    assert s[("xwamp_ipdv_seconds_count", L(direction="round_trip"))] == 7
    assert s[("xwamp_ipdv_seconds_sum", L(direction="round_trip"))] == pytest.approx(7e-3)
    lab = frozenset({"name": "lab", "peer": "2001:db8::2", "reqid": "", "protocol": "twamp"}.items())
    assert s[("xwamp_one_way_delay_seconds_count", lab | {("direction", "forward")})] == 0
    assert s[("xwamp_one_way_delay_untrusted_total", lab | {("direction", "forward")})] == 4
    assert s[("xwamp_rtt_seconds_count", lab)] == 4
    # kernel SA counters and the SA → tunnel mapping
    assert s[("xwamp_sa_bytes_total", L(direction="out"))] == 1000
    assert s[("xwamp_sa_packets_total", L(direction="in"))] == 20
    info = [k for k in s if k[0] == "xwamp_sa_info"]
    assert len(info) == 2
    out_info = dict(next(k[1] for k in info if ("direction", "out") in k[1]))
    assert out_info["src"] == "192.0.2.1" and out_info["encryption"] == "cbc(aes)" and out_info["proto"] == "esp"
    assert s[("xwamp_binder_refusals_total", frozenset({("reason", "no_sa")}))] == 2
    assert s[("xwamp_binder_refusals_total", frozenset({("reason", "keys_redacted")}))] == 3
    assert s[("xwamp_timestamps_total", frozenset({("direction", "tx"), ("source", "sw")}))] == 7
    assert s[("xwamp_timestamps_total", frozenset({("direction", "rx"), ("source", "hw")}))] == 5
    assert s[("xwamp_timestamps_total", frozenset({("direction", "tx"), ("source", "hw")}))] == 0
    assert s[("xwamp_timestamp_hw_fallbacks_total", frozenset())] == 2
    assert s[("xwamp_clock_error_seconds", frozenset())] == 2.5e-6
    assert s[("xwamp_clock_synchronized", frozenset())] == 1
    assert s[("xwamp_sessions", frozenset({("origin", "configured"), ("state", "up")}))] == 1
    assert s[("xwamp_sessions", frozenset({("origin", "configured"), ("state", "down")}))] == 1
    assert any(k[0] == "xwamp_build_info" for k in s)


def test_no_spi_and_no_key_material_in_metrics() -> None:
    st, _ = state_with_data()
    body = render(st.snapshot())[0].decode()
    for fam in text_string_to_metric_families(body):
        for smp in fam.samples:
            assert not any("spi" in k.lower() for k in smp.labels), smp
            assert "1001" not in "".join(smp.labels.values())  # the SPI value, in any form
    assert "aa" * 16 not in body.lower() and "AAAAAAAA" not in body


def test_gzip_head_404_405() -> None:
    st, _ = state_with_data()
    status, headers, body = scrape(st, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert b"xwamp_packets_sent_total" in gzip.decompress(body)
    status, headers, body = scrape(st, method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert scrape(st, path="/nope")[0] == 404
    assert scrape(st, method="POST")[0] == 405
    status, headers, body = scrape(st, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["content-type"].startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")


def test_sa_counters_survive_rekey() -> None:
    t = Tunnel("x", "192.0.2.2", "7")
    ts = TunnelSAs(t)
    old = make_sa("192.0.2.1", "192.0.2.2", spi=0x100, reqid=7, bytes_=500, packets=5, add_time=1000)
    ts.update("out", [old], old)
    assert ts.totals("out")[:2] == (500, 5) and ts.rekeys == 0
    new = make_sa("192.0.2.1", "192.0.2.2", spi=0x200, reqid=7, bytes_=0, packets=0, add_time=2000)
    old2 = make_sa("192.0.2.1", "192.0.2.2", spi=0x100, reqid=7, bytes_=600, packets=6, add_time=1000)
    ts.update("out", [old2, new], new)  # overlap: both live
    assert ts.totals("out")[:2] == (600, 6) and ts.rekeys == 1
    new2 = make_sa("192.0.2.1", "192.0.2.2", spi=0x200, reqid=7, bytes_=100, packets=1, add_time=2000)
    ts.update("out", [new2], new2)  # old SA deleted: its last counters are retired, not lost
    assert ts.totals("out")[:2] == (700, 7) and ts.rekeys == 1
    ts.update("out", [new2], new2)
    assert ts.totals("out")[:2] == (700, 7)
    ts.update("out", [], None)  # tunnel down
    assert ts.totals("out")[:2] == (700, 7) and not ts.bound


def test_histogram_snapshot_is_consistent() -> None:
    st, _ = state_with_data()
    snap = st.snapshot()
    for ss in snap.sessions:
        for h in ss.histograms.values():
            assert h.cumulative()[-1][1] == h.count == sum(h.counts)
    # Snapshots are copies: later updates do not change them.
    before = snap.sessions[0].counters["sent"]
    st.sessions["peer:paris"].on_sent(5)
    assert snap.sessions[0].counters["sent"] == before


# --- metric naming: a Python check that always runs, and promtool when installed ----

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
TIME_WORDS = ("latency", "delay", "rtt", "ipdv", "error", "duration", "timestamp")


def naming_problems(body: str) -> list[str]:
    problems = []
    for fam in text_string_to_metric_families(body):
        n = fam.name
        if not NAME.match(n) or not n.startswith("xwamp_"):
            problems.append(f"{n}: bad name or missing xwamp_ prefix")
        if fam.type == "counter" and any(not s.name.endswith("_total") for s in fam.samples):
            problems.append(f"{n}: counter samples must end in _total")
        if fam.type != "counter" and n.endswith("_total"):
            problems.append(f"{n}: only counters end in _total")
        if any(w in n for w in TIME_WORDS) and fam.type in ("histogram", "gauge") and not n.endswith("_seconds") \
                and n not in ("xwamp_config_last_reload_successful",):
            problems.append(f"{n}: times are in base unit seconds (…_seconds)")
        if re.search(r"_(ms|us|milliseconds|microseconds|minutes|bytes_total_total)$", n):
            problems.append(f"{n}: not a base unit")
        if fam.type == "gauge" and n.endswith(("_count", "_sum", "_bucket")):
            problems.append(f"{n}: reserved suffix")
        for s in fam.samples:
            for k in s.labels:
                if not LABEL.match(k) or k.startswith("__"):
                    problems.append(f"{n}: bad label name {k}")
                if k.lower() == "spi":
                    problems.append(f"{n}: SPI label churns at every rekey")
        if fam.type == "histogram":
            buckets = [s for s in fam.samples if s.name.endswith("_bucket")]
            if buckets and not any(s.labels.get("le") == "+Inf" for s in buckets):
                problems.append(f"{n}: histogram without +Inf bucket")
    return problems


def test_metric_names_follow_prometheus_conventions() -> None:
    st, _ = state_with_data()
    assert naming_problems(render(st.snapshot())[0].decode()) == []
    # and the checker does catch what it should
    bad = "# TYPE xwamp_rtt_ms gauge\nxwamp_rtt_ms 1\n# TYPE foo_count counter\nfoo_count_total{spi=\"1\"} 1\n"
    assert len(naming_problems(bad)) >= 3


def test_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'); the Python naming check above still ran")
    st, _ = state_with_data()
    body = render(st.snapshot())[0]
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert (r.stdout + r.stderr).strip() == b"", (r.stdout + r.stderr).decode()


def test_docs_list_every_metric() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs/metrics.md").read_text()
    st, _ = state_with_data()
    for fam in text_string_to_metric_families(render(st.snapshot())[0].decode()):
        name = fam.name + ("_total" if fam.type == "counter" else "")
        assert f"`{name}`" in doc, f"{name} is not documented in docs/metrics.md"


# --- examples/: the scrape config, rules and dashboard only use metrics that exist -----

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _documented() -> set[str]:
    doc = (EXAMPLES.parent / "docs/metrics.md").read_text()
    return set(re.findall(r"`(xwamp_[a-z0-9_]+)`", doc))


def test_examples_reference_only_real_metrics() -> None:
    import json

    known = _documented()
    dash = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    texts = [(EXAMPLES / "alerts.yml").read_text(), json.dumps(dash)]
    for text in texts:
        for name in set(re.findall(r"\b(xwamp_[a-z0-9_]+)", text)):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in known or base in known, f"{name} is not an xwamp metric"
    assert {p["type"] for p in dash["panels"]} >= {"timeseries", "heatmap", "stat"}


@pytest.mark.parametrize("what,file", [("config", "prometheus.yml"), ("rules", "alerts.yml")])
def test_examples_pass_promtool(what: str, file: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    r = subprocess.run([promtool, "check", what, file], cwd=EXAMPLES, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_fast_text_writer_matches_the_collector() -> None:
    """render_text (the scrape path) and prometheus_client over XwampCollector (the reference)
    must expose exactly the same samples, label escaping included."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporters.prometheus import XwampCollector, render_text

    st, _ = state_with_data()
    st.session("odd", Tunnel('we"ird\\name\nx', "192.0.2.9", "", "owamp")).observe_owamp([], 3, [], 0)
    snap = st.snapshot()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(XwampCollector(lambda: snap))
    reference = generate_latest(reg).decode()
    fast = render_text(snap).decode()
    assert samples(fast) == samples(reference)
    types = lambda body: {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(body)}  # noqa: E731
    assert types(fast) == types(reference)


def test_render_worker_process_serves_and_recovers(caplog) -> None:
    """Scrapes are rendered in a child process (off the loop's GIL); if it dies, the next
    scrape starts a new one, and a broken worker falls back to a thread."""
    st, _ = state_with_data()

    async def go() -> None:
        srv = MetricsServer(st.snapshot, "127.0.0.1", 0)
        await srv.start()
        try:
            status, _, body = await _http(srv.port)
            assert status == 200 and b"xwamp_packets_sent_total" in body
            proc = srv.worker._proc
            assert proc is not None and proc.returncode is None and proc.pid != os.getpid()
            os.kill(proc.pid, 9)
            for _ in range(500):  # the exporter thread's loop reaps it
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.01)
            status, _, body2 = await _http(srv.port)  # the dead child is noticed, replaced or bypassed
            assert status == 200 and samples(body2.decode()) == samples(body.decode())
            status, _, body3 = await _http(srv.port)
            assert status == 200 and srv.worker._proc is not None and srv.worker._proc.returncode is None
        finally:
            await srv.close()
        assert srv.worker._proc is None

    asyncio.run(go())
