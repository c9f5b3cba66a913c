"""Hostile peers against the control plane's state deadlines and bounds (issue 11, rows 1,
6, 7 and 9): a real ``xwamp server`` subprocess on loopback, attacked with raw sockets that
speak RFC 4656/5357 with ``struct`` (and raw ``cryptography`` for the Token), never with
xwamp's codecs. Each test asserts: the server is alive, its RSS grew < 50 MB, a legitimate
client from a fresh address is served (well before the deadline that applied before the
fix), and the event shows in the server's log.

No timed assertion is tight: the machine is loaded. "Served" bounds are the deadline that
would apply without the fix (30 s idle; 3600 s test), never the 1 s goal itself."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

ROOT = Path(__file__).resolve().parent.parent.parent
PASSPHRASE = b"hostile test passphrase"
OLD_IDLE = 30.0  # xwamp server's --idle-timeout default: what freed a slot before the fix


# ---------------------------------------------------------------- the server under attack


@contextlib.contextmanager
def xwamp_server(tmp_path: Path, *extra: str, count: int = 1024) -> Iterator[tuple[subprocess.Popen, dict, Path]]:
    keys = tmp_path / "keys"
    keys.write_text("alice " + PASSPHRASE.decode() + "\n")
    keys.chmod(0o600)  # a passphrase file others can read is refused, as ssh does
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "-v", "server", "--listen", "127.0.0.1",
                                 "--twamp-port", "0", "--owamp-port", "0", "--keyfile", str(keys),
                                 "--count", str(count), "--duration", "300",
                                 # plain unauth next to a keyfile only when asked for (issue 11 item 9)
                                 "--mode", "unauth", "--mode", "auth", "--mode", "enc", *extra],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ports: dict[str, int] = {}
        assert proc.stdout is not None
        while len(ports) < 2:
            line = proc.stdout.readline()
            assert line, log.read_text()
            ports[line.split()[2]] = int(line.split(" port ")[1].split(",")[0])
        yield proc, ports, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} octets")
        buf += chunk
    return buf


def connect(port: int, src: str, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(src, 0))
    s.settimeout(timeout)
    return s


# ---------------------------------------------------------------- RFC 4656 §3.1 on the wire


def set_up_response(mode: int, key_id: bytes = b"", token: bytes = bytes(64), iv: bytes = bytes(16)) -> bytes:
    return struct.pack("!I", mode) + key_id.ljust(80, b"\0") + token + iv


def greeting_fields(g: bytes) -> tuple[int, bytes, bytes, int]:
    modes, challenge, salt, count = struct.unpack("!I16s16sI", g[12:52])
    return modes, challenge, salt, count


def rfc_token(passphrase: bytes, salt: bytes, count: int, challenge: bytes) -> bytes:
    """Token = AES-CBC(PBKDF2-SHA1 key, IV 0) of Challenge | AES key | HMAC key (RFC 4656 §3.1)."""
    key = PBKDF2HMAC(hashes.SHA1(), 16, salt, count).derive(passphrase)
    enc = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    return enc.update(challenge + os.urandom(16) + os.urandom(32)) + enc.finalize()


def legit_served(port: int, src: str, give_up: float) -> float | None:
    """Seconds until an unauthenticated set-up from ``src`` gets Server-Start Accept=0
    (retrying while the server greets with Modes=0 or drops us); None after ``give_up``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < give_up:
        with contextlib.suppress(OSError, ConnectionError):
            with connect(port, src, timeout=5) as s:
                modes_, *_ = greeting_fields(recv_exact(s, 64))
                if modes_ & 1:
                    s.sendall(set_up_response(1))
                    if recv_exact(s, 48)[15] == 0:
                        return time.monotonic() - t0
        time.sleep(0.25)
    return None


def attackers(n_addr: int = 8, per_addr: int = 8, base: int = 10) -> list[str]:
    return [f"127.0.0.{base + a}" for a in range(n_addr) for _ in range(per_addr)]


# ---------------------------------------------------------------- row 1: Fetch bounded by what exists


