#!/usr/bin/env python3
"""Reflector throughput on loopback: the highest rate answered with 0 % loss.

Three servers, each in its own process, are driven by a paced sender in another
process at rising rates (1 s per step, then up to 1 s to collect late replies):

* ``echo``   — the ceiling of Python on this machine: a blocking recvfrom/sendto loop;
* ``unauth`` — xwamp's TwampReflectorEndpoint, TWAMP unauthenticated (41-octet packets);
* ``auth``   — the same in TWAMP authenticated mode (112-octet packets, AES + HMAC-SHA1);
* ``stamp``  — STAMP unauthenticated (44 octets) through the same endpoint (optional);
* ``stamp-auth`` — STAMP authenticated (112 octets, HMAC-SHA-256; optional).

A second part queues packets on each server's socket and times answering them all
(wall time and CPU time): the CPU-time rate is the per-core cost of the code, much
less sensitive to other load on the machine than the paced test.

A third part (``--sender-rates``) drives the STAMP *sender* path as the agent does:
agent.sessions.stamp.stamp_session (the code a ``protocol = "stamp"`` cycle runs, with
Follow-Up Telemetry asked) against the ``stamp`` server, at rising rates; it reports the
replies, the send rate achieved and the sender's CPU time per packet.

It prints figures; it asserts nothing. The machine is shared, so numbers are noisy:
each rate is tried twice before it counts as failed.

    python3 bench/reflector.py [--duration 1] [--rates 10000,20000,...] [--servers echo,unauth,auth,stamp,stamp-auth] [--pin]
                               [--sender-rates 1000,2000,5000,...]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import sys
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEY_AES = bytes(range(16))
KEY_HMAC = bytes(range(32, 64))
RCVBUF = 4 << 20
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def _bufs(s: socket.socket) -> None:
    for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, RCVBUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)


def _session(kind: str):
    """The reflector session a ``kind`` of server runs (the keys the sender side uses too)."""
    from agent.engine.keys import TestKeys
    from agent.engine.packets import Proto, Security
    from agent.engine.reflector import ReflectorSession
    from netlink.secret import Secret

    if kind == "auth":
        return ReflectorSession(Proto.TWAMP, Security.AUTH, keys=TestKeys(Secret(KEY_AES), Secret(KEY_HMAC)))
    if kind == "stamp-auth":
        return ReflectorSession(Proto.STAMP, Security.AUTH, stamp_key=Secret(KEY_HMAC))
    return ReflectorSession(Proto.STAMP if kind == "stamp" else Proto.TWAMP)


# ------------------------------------------------------------------------- servers


def echo_server(port_q: mp.Queue, stop: Event, cpu: int | None) -> None:
    _pin(cpu)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _bufs(s)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.2)
    port_q.put(s.getsockname()[1])
    recvfrom, sendto = s.recvfrom, s.sendto
    while not stop.is_set():
        try:
            while True:
                data, addr = recvfrom(2048)
                sendto(data, addr)
        except socket.timeout:
            pass


def xwamp_server(kind: str, port_q: mp.Queue, stop: Event, cpu: int | None, stats_q: mp.Queue) -> None:
    _pin(cpu)
    from agent.engine.udp import TwampReflectorEndpoint

    sess = _session(kind)

    async def main() -> None:
        ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=sess)
        await ep.start()
        assert ep.sock is not None
        _bufs(ep.sock)
        port_q.put(ep.port)
        t0 = time.process_time()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        stats_q.put((ep.counters(), time.process_time() - t0))
        ep.close()

    asyncio.run(main())


# ------------------------------------------------------------------------- sender


def _packets(kind: str, n: int, first: int = 0) -> list[bytes]:
    """``n`` packets with sequence numbers from ``first``, all distinct: authenticated
    reflectors drop a sequence number they saw before (agent.engine.reflector.ReplayWindow)."""
    from agent.engine.keys import TestKeys
    from agent.engine.packets import Proto, Security
    from agent.engine.sender import TestSender
    from netlink.secret import Secret

    if kind == "auth":
        s = TestSender(Proto.TWAMP, Security.AUTH, keys=TestKeys(Secret(KEY_AES), Secret(KEY_HMAC)), error_estimate=1)
    elif kind == "stamp-auth":
        s = TestSender(Proto.STAMP, Security.AUTH, stamp_key=Secret(KEY_HMAC), error_estimate=1)
    elif kind == "stamp":
        s = TestSender(Proto.STAMP, error_estimate=1)
    else:  # echo and unauth: the 41-octet symmetric TWAMP sender packet
        s = TestSender(Proto.TWAMP, error_estimate=1)
    now = time.time_ns()
    return [s.build((first + i) & 0xFFFFFFFF, now) for i in range(n)]


def blast(port: int, kind: str, rate: int, duration: float, cpu: int | None, out: mp.Queue) -> None:
    """Send ``rate`` pps for ``duration`` s (absolute pacing), count replies; then wait up to 1 s."""
    _pin(cpu)
    total = int(rate * duration)
    # Built before the clock starts; numbered on from the last step's (10 µs clock ticks).
    pkts = _packets(kind, total, int(time.time() * 1e5))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _bufs(s)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    send, recv_into = s.send, s.recv_into
    buf = bytearray(2048)
    sent = got = 0
    t0 = time.perf_counter()
    clock = time.perf_counter
    while sent < total:
        due = min(total, int((clock() - t0) * rate) + 1)
        burst = 0
        while sent < due and burst < 64:  # replies are read at least every 64 sends
            try:
                send(pkts[sent])
            except BlockingIOError:
                break
            sent += 1
            burst += 1
        try:
            while True:
                recv_into(buf)
                got += 1
        except BlockingIOError:
            pass
    t_send = time.perf_counter() - t0
    end = time.perf_counter() + 1.0
    while got < sent and time.perf_counter() < end:
        try:
            recv_into(buf)
            got += 1
        except BlockingIOError:
            time.sleep(0.0005)
    out.put((sent, got, sent / t_send if t_send > 0 else 0.0))


def measure(port: int, kind: str, rate: int, duration: float, cpu: int | None) -> tuple[int, int, float]:
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=blast, args=(port, kind, rate, duration, cpu, q))
    p.start()
    res = q.get(timeout=duration + 30)
    p.join()
    return res


def run_server(kind: str, rates: list[int], duration: float, pin: bool) -> dict[str, Any]:
    port_q: mp.Queue = mp.Queue()
    stats_q: mp.Queue = mp.Queue()
    stop = mp.Event()
    srv_cpu, snd_cpu = (1, 0) if pin and (os.cpu_count() or 1) >= 2 else (None, None)
    if kind == "echo":
        proc = mp.Process(target=echo_server, args=(port_q, stop, srv_cpu), daemon=True)
    else:
        proc = mp.Process(target=xwamp_server, args=(kind, port_q, stop, srv_cpu, stats_q), daemon=True)
    proc.start()
    port = port_q.get(timeout=30)
    best = 0
    best_achieved = 0.0
    first_fail: tuple[int, int, int] | None = None
    for rate in rates:
        ok = False
        for _attempt in range(2):
            sent, got, achieved = measure(port, kind, rate, duration, snd_cpu)
            if got >= sent and achieved >= 0.97 * rate:
                ok = True
                break
            if achieved < 0.97 * rate:
                break  # the sender itself cannot go faster: no point retrying
        line = f"  {kind:10s} {rate:>7d} pps: sent {sent:>7d} at {achieved:>9.0f} pps, answered {got:>7d}"
        print(line + ("" if ok else f"  LOSS {sent - got}" if got < sent else "  (sender-limited)"), flush=True)
        if ok:
            best, best_achieved = rate, achieved
        else:
            first_fail = (rate, sent, got)
            break
    stop.set()
    cpu_s = None
    per_cpu = None
    if kind != "echo":
        try:
            counters, cpu_s = stats_q.get(timeout=10)
            if cpu_s:
                per_cpu = counters.get("reflected", 0) / cpu_s
        except Exception:
            pass
    proc.join(timeout=5)
    if proc.is_alive():
        proc.terminate()
    return {"server": kind, "max_pps_no_loss": best, "achieved": best_achieved, "first_fail": first_fail,
            "server_cpu_s": cpu_s, "pps_per_cpu_s": per_cpu}


# ------------------------------------------------------------------ drain capacity


SEND_BATCH: int | None = None  # --send-batch: replies per sendmmsg (default: agent.engine.udp.MMSG_SEND)


def capacity(kind: str, n: int, out: mp.Queue, batched: bool = True) -> None:
    """Queue ``n`` packets on a server socket, then time (wall and CPU) answering all of them.

    Less exposed to a noisy shared machine than the paced test: the CPU-time figure is
    what the code costs per packet, on whatever core it got.
    """
    from agent.engine.udp import TwampReflectorEndpoint

    pkts = _packets(kind, n)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)

    def fill(port: int) -> None:
        client.connect(("127.0.0.1", port))
        for i in range(n):
            client.send(pkts[i])

    if kind == "echo":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        s.bind(("127.0.0.1", 0))
        fill(s.getsockname()[1])
        recvfrom, sendto = s.recvfrom, s.sendto
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            data, addr = recvfrom(2048)
            sendto(data, addr)
        out.put((n / (time.perf_counter() - t0), n / max(1e-9, time.process_time() - c0)))
        return
    sess = _session(kind)

    async def run() -> None:
        ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=sess, mmsg=batched)
        await ep.start()
        assert ep.sock is not None
        ep.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        if batched:  # as after the first wakeup that found a queue
            ep._mb, ep._queued = ep._batch_buffers(), True
        if SEND_BATCH:
            ep.mmsg_send = SEND_BATCH
        fill(ep.port)
        t0, c0 = time.perf_counter(), time.process_time()
        while sess.counters.received < n:
            ep._on_readable()  # the same callback the event loop runs
        out.put((n / (time.perf_counter() - t0), n / max(1e-9, time.process_time() - c0)))
        ep.close()

    asyncio.run(run())


def run_capacity(kinds: list[str], n: int, single: bool = True, rounds: int = 3) -> None:
    """Each server batched (recvmmsg/sendmmsg, what it runs) and, with ``single``, per packet
    (recvmsg/sendto, ``mmsg=False``, the row marked "/1"), alternated in every round."""
    rows = [(k, True) for k in kinds] + ([(k, False) for k in kinds if k != "echo"] if single else [])
    rows.sort(key=lambda r: kinds.index(r[0]))
    print(f"\ndrain capacity ({n} queued packets answered back to back; best of {rounds}):")
    print(f"{'server':12s} {'pps (wall)':>12s} {'pps per CPU-second':>20s} {'per-round ratio':>17s} {'vs echo':>8s}")
    got: dict[tuple[str, bool], list[tuple[float, float]]] = {r: [] for r in rows}
    for _ in range(rounds):
        for kind, batched in rows:
            q: mp.Queue = mp.Queue()
            p = mp.Process(target=capacity, args=(kind, n, q, batched))
            p.start()
            got[(kind, batched)].append(q.get(timeout=120))
            p.join()
    echoes = [x[1] for x in got.get(("echo", True), [])]
    echo = max(echoes) if echoes else 0.0
    for kind, batched in rows:
        runs = got[(kind, batched)]
        best = max(runs, key=lambda x: x[1])
        hi = best[1]
        rel = f"{hi / echo:.2f}" if echo else "-"
        # Each round against the echo loop of the same round (alternated: the same load on the machine).
        ratios = [x[1] / e for x, e in zip(runs, echoes)] if echoes else []
        span = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else f"{min(x[1] for x in runs):.0f}-{hi:.0f}"
        name = kind if batched or kind == "echo" else kind + "/1"
        print(f"{name:12s} {best[0]:>12.0f} {hi:>20.0f} {span:>17s} {rel:>8s}", flush=True)
    if single:
        print("(/1: the per-packet path, recvmsg + sendto, as before recvmmsg; per-round ratio: lowest and highest "
              "of each round's rate over the echo loop's in the same round; vs echo: best over best)")


def wakeup_cost(kind: str, n: int, path: str, out: mp.Queue) -> None:
    """One packet per wakeup (a light load): send one request, run the callback once, read the
    reply; CPU µs per packet, client included (the same for every path). ``path``: "shipped"
    (per packet until a queue shows), "batch" (recvmmsg/sendmmsg forced), "single" (mmsg=False)."""
    from agent.engine.udp import TwampReflectorEndpoint

    pkts = _packets(kind, n)
    sess = _session(kind)

    async def run() -> None:
        ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=sess, mmsg=path != "single")
        await ep.start()
        ep._mb = ep._batch_buffers() if path != "single" else None
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.connect(("127.0.0.1", ep.port))
        send, recv, on_readable = client.send, client.recv, ep._on_readable
        force = path == "batch"
        c0 = time.process_time()
        for p in pkts:
            send(p)
            if force:
                ep._queued = True
            on_readable()
            recv(2048)
        out.put((time.process_time() - c0) / n * 1e6)
        client.close()
        ep.close()

    asyncio.run(run())


def t3_lag(kind: str, n: int, batched: bool, out: mp.Queue) -> None:
    """Drain ``n`` queued packets with every reply TX-stamped (tx_sample_ns=1): the kernel's TX
    stamp minus the T3 written into the reply, in µs (what the late T3 misses of the send)."""
    from agent.engine.udp import TwampReflectorEndpoint

    pkts = _packets(kind, n)
    sess = _session(kind)

    async def run() -> None:
        ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=sess, mmsg=batched, tx_sample_ns=1)
        await ep.start()
        assert ep.sock is not None and ep.tx is not None
        ep.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        if batched:
            ep._mb, ep._queued = ep._batch_buffers(), True
        if SEND_BATCH:
            ep.mmsg_send = SEND_BATCH
        tx = ep.tx
        t3_of: dict[int, int] = {}
        lags: list[float] = []
        sent, on_stamp = tx.sent, tx.on_stamp

        def rec_sent(stream: Any, seq: int, t3_ns: int) -> None:
            t3_of[tx.next_key] = t3_ns
            sent(stream, seq, t3_ns)

        def rec_stamp(key: int, ns: int, source: str) -> None:
            t3 = t3_of.pop(key, None)
            if t3 is not None:
                lags.append((ns - t3) / 1000)
            on_stamp(key, ns, source)

        tx.sent, tx.on_stamp = rec_sent, rec_stamp  # type: ignore[method-assign]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        client.connect(("127.0.0.1", ep.port))
        for p in pkts:
            client.send(p)
        while sess.counters.received < n:
            ep._on_readable()
        for _ in range(300):  # up to 3 s for the last stamps
            await asyncio.sleep(0.01)
            ep._drain_tx()
            if not tx._pending:
                break
        lags.sort()
        q = (lambda f: lags[min(len(lags) - 1, int(f * len(lags)))]) if lags else (lambda f: float("nan"))
        out.put((len(lags), q(0.5), q(0.99), lags[-1] if lags else float("nan"), tx.unmatched, len(tx._pending), ep.send_errors))
        ep.close()

    asyncio.run(run())


def run_t3_lag(kinds: list[str], n: int) -> None:
    print(f"\nT3 lag under drain ({n} queued, every reply TX-stamped): kernel TX stamp - T3 written, µs")
    print(f"{'server':12s} {'stamps':>7s} {'p50':>8s} {'p99':>8s} {'max':>8s} {'unmatched':>10s} {'pending':>8s}")
    for kind in kinds:
        if kind == "echo":
            continue
        for batched in (True, False):
            q: mp.Queue = mp.Queue()
            p = mp.Process(target=t3_lag, args=(kind, n, batched, q))
            p.start()
            cnt, p50, p99, mx, unmatched, pending, _errors = q.get(timeout=120)
            p.join()
            name = kind if batched else kind + "/1"
            print(f"{name:12s} {cnt:>7d} {p50:>8.1f} {p99:>8.1f} {mx:>8.1f} {unmatched:>10d} {pending:>8d}", flush=True)


def run_wakeup(kinds: list[str], n: int, rounds: int) -> None:
    print(f"\none packet per wakeup ({n} request/reply pairs, client in the same process; µs of CPU per packet, "
          f"best and worst of {rounds}):")
    paths = ("shipped", "batch", "single")
    print(f"{'server':10s} {'shipped':>16s} {'batch forced':>16s} {'per packet':>16s}")
    for kind in kinds:
        if kind == "echo":
            continue
        got: dict[str, list[float]] = {b: [] for b in paths}
        for _ in range(rounds):
            for b in paths:
                q: mp.Queue = mp.Queue()
                p = mp.Process(target=wakeup_cost, args=(kind, n, b, q))
                p.start()
                got[b].append(q.get(timeout=120))
                p.join()
        cell = {b: f"{min(v):.2f} ({max(v):.2f})" for b, v in got.items()}
        print(f"{kind:10s} " + " ".join(f"{cell[b]:>16s}" for b in paths), flush=True)
    print("(shipped: per packet until a wakeup finds a second packet; batch forced: recvmmsg/sendmmsg "
          "for the single packet; per packet: mmsg=False)")


# ------------------------------------------------------------------ STAMP sender path


def stamp_sender(port: int, rate: int, duration: float, cpu: int | None, out: mp.Queue) -> None:
    """One agent-style STAMP cycle: rate*duration packets at 1/rate s, replies awaited 1 s."""
    _pin(cpu)
    from agent.sessions.stamp import StampOptions, stamp_session

    n = max(1, int(rate * duration))
    opt = StampOptions("127.0.0.1", port, count=n, interval=1.0 / rate, wait=1.0, follow_up=True)

    async def run() -> tuple[int, int, float, float]:
        c0 = time.process_time()
        res = await stamp_session(opt)
        cpu_s = time.process_time() - c0
        recs = res.records
        span = (recs[-1].t1_ns - recs[0].t1_ns) / 1e9 if len(recs) > 1 else 0.0
        return len(recs), res.summary.loss.received, (len(recs) - 1) / span if span > 0 else 0.0, cpu_s / n

    out.put(asyncio.run(run()))


def run_sender_path(rates: list[int], duration: float, pin: bool) -> None:
    print(f"\nSTAMP sender path (agent.sessions.stamp.stamp_session, Follow-Up Telemetry asked), {duration:.1f} s "
          "per rate, against the stamp server:")
    print(f"{'rate':>8s} {'sent':>8s} {'replies':>8s} {'achieved pps':>13s} {'sender CPU µs/pkt':>18s}")
    port_q: mp.Queue = mp.Queue()
    stats_q: mp.Queue = mp.Queue()
    stop = mp.Event()
    srv_cpu, snd_cpu = (1, 0) if pin and (os.cpu_count() or 1) >= 2 else (None, None)
    proc = mp.Process(target=xwamp_server, args=("stamp", port_q, stop, srv_cpu, stats_q), daemon=True)
    proc.start()
    port = port_q.get(timeout=30)
    try:
        for rate in rates:
            q: mp.Queue = mp.Queue()
            p = mp.Process(target=stamp_sender, args=(port, rate, duration, snd_cpu, q))
            p.start()
            sent, got, achieved, cpu_pp = q.get(timeout=duration * 4 + 60)
            p.join()
            flag = "" if got == sent and achieved >= 0.97 * rate else ("  LOSS" if got < sent else "  (sender-limited)")
            print(f"{rate:>8d} {sent:>8d} {got:>8d} {achieved:>13.0f} {cpu_pp * 1e6:>18.1f}{flag}", flush=True)
            if flag:
                break
    finally:
        stop.set()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per rate step")
    ap.add_argument("--servers", default="echo,unauth,auth", help="comma list: echo,unauth,auth,stamp,stamp-auth")
    ap.add_argument("--rates", default="10000,20000,30000,40000,50000,60000,70000,80000,90000,100000,120000,140000,160000",
                    help="comma list of rates (pps), tried in order until the first loss")
    ap.add_argument("--pin", action="store_true",
                    help="pin sender and server to separate CPUs (better on an idle machine, worse on a busy one)")
    ap.add_argument("--capacity", type=int, default=30000, help="packets for the drain-capacity test (0: skip)")
    ap.add_argument("--no-single", action="store_true",
                    help="drain table: skip the per-packet (recvmsg/sendto) rows measured for comparison")
    ap.add_argument("--rounds", type=int, default=3, help="drain table: rounds, each server alternated in each")
    ap.add_argument("--drain-only", action="store_true", help="only the drain-capacity table")
    ap.add_argument("--send-batch", type=int, default=0, help="replies per sendmmsg (default: the agent's)")
    ap.add_argument("--sender-rates", default="1000,2000,5000,10000,20000",
                    help="rates (pps) for the STAMP sender path, tried until the first loss ('': skip)")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    global SEND_BATCH
    SEND_BATCH = args.send_batch or None
    if args.drain_only:
        run_capacity([k.strip() for k in args.servers.split(",")], args.capacity, not args.no_single, args.rounds)
        if not args.no_single:
            run_wakeup([k.strip() for k in args.servers.split(",")], 10000, args.rounds)
            run_t3_lag([k.strip() for k in args.servers.split(",")], 5000)
        return 0
    print(f"loopback reflector benchmark: {os.cpu_count()} CPUs, {args.duration:.1f} s per step, "
          f"{'pinned' if args.pin else 'unpinned'}", flush=True)
    results: list[dict[str, Any]] = []
    for kind in args.servers.split(","):
        results.append(run_server(kind.strip(), rates, args.duration, args.pin))
    print()
    print(f"{'server':10s} {'max pps, 0 % loss':>18s}  {'vs echo':>8s}  {'answered per server CPU-second':>31s}")
    echo = next((r["max_pps_no_loss"] for r in results if r["server"] == "echo"), 0)
    for r in results:
        rel = f"{100 * r['max_pps_no_loss'] / echo:.0f} %" if echo else "-"
        pc = f"{r['pps_per_cpu_s']:.0f}" if r.get("pps_per_cpu_s") else "-"
        print(f"{r['server']:10s} {r['max_pps_no_loss']:>18d}  {rel:>8s}  {pc:>31s}")
    print("(the last column is what one core would sustain if the reflector had it to itself; "
          "the machine is shared, so the 0 % loss column is noisy)")
    if args.capacity:
        run_capacity([k.strip() for k in args.servers.split(",")], args.capacity, not args.no_single, args.rounds)
    if args.sender_rates:
        run_sender_path([int(r) for r in args.sender_rates.split(",")], args.duration, args.pin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
