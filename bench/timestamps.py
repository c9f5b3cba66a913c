#!/usr/bin/env python3
"""Kernel vs user-space timestamps on loopback: RTT percentiles, idle and under CPU load.

A reflector process (pinned to CPU 1) echoes UDP packets sent open-loop at a fixed
rate by this process (pinned to CPU 0). Each packet gets four stamps on both
clocks: T1 send, T2 reflector RX, T3 reflector TX, T4 sender RX, from the kernel
(SO_TIMESTAMPING, agent.engine.timestamping) and from user space (time.time_ns() around
the syscalls). The TWAMP round trip (T4 - T1) - (T3 - T2) is reported for each.

"load" runs a busy process on CPU 1, the reflector's core (all three pinned with
sched_setaffinity, so the hog competes with the reflector only). Goal (printed, never
asserted): under load the kernel-stamp p99 stays within 2x its p50. On loopback the
kernel RTT is ~1 µs, so that ratio moves with sub-µs noise; p99 - p50 (µs) is printed too.

    python3 bench/timestamps.py [--seconds S] [--rates 1000,10000]

``--igb`` instead runs on two emulated Intel 82576 NICs with PHCs, one per netns, inside
the test VM (``tools/vm/run --nics igb -- .venv/bin/python bench/timestamps.py --igb``):
COUNT lockstep echoes (the 82576 holds one TX stamp in flight, QEMU latches one RX stamp),
every T stamped by both the NIC (hardware; RX with the test-only register workaround,
tests/kernel_hw/igb_rx_workaround.py) and the kernel (software, OPT_TX_SWHW), and prints
the hardware-stamp and software-stamp RTT percentiles side by side from the same packets.
Under TCG the absolute figures mean little; the spread does.

A second part (issue 18) runs the real commands: ``xwamp stamp`` against ``xwamp reflect`` on
loopback at 1 pps, idle and with the reflector's CPU loaded, four sessions side by side in the
same run (staggered by 1/4 s): reflector T3 written early (the old path) or late (built first,
clock read last), each with and without Follow-Up Telemetry (RFC 8972 §4.7). On one host the
one-way delays share a clock, so forward (T2 - T1) and reverse (T4 - T3) should match: it prints
the median |forward - reverse| (goal with Follow-Up: <= 5 µs) and, from the Follow-Up answers,
the reflector's T3 lag (kernel TX stamp - T3 written) before and after the late write.

    python3 bench/timestamps.py [--seconds S] [--rates 1000,10000] [--stamp-count 20] [--skip-raw]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.engine import timestamping as ts  # noqa: E402
from agent.engine.clock import StampCounters  # noqa: E402

PAYLOAD = 64


def _pin(cpu: int) -> None:
    try:
        if cpu in os.sched_getaffinity(0) or os.cpu_count() and cpu < os.cpu_count():
            os.sched_setaffinity(0, {cpu})
    except OSError:
        pass


def _big_rcvbuf(s: socket.socket, size: int = 4 << 20) -> None:
    # TX stamps queue on the error queue and count against the receive buffer:
    # the 208 KiB default holds only ~150 small datagrams plus their stamps.
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE (root)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _busy(cpu: int) -> None:
    _pin(cpu)
    while True:
        pass


def _reflector(port_q, result_conn, cpu: int) -> None:
    _pin(cpu)
    c = StampCounters()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    _big_rcvbuf(s)
    cfg = ts.enable_timestamping(s, "lo", hardware=False)
    port_q.put(s.getsockname()[1])
    rows: dict[int, list[int]] = {}  # seq -> [t2k, t2u, t3u, t3k]
    by_key: list[int] = []  # OPT_ID key (n-th send) -> seq
    while True:
        data, anc, _f, peer = s.recvmsg(2048, ts.ANCILLARY_BUFSIZE)
        t2u = time.time_ns()
        if data == b"END":
            break
        seq = int.from_bytes(data[:4], "big")
        rx = ts.rx_stamp(anc, config=cfg, counters=c)
        t3u = time.time_ns()
        s.sendto(data, peer)
        rows[seq] = [rx.ns if rx else 0, t2u, t3u, 0]
        by_key.append(seq)
        if len(by_key) % 16 == 0:  # batch: one EAGAIN per 16 packets, not per packet
            for key, st in ts.drain_tx_stamps(s, config=cfg, counters=c):
                rows[by_key[key]][3] = st.ns
    time.sleep(0.01)
    for key, st in ts.drain_tx_stamps(s, config=cfg, counters=c):
        rows[by_key[key]][3] = st.ns
    result_conn.send(rows)
    s.close()


def pct(sorted_vals: list[int], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[i] / 1e3  # µs


def run_once(rate: int, seconds: float, load: bool) -> dict:
    ctx = mp.get_context("fork")
    port_q, (parent_conn, child_conn) = ctx.Queue(), ctx.Pipe()
    refl = ctx.Process(target=_reflector, args=(port_q, child_conn, 1), daemon=True)
    refl.start()
    busy = None
    if load:
        busy = ctx.Process(target=_busy, args=(1,), daemon=True)
        busy.start()
        time.sleep(0.2)  # let the hog settle on its core
    port = port_q.get(timeout=5)
    _pin(0)

    c = StampCounters()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    _big_rcvbuf(s)
    cfg = ts.enable_timestamping(s, "lo", hardware=False)
    s.setblocking(False)
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLERR)

    n = int(rate * seconds)
    interval = 1_000_000_000 // rate
    t1u: list[int] = [0] * n
    t1k: list[int] = [0] * n
    t4u: list[int] = [0] * n
    t4k: list[int] = [0] * n
    pad = bytes(PAYLOAD - 4)
    sent = replies = 0
    start = last_reply = time.monotonic_ns()
    end_wait = None
    while True:
        now = time.monotonic_ns()
        if sent < n and now >= start + sent * interval:
            t1u[sent] = time.time_ns()
            s.send(sent.to_bytes(4, "big") + pad)
            sent += 1
            continue
        if sent >= n:
            end_wait = end_wait or now
            # stop when all replies are in, or none arrived for 0.5 s (the reflector gave up/dropped)
            if replies >= n and now - end_wait > 50_000_000 or now - max(last_reply, end_wait) > 500_000_000:
                break
        # Sleep in epoll only when the next send is > 1.5 ms away (epoll rounds up to 1 ms).
        wait_ns = (start + sent * interval - now) if sent < n else 10_000_000
        ep.poll(wait_ns / 1e9 if wait_ns > 1_500_000 else 0)
        packets, tx = ts.drain_socket(s, 2048, 64, config=cfg, counters=c)
        after = time.time_ns()
        for data, anc, _f, _a in packets:
            seq = int.from_bytes(data[:4], "big")
            st = ts.rx_stamp(anc, config=cfg, counters=c)
            t4u[seq], t4k[seq] = after, (st.ns if st else 0)
            replies += 1
            last_reply = time.monotonic_ns()
        for key, st in tx:
            t1k[key] = st.ns
    s.send(b"END")
    rows = parent_conn.recv() if parent_conn.poll(10) else {}
    refl.join(5)
    if busy is not None:
        busy.kill()
        busy.join()
    s.close()
    ep.close()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))

    kern: list[int] = []
    user: list[int] = []
    lost = missing_k = 0
    for i in range(n):
        r = rows.get(i)
        if r is None or not t4u[i]:
            lost += 1
            continue
        t2k, t2u, t3u, t3k = r
        user.append((t4u[i] - t1u[i]) - (t3u - t2u))
        if t1k[i] and t2k and t3k and t4k[i]:
            kern.append((t4k[i] - t1k[i]) - (t3k - t2k))
        else:
            missing_k += 1
    kern.sort()
    user.sort()
    return {"rate": rate, "load": load, "n": n, "lost": lost, "missing_kernel": missing_k,
            "achieved_pps": round(sent / ((end_wait or time.monotonic_ns()) - start) * 1e9),
            "kernel": [pct(kern, p) for p in (50, 99, 99.9)],
            "user": [pct(user, p) for p in (50, 99, 99.9)]}


def _igb_exchange(count: int, rate: float) -> dict:
    """Lockstep echoes A -> B -> A over the igb pair; hardware and software RTT per exchange."""
    from tests.kernel_hw import igbpair
    from tests.kernel_hw.igb_rx_workaround import PROBE_TOS

    pair = igbpair.setup()
    socks, cfgs, regs, phcs = [], [], [], []
    try:
        for nic in (pair.a, pair.b):
            with igbpair.netns(nic.ns):
                ts.configure_nic(nic.ifname)
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((nic.addr, 0))
                cfg = ts.enable_timestamping(s, nic.ifname)
            s.setsockopt(socket.SOL_SOCKET, ts.SO_TIMESTAMPING, cfg.flags | ts.SOF_TIMESTAMPING_OPT_TX_SWHW)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, PROBE_TOS)
            r = igbpair.rx_workaround(nic)
            socks.append(s), cfgs.append(cfg), regs.append(r), phcs.append(ts.phc_clock(nic.phc))
        a, b = socks
        c = StampCounters()

        def recv(s, r, phc):
            if not select.select([s], [], [], 5)[0]:
                return None
            data, anc, _f, addr = s.recvmsg(2048, ts.ANCILLARY_BUFSIZE)
            r.clear_latch()
            sw = hw = None
            for level, ctype, raw in anc:
                if level == socket.SOL_SOCKET and ctype in (ts.SCM_TIMESTAMPING, ts.SCM_TIMESTAMPING_NEW):
                    sw, hw = ts.decode_scm_timestamping(raw, ctype)
            return data, addr, sw, (phc.to_realtime(hw) if hw else None)

        def tx(s, cfg, key):
            got: dict[str, int] = {}
            deadline = time.monotonic() + 1
            while len(got) < 2 and time.monotonic() < deadline:
                for k, st in ts.drain_tx_stamps(s, config=cfg, counters=c):
                    if k == key:
                        got[st.source.value] = st.ns
                time.sleep(0.0005)
            return got

        hw_rtt: list[int] = []
        sw_rtt: list[int] = []
        lost = partial = 0
        gap = 1 / rate
        for i in range(count):
            t0 = time.monotonic()
            a.sendto(b"%08d" % i + bytes(56), (pair.b.addr, b.getsockname()[1]))
            got_b = recv(b, regs[1], phcs[1])
            if got_b is None:
                lost += 1
                continue
            data, peer, t2s, t2h = got_b
            b.sendto(data, peer)
            got_a = recv(a, regs[0], phcs[0])
            t1, t3 = tx(a, cfgs[0], i), tx(b, cfgs[1], i)
            if got_a is None:
                lost += 1
                continue
            _d, _p, t4s, t4h = got_a
            if all(x is not None for x in (t2s, t4s)) and "sw" in t1 and "sw" in t3:
                sw_rtt.append((t4s - t1["sw"]) - (t3["sw"] - t2s))
            if all(x is not None for x in (t2h, t4h)) and "hw" in t1 and "hw" in t3:
                hw_rtt.append((t4h - t1["hw"]) - (t3["hw"] - t2h))
            else:
                partial += 1
            time.sleep(max(0.0, gap - (time.monotonic() - t0)))
    finally:
        for r in regs:
            r.undo()
            r.close()
        for s in socks:
            s.close()
        igbpair.teardown()
    hw_rtt.sort()
    sw_rtt.sort()
    return {"n": count, "lost": lost, "partial_hw": partial, "hw": hw_rtt, "sw": sw_rtt,
            "phc": f"{phcs[0].method} ±{phcs[0].uncertainty_ns} ns"}


def main_igb(count: int, rate: float) -> None:
    r = _igb_exchange(count, rate)
    print(f"igb pair (QEMU 10, emulated 82576, PHC via {r['phc']}), {r['n']} lockstep echoes at <= {rate:g}/s; "
          f"RTT = (T4-T1)-(T3-T2) from the same packets, µs; load average %.2f %.2f %.2f" % os.getloadavg())
    print(f"{'stamps':>9} {'n':>5} {'p1':>8} {'p10':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'p99-p1':>8}")
    for name in ("hw", "sw"):
        xs = r[name]
        if not xs:
            print(f"{name:>9} {0:>5}  (none)")
            continue
        ps = [pct(xs, p) for p in (1, 10, 50, 90, 99)]
        print(f"{'hardware' if name == 'hw' else 'software':>9} {len(xs):>5} " + " ".join(f"{v:>8.1f}" for v in ps)
              + f" {ps[-1] - ps[0]:>8.1f}")
    print(f"lost {r['lost']}, exchanges without all four hardware stamps {r['partial_hw']}")
    if r["hw"] and r["sw"]:
        h, s_ = r["hw"], r["sw"]
        print(f"spread p90-p10: hardware {pct(h, 90) - pct(h, 10):.1f} µs vs software {pct(s_, 90) - pct(s_, 10):.1f} µs")


# ------------------------------------------------------------------ xwamp stamp -> xwamp reflect

STAMP_CONFIGS = (("early", False), ("early", True), ("late", False), ("late", True))


def _xwamp(*args: str, cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu), sys.executable, "-m", "agent", *args]


def stamp_phase(count: int, load: bool) -> dict[tuple[str, bool], dict]:
    """One phase: two reflectors (T3 early / late) on CPU 1, four senders on CPU 0 at 1 pps."""
    import json
    import re
    import shutil
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    have_taskset = shutil.which("taskset") is not None
    refl: dict[str, tuple[subprocess.Popen, int]] = {}
    busy = None
    try:
        for mode in ("early", "late"):
            cmd = _xwamp("reflect", "--listen", "127.0.0.1", "--port", "0", "--t3", mode, cpu=1)
            p = subprocess.Popen(cmd if have_taskset else cmd[3:], cwd=root, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            m = re.search(r":(\d+)$", p.stdout.readline().strip())
            assert m, "xwamp reflect did not start"
            refl[mode] = (p, int(m.group(1)))
        if load:
            busy = mp.get_context("fork").Process(target=_busy, args=(1,), daemon=True)
            busy.start()
            time.sleep(0.2)
        senders = {}
        for i, (mode, fut) in enumerate(STAMP_CONFIGS):
            time.sleep(0.25)  # staggered: at 1 pps the four sessions never send at once
            args = ["stamp", "127.0.0.1", "--port", str(refl[mode][1]), "-c", str(count), "-i", "1", "--json"]
            if not fut:
                args.append("--no-follow-up")
            cmd = _xwamp(*args, cpu=0)
            senders[(mode, fut)] = subprocess.Popen(cmd if have_taskset else cmd[3:], cwd=root, env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = {}
        for k, p in senders.items():
            o, _e = p.communicate(timeout=count * 3 + 60)
            out[k] = json.loads(o) if o.strip().startswith("{") else {"records": []}
        return out
    finally:
        if busy is not None:
            busy.kill()
            busy.join()
        for p, _port in refl.values():
            p.terminate()
            p.wait(10)


def _median(v: list[float]) -> float:
    v = sorted(v)
    if not v:
        return float("nan")
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def stamp_report(count: int) -> None:
    print(f"\nxwamp stamp -> xwamp reflect, loopback, 1 pps, {count} packets per session, 4 sessions side by side "
          "(senders CPU 0, reflectors CPU 1); µs")
    print(f"{'reflector':>9} {'load':>5} {'T3':>18} {'n':>3} {'med |fwd-rev|':>14} {'med fwd':>8} {'med rev':>8} "
          f"{'med RTT':>8} {'T3 lag p50/max':>15}")
    for load in (False, True):
        res = stamp_phase(count, load)
        for (mode, fut), doc in res.items():
            d, fw, rv, rtt, lag = [], [], [], [], []
            for r in doc.get("records", []):
                if r.get("t4_ns") is None or r.get("t3_ns") is None or r.get("t2_ns") is None:
                    continue  # lost, or (Follow-Up) still pending: never mixed in
                t1 = r["t1_kernel_ns"] or r["t1_ns"]
                f, b = r["t2_ns"] - t1, r["t4_ns"] - r["t3_ns"]
                d.append(abs(f - b) / 1e3)
                fw.append(f / 1e3)
                rv.append(b / 1e3)
                rtt.append(((r["t4_ns"] - t1) - (r["t3_ns"] - r["t2_ns"])) / 1e3)
                if r.get("follow_up") == "corrected" and r.get("t3_user_ns"):
                    lag.append((r["t3_ns"] - r["t3_user_ns"]) / 1e3)
            t3 = "Follow-Up (kernel)" if fut else "as written"
            lg = f"{_median(lag):.1f}/{max(lag):.1f}" if lag else "-"
            print(f"{mode:>9} {'busy' if load else 'idle':>5} {t3:>18} {len(d):>3} {_median(d):>14.1f} "
                  f"{_median(fw):>8.1f} {_median(rv):>8.1f} {_median(rtt):>8.1f} {lg:>15}", flush=True)
    print("goal: with Follow-Up, median |fwd-rev| <= 5 µs, idle and busy; 'T3 lag' is kernel TX stamp minus the T3 "
          "the reflector wrote (early = the old path, late = built first, clock read last)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rates", default="1000,10000")
    ap.add_argument("--stamp-count", type=int, default=20, help="packets per xwamp stamp session at 1 pps (0: skip)")
    ap.add_argument("--skip-raw", action="store_true", help="only the xwamp stamp part")
    ap.add_argument("--igb", action="store_true", help="hardware vs software stamps on the VM's igb pair")
    ap.add_argument("--count", type=int, default=200, help="--igb: exchanges (default 200)")
    ap.add_argument("--igb-rate", type=float, default=50.0, help="--igb: at most this many exchanges per second")
    args = ap.parse_args()
    if args.igb:
        main_igb(args.count, args.igb_rate)
        return
    if args.skip_raw:
        if args.stamp_count:
            stamp_report(args.stamp_count)
        return
    print(f"loopback, {os.cpu_count()} CPUs, sender on CPU 0, reflector on CPU 1, "
          f"{args.seconds:g} s per run; RTT = (T4-T1)-(T3-T2), µs; "
          "load average %.2f %.2f %.2f" % os.getloadavg())
    # p99/p50 of a ~10 µs loopback RTT swings with sub-µs noise: the absolute spread says more.
    print(f"{'rate':>6} {'load':>5} {'stamps':>7} {'p50':>8} {'p99':>8} {'p99.9':>8} {'p99/p50':>8} "
          f"{'p99-p50':>8}  notes")
    results = []
    for rate in (int(r) for r in args.rates.split(",")):
        for load in (False, True):
            r = run_once(rate, args.seconds, load)
            results.append(r)
            for src in ("kernel", "user"):
                p50, p99, p999 = r[src]
                note = f"sent {r['n']} @ {r['achieved_pps']} pps, lost {r['lost']}, no-kernel-stamp {r['missing_kernel']}" \
                    if src == "kernel" else ""
                print(f"{rate:>6} {'busy' if load else 'idle':>5} {src:>7} {p50:>8.1f} {p99:>8.1f} {p999:>8.1f} "
                      f"{p99 / p50:>8.2f} {p99 - p50:>8.1f}  {note}")
    print()
    for r in results:
        if r["load"]:
            p50, p99, _ = r["kernel"]
            verdict = "within" if p99 <= 2 * p50 else "NOT within"
            up50, up99, _ = r["user"]
            print(f"goal @ {r['rate']} pps under load: kernel p99/p50 = {p99 / p50:.2f} ({verdict} 2x), "
                  f"p99-p50 = {p99 - p50:.1f} µs; user p99/p50 = {up99 / up50:.2f}, p99-p50 = {up99 - up50:.1f} µs")
    if args.stamp_count:
        stamp_report(args.stamp_count)


if __name__ == "__main__":
    main()