def test_owamp_stop_next_seqno_max_then_fetch(tmp_path: Path) -> None:
    with xwamp_server(tmp_path) as (proc, ports, log):
        rss0 = rss_mb(proc.pid)
        s = connect(ports["OWAMP"], "127.0.0.20")
        recv_exact(s, 64)
        s.sendall(set_up_response(1))
        assert recv_exact(s, 48)[15] == 0
        # Request-Session: Conf-Receiver, 1 packet, one fixed slot of 0.1 s (RFC 4656 §3.5)
        req = (struct.pack("!BBBBII", 1, 4, 0, 1, 1, 1) + struct.pack("!HH", 9999, 0) + bytes(16) + bytes(16)
               + bytes(16) + struct.pack("!I", 0) + struct.pack("!QQ", 0, 0) + struct.pack("!I", 0) + bytes(8)
               + bytes(16) + struct.pack("!I", 1) + bytes(4) + struct.pack("!Q", 1 << 31) + bytes(16))
        s.sendall(req)
        acc = recv_exact(s, 48)
        assert acc[0] == 0, acc[0]
        sid = acc[4:20]
        s.sendall(bytes([2]) + bytes(31))  # Start-Sessions
        assert recv_exact(s, 32)[0] == 0
        # Stop-Sessions, one description: Next Seqno = 0xFFFFFFFF, no skip ranges (§3.8)
        s.sendall(struct.pack("!BBHI", 3, 0, 0, 1) + bytes(8) + sid + struct.pack("!II", 0xFFFFFFFF, 0)
                  + bytes(8) + bytes(16))
        stop = recv_exact(s, 32)  # the server's own Stop-Sessions: it sent no session
        assert stop[0] == 3
        s.sendall(bytes([4]) + bytes(7) + struct.pack("!II", 0, 0xFFFFFFFF) + sid + bytes(16))  # Fetch-Session
        ack = recv_exact(s, 32)  # Fetch-Ack: Accept, Finished, MBZ, Next Seqno, skip ranges, records
        accept, _fin, nskip, nrec = ack[0], ack[1], *struct.unpack("!II", ack[8:16])
        assert accept == 0 and nskip == 0 and nrec <= 1, (accept, nskip, nrec)  # one packet asked: one record
        s.close()
        served = legit_served(ports["OWAMP"], "127.0.0.77", 20)
        print(f"row 1: Fetch-Ack records {nrec}; legitimate client served after {served} s; "
              f"RSS {rss_mb(proc.pid) - rss0:+.1f} MB")
        assert served is not None
        assert proc.poll() is None and rss_mb(proc.pid) - rss0 < 50
        assert "Next Seqno 4294967295 over Number of Packets 1: bounded" in log.read_text()


# ---------------------------------------------------------------- rows 6 and 7: state deadlines


def _hold(port: int, srcs: list[str], prepare) -> tuple[list[socket.socket], threading.Event]:
    """Connect from every address and ``prepare`` each connection. Connections over the
    admission caps (per /24 prefix, weak share) are refused by the server (greeting Modes=0,
    then closed): they are kept too, closed already."""
    socks = []
    for src in srcs:
        s = connect(port, src)
        with contextlib.suppress(OSError, ConnectionError, AssertionError):
            prepare(s)
        socks.append(s)
    return socks, threading.Event()


def test_trickle_connections_closed_by_setup_deadline(tmp_path: Path) -> None:
    """Row 6: 64 connections from 8 addresses, 1 octet every 5 s. The set-up deadline runs
    from connect and no read restarts it: every one is closed, then a client gets in."""
    with xwamp_server(tmp_path) as (proc, ports, log):
        port = ports["TWAMP"]
        rss0 = rss_mb(proc.pid)

        def greeted(s: socket.socket) -> None:
            recv_exact(s, 64)
            s.sendall(b"\x00")

        socks, stop = _hold(port, attackers(), greeted)

        def trickle() -> None:
            while not stop.wait(5.0):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.sendall(b"\x00")

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            # the table is full now: the first try is refused (greeting Modes=0)
            served = legit_served(port, "127.0.0.77", OLD_IDLE)
            print(f"row 6: legitimate client served after {served} s; RSS {rss_mb(proc.pid) - rss0:+.1f} MB")
            assert served is not None and served < OLD_IDLE, served
            closed = 0
            for s in socks:
                s.settimeout(0.5)
                with contextlib.suppress(OSError):
                    if s.recv(1) == b"":
                        closed += 1
            assert closed == len(socks)
        finally:
            stop.set()
            for s in socks:
                s.close()
        assert proc.poll() is None and rss_mb(proc.pid) - rss0 < 50
        text = log.read_text()
        # Connections over the per-prefix cap (all attackers share 127.0.0.0/24) are refused at
        # admission; every one that was admitted is closed by the set-up deadline, not by a read.
        assert text.count("setup deadline (5s) passed in state setup") >= 1, text[-2000:]


