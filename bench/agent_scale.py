#!/usr/bin/env python3
"""One ``xwamp agent`` process measuring N concurrent TWAMP sessions against its own
server over loopback: reports loss, CPU and RSS. Prints, never asserts.

    python bench/agent_scale.py                       # 1,000 sessions x 10 pps, 40 s
    python bench/agent_scale.py --sessions 100 --duration 15

Goal (issue "The agent"): < 0.1 % loss and RSS < 300 MB at 1,000 sessions x 10 pps.
The agent is both ends here (client senders *and* reflector), so it handles twice the
packets a router measuring 1,000 tunnels would: 2 x sessions x pps packets/s in, as many out.
Traffic stays on 127.0.0.1. The run is bounded: --duration seconds, then SIGTERM.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_mb(pid: int) -> tuple[float, float]:
    st = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", st).group(1)) / 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+)", st).group(1)) / 1024
    return rss, hwm


WANTED = ("xwamp_session_up", "xwamp_rtt_seconds_count", "xwamp_rtt_seconds_sum", "xwamp_cycles_total",
          "xwamp_packets_sent_total", "xwamp_packets_received_total", "xwamp_session_restarts_total",
          "xwamp_packets_lost_total")
LAST_FETCH_S = 0.0


def children_rss_mb(pid: int) -> float:
    """RSS of the agent's children (the exporter's render worker)."""
    total = 0.0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    for k in kids:
        try:
            total += proc_rss_mb(int(k))[0]
        except (OSError, AttributeError):
            pass
    return total


def scrape(port: int) -> dict[str, float]:
    """Sum the few series the report needs. A plain line scan: the full parser would take
    longer on 150k samples than the agent takes to serve them."""
    global LAST_FETCH_S
    t = time.monotonic()
    # Like Prometheus itself: ask for gzip (a thousand tunnels are ~16 MB of text).
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
        gz = r.headers.get("Content-Encoding") == "gzip"
    body = (gzip.decompress(raw) if gz else raw).decode()
    LAST_FETCH_S = time.monotonic() - t
    totals: dict[str, float] = {}
    for line in body.splitlines():
        if not line.startswith(WANTED):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == "xwamp_packets_lost_total":
            m = re.search(r'direction="(\w+)"', line)
            name += "{" + (m.group(1) if m else "") + "}"
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def config(sessions: int, pps: float, count: int, tw: int, ow: int, exp: int) -> str:
    head = f"""
[agent]
log_level = "warning"
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
owamp = false
max_connections = {sessions + 16}
max_connections_per_client = {sessions + 16}
max_sessions_per_client = {sessions + 16}
max_sessions_per_connection = 4
[exporter]
port = {exp}
"""
    peers = "".join(f'[[peers]]\nname = "s{i:04d}"\naddress = "127.0.0.1"\nport = {tw}\n'
                    f"interval = {1.0 / pps!r}\ncount = {count}\ntimeout = 1.0\n" for i in range(sessions))
    return head + peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--pps", type=float, default=10.0, help="packets per second per session")
    ap.add_argument("--count", type=int, default=100, help="packets per cycle (loss is settled per cycle)")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds to run after start-up")
    args = ap.parse_args()

    tw, ow, exp = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "xwamp.toml"
        path.write_text(config(args.sessions, args.pps, args.count, tw, ow, exp))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        t0 = time.monotonic()
        # stderr to a file, not a pipe nobody reads: a full pipe would block the agent's loggers.
        errf = open(Path(tmp) / "agent.log", "w+")
        p = subprocess.Popen([sys.executable, "-m", "agent", "agent", "--config", str(path)], env=env, cwd=REPO,
                             stderr=errf, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # ready = the exporter answers
                try:
                    scrape(exp)
                    break
                except OSError:
                    if p.poll() is not None:
                        errf.seek(0)
                        print(errf.read()[-3000:])
                        return 1
                    time.sleep(0.5)
            startup = time.monotonic() - t0
            cpu0, w0 = proc_cpu_s(p.pid), time.monotonic()
            peak_rss = 0.0
            end = w0 + args.duration
            while time.monotonic() < end:
                time.sleep(1)
                peak_rss = max(peak_rss, proc_rss_mb(p.pid)[0])
            cpu1, w1 = proc_cpu_s(p.pid), time.monotonic()
            t_scrape = time.monotonic()
            try:
                m = scrape(exp)
            except OSError as e:
                print(f"final scrape failed: {e} (the agent's loop is saturated)")
                m = {}
            t_scrape = time.monotonic() - t_scrape
            rss, hwm = proc_rss_mb(p.pid)
            kids = children_rss_mb(p.pid)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            errf.seek(0)
            err = errf.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()

    sent = m.get("xwamp_packets_sent_total", 0.0)
    recv = m.get("xwamp_packets_received_total", 0.0)
    lost = sum(v for k, v in m.items() if k.startswith("xwamp_packets_lost_total"))
    rtt_n = m.get("xwamp_rtt_seconds_count", 0.0)
    cpu = (cpu1 - cpu0) / (w1 - w0)
    print(f"sessions={args.sessions} pps_each={args.pps:g} count_per_cycle={args.count} duration_s={args.duration:g}")
    print(f"startup_s={startup:.1f} sessions_up={m.get('xwamp_session_up', 0):.0f} "
          f"restarts={m.get('xwamp_session_restarts_total', 0):.0f} cycles_completed={m.get('xwamp_cycles_total', 0):.0f}")
    print(f"packets: sent={sent:.0f} received={recv:.0f} lost={lost:.0f} "
          f"(forward={m.get('xwamp_packets_lost_total{forward}', 0):.0f} reverse={m.get('xwamp_packets_lost_total{reverse}', 0):.0f} "
          f"unknown={m.get('xwamp_packets_lost_total{unknown}', 0):.0f})")
    loss = 100.0 * lost / sent if sent else float("nan")
    # Sent packets are counted per completed cycle; the share of the configured rate that
    # went out shows whether the loop kept the schedule (late packets are not lost ones).
    nominal = args.sessions * args.pps * (startup + (w1 - w0))
    print(f"send_rate_fraction~{sent / nominal:.2f} of {args.sessions * args.pps:.0f} pps configured "
          f"(completed cycles only: an underestimate)")
    print(f"loss_percent={loss:.4f} (goal < 0.1)")
    if rtt_n:
        print(f"rtt_mean_ms={1e3 * m['xwamp_rtt_seconds_sum'] / rtt_n:.3f}")
    print(f"cpu_cores={cpu:.2f} (user+sys of the agent, averaged over the run; host has {os.cpu_count()})")
    print(f"rss_mb={rss:.0f} peak_rss_mb={max(peak_rss, hwm):.0f} (goal < 300) "
          f"render_worker_rss_mb={kids:.0f}")
    print(f"scrape: http_s={LAST_FETCH_S:.2f} (agent side: snapshot + render + transfer) total_s={t_scrape:.2f} "
          f"exit_code={p.returncode}")
    tail = [ln for ln in (err or "").splitlines() if "level=error" in ln or "Traceback" in ln]
    if tail:
        print(f"agent errors: {len(tail)}, first: {tail[0][:300]}")
    reasons: dict[str, int] = {}
    for r in re.findall(r'msg="session ended, restarting" session=\S+ reason=("[^"]*"|\S+)', err or ""):
        reasons[r] = reasons.get(r, 0) + 1
    for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"restart reason x{n}: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
