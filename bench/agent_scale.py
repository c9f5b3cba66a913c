#!/usr/bin/env python3
"""One ``xwamp agent`` process measuring N concurrent TWAMP sessions against its own
server over loopback: reports loss, CPU and RSS. Prints, never asserts.

    python bench/agent_scale.py                       # 1,000 sessions x 10 pps, 40 s
    python bench/agent_scale.py --sessions 100 --duration 15

Goal (issue "The agent"): < 0.1 % loss and RSS < 300 MB at 1,000 sessions x 10 pps.
The agent is both ends here (client senders *and* reflector), so it handles twice the
packets a router measuring 1,000 tunnels would: 2 x sessions x pps packets/s in, as many out.
Traffic stays on 127.0.0.1. The run is bounded: --duration seconds, then SIGTERM.

Router scale (issue 17), as root on a kernel with ESP (the VM):

    tools/vm/run -- .venv/bin/python bench/agent_scale.py --sas 0,10000,50000

For each N: a throwaway netns holding N bystander ESP SAs (installed like bench/sa_dump.py)
plus one SA pair per measured tunnel; the agent runs in that netns measuring --sessions
(default 10 there) tunnels, and its CPU and RSS are read over --duration (default 60) s
once start-up (the first dump) is over. The figures print side by side with the ratio
to N=0, the same run. ``--redump-every 15`` emulates the old behaviour (a full re-dump
every 15 s) for comparison.
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
sys.path.insert(0, str(REPO))
from bench.sas import bystander_lines, ip_batch  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stop_agent(p: subprocess.Popen) -> None:
    """SIGTERM (the agent's clean shutdown), then SIGKILL after 60 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


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


def install_sas(ns: str, n: int, tunnels: int) -> float:
    """N bystander SAs (other tunnels of the router) and one SA pair per measured tunnel
    (127.0.0.1 <-> 10.9.0.i, addresses on the netns's lo): one ``ip -batch``."""
    lines = bystander_lines(n)
    for t in range(tunnels):
        for j, (src, dst) in enumerate((("127.0.0.1", f"10.9.0.{t + 1}"), (f"10.9.0.{t + 1}", "127.0.0.1"))):
            lines.append(
                f"xfrm state add src {src} dst {dst} proto esp spi {0x7000000 + 2 * t + j:#x} reqid {900000 + t} "
                f"mode tunnel auth-trunc 'hmac(sha256)' 0x{t + 1:064x} 128 enc 'cbc(aes)' 0x{t + 1:032x}\n"
            )
    return ip_batch(ns, lines)


def scale_config(tunnels: int, pps: float, count: int, tw: int, exp: int, redump: float) -> str:
    head = f"""
[agent]
log_level = "warning"
sa_redump_interval = {redump!r}
[server]
listen = ["0.0.0.0"]
twamp_port = {tw}
owamp = false
[exporter]
port = {exp}
"""
    peers = "".join(f'[[peers]]\nname = "t{i:02d}"\naddress = "10.9.0.{i + 1}"\nport = {tw}\n'
                    f"interval = {1.0 / pps!r}\ncount = {count}\ntimeout = 1.0\n" for i in range(tunnels))
    return head + peers


def scale_one(n: int, args: argparse.Namespace) -> dict[str, float]:
    """The agent in a fresh netns with ``n`` bystander SAs: its idle CPU and RSS."""
    ns = f"xwscale{os.getpid()}x{n}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    p = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for t in range(args.sessions):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"10.9.0.{t + 1}/32", "dev", "lo"], check=True)
        t_inst = install_sas(ns, n, args.sessions)
        tw, exp = 862, 9100  # fresh netns: any port is free
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "xwamp.toml"
            path.write_text(scale_config(args.sessions, args.pps, args.count, tw, exp, args.redump_every))
            env = dict(os.environ, PYTHONPATH=str(REPO))
            env.pop("NOTIFY_SOCKET", None)
            errf = open(Path(tmp) / "agent.log", "w+")
            t0 = time.monotonic()
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "agent", "agent", "--config",
                                  str(path)], env=env, cwd=REPO, stderr=errf, text=True)
            pid = p.pid  # ip netns exec execs the command: same pid
            ready = False
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not ready:
                out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                      f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{exp}/metrics',"
                                      f" timeout=30).read().decode())"], capture_output=True, text=True)
                if out.returncode == 0 and "xwamp_sa_table_entries" in out.stdout:
                    ready = True
                elif p.poll() is not None:
                    errf.seek(0)
                    print(errf.read()[-3000:])
                    raise SystemExit(1)
                else:
                    time.sleep(1)
            startup = time.monotonic() - t0
            time.sleep(args.settle)  # start-up debris: first discovery, metrics folds, GC
            sent0 = _sent(ns, exp)
            cpu0, w0 = proc_cpu_s(pid), time.monotonic()
            peak = 0.0
            while time.monotonic() < w0 + args.duration:
                time.sleep(1)
                peak = max(peak, proc_rss_mb(pid)[0])
            cpu1, w1 = proc_cpu_s(pid), time.monotonic()
            sent1 = _sent(ns, exp)
            rss, _hwm = proc_rss_mb(pid)
            body = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                   f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{exp}/metrics',"
                                   f" timeout=60).read().decode())"], capture_output=True, text=True).stdout
            stop_agent(p)
        vals: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith(("xwamp_sa_", "xwamp_packets_sent_total", "xwamp_packets_received_total")):
                name = line.rsplit(" ", 1)[0]
                name = name.split("{", 1)[0] + ("{" + name.split("{", 1)[1] if "reason" in name else "")
                vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return {"install_s": t_inst, "startup_s": startup, "cpu": (cpu1 - cpu0) / (w1 - w0), "rss": rss,
                "peak_rss": peak, "window_sent": sent1 - sent0, "cpu_s": cpu1 - cpu0, **vals}
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _sent(ns: str, exp: int) -> float:
    """xwamp_packets_sent_total summed over the tunnels (moves once per completed cycle)."""
    body = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                           f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{exp}/metrics',"
                           f" timeout=60).read().decode())"], capture_output=True, text=True).stdout
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines() if ln.startswith("xwamp_packets_sent_total"))


