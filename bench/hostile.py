"""Hostile peers against a real ``xwamp server`` on loopback, for longer than the tests.

Issue 11's attacks run one after another, ``--seconds`` each (default 60), against one
server process. During each, a legitimate client from a fresh address (127.1.0.2, its own
/24) connects and completes an authenticated set-up every second; its latency is compared
with the same probe on the idle server, measured first in the same run. For each attack
it prints the server's RSS growth and peak, its CPU share, the probe's median and worst
latency and failures, and what the server counted (xwamp_server_caps_total's sources).

    python3 bench/hostile.py [--seconds 60] [--attacks dup,sender,flood,drip,silent,idle]

It prints figures and asserts nothing. Run it under the machine's benchmark lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.hostile import harness as h  # noqa: E402

ATTACKER = "127.9.0.1"


# ----------------------------------------------------------------------------- attacks
# Each runs until ``stop`` is set; they hold sockets, so they run in threads.


def _loop_until(stop: threading.Event, coro_fn: Callable) -> None:
    asyncio.run(coro_fn(stop))


def attack_dup(srv: h.Served, stop: threading.Event) -> None:
    """Row 2: one OWAMP test packet (seq 0) over and over into a Conf-Receiver session."""
    import struct

    from agent.control import messages as m

    async def run(stop: threading.Event) -> None:
        conn = await h.attacker_client(srv.owamp, twamp=False, source=ATTACKER)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((ATTACKER, 0))
        udp.setblocking(False)
        req = m.RequestSession(conn.local[0], conn.peer[0], udp.getsockname()[1], 0, conf_sender=False,
                               conf_receiver=True, num_packets=1, slots=(m.Slot.seconds(m.Slot.FIXED, 0.01),))
        acc = await conn.request_session(req)
        await conn.start_sessions()
        pkt = struct.pack("!IQH", 0, int((time.time() + 2208988800) * (1 << 32)), 1)
        while not stop.is_set():
            for _ in range(256):
                try:
                    udp.sendto(pkt, ("127.0.0.1", acc.accept.port))
                except BlockingIOError:
                    break
            await asyncio.sleep(0)
        udp.close()
        await conn.close()

    _loop_until(stop, run)


def attack_sender(srv: h.Served, stop: threading.Event) -> None:
    """Row 3: OWAMP Conf-Sender sessions: one at gap 0 (refused), then as many at the cap as allowed."""
    from agent.control import messages as m

    async def run(stop: threading.Event) -> None:
        conn = await h.attacker_client(srv.owamp, twamp=False, source=ATTACKER)
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((ATTACKER, 0))
        rx.setblocking(False)

        def req(gap: float) -> m.RequestSession:
            return m.RequestSession(conn.peer[0], conn.local[0], 0, rx.getsockname()[1],
                                    sid=m.make_sid(conn.local[0], 0), conf_sender=True, conf_receiver=False,
                                    num_packets=1 << 20, slots=(m.Slot.seconds(m.Slot.FIXED, gap),))

        await conn.request_session(req(0.0))
        for _ in range(8):
            await conn.request_session(req(0.001))
        await conn.start_sessions()
        while not stop.is_set():
            try:
                while True:
                    rx.recv(2048)
            except BlockingIOError:
                pass
            await asyncio.sleep(0.01)
        rx.close()
        await conn.close()

    _loop_until(stop, run)


def attack_flood(srv: h.Served, stop: threading.Event) -> None:
    """Row 4: a TWAMP session flooded as fast as we can send (policed at --max-rate)."""

    async def run(stop: threading.Event) -> None:
        conn = await h.attacker_client(srv.twamp, twamp=True, source=ATTACKER)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ATTACKER, 0))
        acc = await h.twamp_session(conn, sock)
        await conn.start_sessions()
        dest = ("127.0.0.1", acc.accept.port)
        while not stop.is_set():
            await asyncio.to_thread(h.blast, sock, dest, 1.0)
        sock.close()
        await conn.close()

    _loop_until(stop, run)


def _hold(stop: threading.Event, socks: list[socket.socket], drip: bool = False) -> None:
    while not stop.wait(1.0):
        if drip:
            for s in socks:
                try:
                    s.send(b"\0")
                except OSError:
                    pass
    for s in socks:
        s.close()


def _many(port: int, addresses, per_address: int) -> list[socket.socket]:
    out = []
    for a in addresses:
        for _ in range(per_address):
            try:
                out.append(h.connect_from(a, port))
            except OSError:
                pass
    return out


def attack_drip(srv: h.Served, stop: threading.Event) -> None:
    """Row 6: 64 connections from 8 addresses, one byte every second."""
    _hold(stop, _many(srv.twamp, h.attacker_addresses(8, 1, 22), 8), drip=True)


def attack_silent(srv: h.Served, stop: threading.Event) -> None:
    """Row 7: 64 connections from 8 addresses: unauth set-up, Start-Sessions with no session, silence."""
    import struct

    socks = _many(srv.twamp, h.attacker_addresses(8, 1, 23), 8)
    held = []
    for s in socks:
        try:
            g = s.recv(64)
            if len(g) == 64 and struct.unpack_from("!I", g, 12)[0] & 1:
                s.sendall(struct.pack("!I", 1) + bytes(160))
                s.recv(48)
                s.sendall(bytes([2]) + bytes(31))
                s.recv(32)
                held.append(s)
                continue
        except OSError:
            pass
        s.close()
    _hold(stop, held)


def attack_idle(srv: h.Served, stop: threading.Event) -> None:
    """Row 8: 1,000 idle connections from 125 addresses (25 /24s)."""
    _hold(stop, _many(srv.twamp, h.attacker_addresses(125, 5, 24), 8))


ATTACKS: dict[str, Callable[[h.Served, threading.Event], None]] = {
    "dup": attack_dup, "sender": attack_sender, "flood": attack_flood,
    "drip": attack_drip, "silent": attack_silent, "idle": attack_idle,
}


# ----------------------------------------------------------------------------- measuring


async def _probe(srv: h.Served) -> float | None:
    """Seconds for the legitimate client to connect and finish an authenticated set-up."""
    t0 = time.monotonic()
    try:
        conn = await h.attacker_client(srv.twamp, twamp=True, source=h.LEGIT_SOURCE, mode="auth", keys=srv.keys)
    except Exception:  # refused, timed out: a failure
        return None
    dt = time.monotonic() - t0
    await conn.close()
    return dt


def measure(srv: h.Served, seconds: float, attack: Callable | None) -> dict:
    stop = threading.Event()
    th = threading.Thread(target=attack, args=(srv, stop), daemon=True) if attack else None
    if th:
        th.start()
        time.sleep(min(2.0, seconds / 4))  # let it take hold
    rss0, cpu0, t0 = h.rss(srv.pid), h.cpu_seconds(srv.pid), time.monotonic()
    peak, lat, fails = rss0, [], 0
    while time.monotonic() - t0 < seconds:
        v = asyncio.run(_probe(srv))
        if v is None:
            fails += 1
        else:
            lat.append(v)
        peak = max(peak, h.rss(srv.pid))
        time.sleep(max(0.0, 1.0 - (v or 0)))
    elapsed = time.monotonic() - t0
    cpu = (h.cpu_seconds(srv.pid) - cpu0) / elapsed
    stop.set()
    if th:
        th.join(30)
    return {"rss": h.rss(srv.pid), "peak": peak, "cpu": cpu, "lat": lat, "fails": fails, "alive": srv.alive()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per attack (and for the idle baseline)")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma list: " + ",".join(ATTACKS))
    args = ap.parse_args()
    names = [a for a in args.attacks.split(",") if a]
    for a in names:
        if a not in ATTACKS:
            ap.error(f"unknown attack {a!r}")
    srv = h.start_server(h.tmpdir())
    rss_start = h.rss(srv.pid)
    try:
        base = measure(srv, args.seconds, None)
        med0 = statistics.median(base["lat"]) if base["lat"] else float("nan")
        print(f"xwamp server pid {srv.pid}, {os.cpu_count()} CPUs, {args.seconds:g} s per attack; "
              f"legitimate client {h.LEGIT_SOURCE}: connect + authenticated set-up (PBKDF2 Count 1024)")
        print(f"{'attack':8} {'RSS MB':>7} {'+MB':>6} {'peak':>6} {'CPU %':>6} {'probe med ms':>13} "
              f"{'x idle':>7} {'worst ms':>9} {'fails':>6} alive")

        def row(name: str, r: dict) -> None:
            med = statistics.median(r["lat"]) * 1000 if r["lat"] else float("nan")
            worst = max(r["lat"]) * 1000 if r["lat"] else float("nan")
            print(f"{name:8} {r['rss'] / 2**20:7.1f} {(r['rss'] - rss_start) / 2**20:6.1f} "
                  f"{r['peak'] / 2**20:6.1f} {100 * r['cpu']:6.1f} {med:13.1f} {med / 1000 / med0:7.2f} "
                  f"{worst:9.1f} {r['fails']:6d} {'yes' if r['alive'] else 'NO'}", flush=True)

        row("idle", base)
        for name in names:
            row(name, measure(srv, args.seconds, ATTACKS[name]))
    finally:
        srv.stop()
    counted = re.findall(r"(evicted for a newcomer|refused: too many connections from this prefix|"
                         r"session refused[^\n]*|policed: [^\n]*|capped: [^\n]*)", srv.text())
    kinds: dict[str, int] = {}
    for c in counted:
        key = re.sub(r"[0-9a-f]{32}|\d+", "N", c)[:90]
        kinds[key] = kinds.get(key, 0) + 1
    print("server log lines that say a cap acted (rate-limited, so counts are lower bounds):")
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {v:6d}  {k}")
    print(srv.text().strip().splitlines()[-2:] if srv.text().strip() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