def test_zero_session_start_closed_by_empty_test_deadline(tmp_path: Path) -> None:
    """Row 7: 64 connections set up, Start-Sessions with no session, then silence. Held for
    max_test_time (3600 s) before; now the empty-test deadline (10 s) closes them."""
    with xwamp_server(tmp_path) as (proc, ports, log):
        port = ports["TWAMP"]
        rss0 = rss_mb(proc.pid)

        def started_empty(s: socket.socket) -> None:
            recv_exact(s, 64)
            s.sendall(set_up_response(1))
            assert recv_exact(s, 48)[15] == 0
            s.sendall(bytes([2]) + bytes(31))  # Start-Sessions with nothing requested
            assert recv_exact(s, 32)[0] == 0  # Start-Ack Accept=0: the server is in test

        socks, _ = _hold(port, attackers(), started_empty)
        try:
            served = legit_served(port, "127.0.0.77", OLD_IDLE)
            print(f"row 7: legitimate client served after {served} s; RSS {rss_mb(proc.pid) - rss0:+.1f} MB")
            assert served is not None and served < OLD_IDLE, served
        finally:
            for s in socks:
                s.close()
        assert proc.poll() is None and rss_mb(proc.pid) - rss0 < 50
        assert log.read_text().count("empty-test deadline (10s) passed in state test") >= 1


# ---------------------------------------------------------------- row 9: KeyIDs and failed logins


def _bad_setup(port: int, src: str, key_id: bytes) -> tuple[int, float]:
    """Authenticated Set-Up-Response with a Token that cannot be right: (Accept, seconds)."""
    with connect(port, src, timeout=30) as s:
        modes_, *_ = greeting_fields(recv_exact(s, 64))
        assert modes_ & 2
        t0 = time.perf_counter()
        s.sendall(set_up_response(2, key_id, os.urandom(64), os.urandom(16)))
        accept = recv_exact(s, 48)[15]
        return accept, time.perf_counter() - t0


def test_unknown_keyid_costs_the_same_and_failures_are_limited(tmp_path: Path) -> None:
    # A high Count makes the PBKDF2 the server spends (or skips) dominate everything else.
    with xwamp_server(tmp_path, count=1 << 16) as (proc, ports, log):
        port = ports["TWAMP"]
        rss0 = rss_mb(proc.pid)
        known, unknown = [], []
        for i in range(4):  # interleaved, each from a fresh address (its own failure budget)
            a, dt = _bad_setup(port, f"127.0.1.{2 * i + 1}", b"alice")
            assert a == 1
            known.append(dt)
            a, dt = _bad_setup(port, f"127.0.1.{2 * i + 2}", b"nobody-" + os.urandom(4).hex().encode())
            assert a == 1
            unknown.append(dt)
        # before the fix: known ~1.9 ms vs unknown ~0.4 ms at Count 4096 (a 5x tell, 100x here)
        print(f"row 9: median known {statistics.median(known) * 1e3:.1f} ms, unknown {statistics.median(unknown) * 1e3:.1f} ms")
        assert statistics.median(unknown) > 0.3 * statistics.median(known), (known, unknown)

        # one address guessing: after its budget (5) it is answered Accept=5 without a derivation
        answers = [_bad_setup(port, "127.0.2.1", b"alice")[0] for _ in range(10)]
        assert answers[:5] == [1] * 5 and set(answers[5:]) == {5}, answers

        # a legitimate client (right passphrase) from another address is served meanwhile
        with connect(port, "127.0.0.77", timeout=30) as s:
            modes_, challenge, salt, count = greeting_fields(recv_exact(s, 64))
            s.sendall(set_up_response(2, b"alice", rfc_token(PASSPHRASE, salt, count, challenge), os.urandom(16)))
            assert recv_exact(s, 48)[15] == 0
        assert proc.poll() is None and rss_mb(proc.pid) - rss0 < 50
        text = log.read_text()
        # logged at most once per address per interval (60 s), counted in the summary
        assert text.count("control authentication failures from 127.0.2.1:") == 1, text[-3000:]
        proc.terminate()
        proc.wait(15)
        assert "authentication failures: 13 (5 set-ups refused by the rate limit)" in log.read_text()