def scale_main(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sas.split(",")]
    print(f"kernel {os.uname().release}, python {sys.version.split()[0]}; {args.sessions} tunnels x "
          f"{args.pps:g} pps measured, idle CPU over {args.duration:g} s; sa_redump_interval={args.redump_every:g} s")
    rows = []
    for n in sizes:
        r = scale_one(n, args)
        rows.append((n, r))
        red = {k.split('reason="')[1].rstrip('"}'): int(v) for k, v in r.items() if k.startswith("xwamp_sa_redumps")}
        print(f"  SAs={n}: install {r['install_s']:.1f}s startup {r['startup_s']:.1f}s "
              f"table={r.get('xwamp_sa_table_entries', 0):.0f} lookups={r.get('xwamp_sa_lookups_total', 0):.0f} "
              f"redumps={red} overruns={r.get('xwamp_sa_event_overruns_total', 0):.0f} "
              f"sent={r.get('xwamp_packets_sent_total', 0):.0f} received={r.get('xwamp_packets_received_total', 0):.0f}",
              flush=True)
    base = rows[0][1]["cpu"] or float("nan")
    # CPU per test packet too: the VM (TCG) shares the host with other load, which slows
    # the guest and inflates its CPU figures; per packet is the steadier comparison.
    def per_pkt(r: dict[str, float]) -> float:
        return 1e3 * r["cpu_s"] / r["window_sent"] if r["window_sent"] else float("nan")

    base_pp = per_pkt(rows[0][1])
    print(f"{'SAs':>7} {'CPU %':>7} {'vs first':>9} {'sent':>6} {'CPU ms/pkt':>10} {'vs first':>9} {'RSS MiB':>8} {'peak MiB':>9}")
    for n, r in rows:
        print(f"{n:7d} {100 * r['cpu']:7.2f} {r['cpu'] / base:9.2f} {r['window_sent']:6.0f} {per_pkt(r):10.3f} "
              f"{per_pkt(r) / base_pp:9.2f} {r['rss']:8.0f} {r['peak_rss']:9.0f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=None, help="default 1000 (10 with --sas)")
    ap.add_argument("--pps", type=float, default=10.0, help="packets per second per session")
    ap.add_argument("--count", type=int, default=None, help="packets per cycle (loss is settled per cycle); "
                    "default 100 (10 with --sas)")
    ap.add_argument("--duration", type=float, default=None, help="seconds to measure (default 40; 60 with --sas)")
    ap.add_argument("--sas", default=None, help="comma-separated SA counts: router-scale mode (root, ESP kernel)")
    ap.add_argument("--settle", type=float, default=10.0, help="--sas: seconds after start-up before measuring")
    ap.add_argument("--redump-every", type=float, default=600.0, help="--sas: the agent's sa_redump_interval")
    args = ap.parse_args()
    if args.sas is not None:
        args.sessions = 10 if args.sessions is None else args.sessions
        args.duration = 60.0 if args.duration is None else args.duration
        args.count = 10 if args.count is None else args.count  # 1 s cycles: the sent counter moves often
        return scale_main(args)
    args.sessions = 1000 if args.sessions is None else args.sessions
    args.duration = 40.0 if args.duration is None else args.duration
    args.count = 100 if args.count is None else args.count

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
            stop_agent(p)
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
