"""What every hostile-peer test (issue 11) needs: a real ``xwamp server`` / ``xwamp agent``
subprocess on loopback, its RSS, a legitimate client from another loopback address, and
the attacker's library calls. Used by tests/hostile/ and bench/hostile.py.

Loopback is 127.0.0.0/8 on Linux: attackers take addresses of their own /24s, the
legitimate client 127.1.0.2 (a fresh /24: the prefix caps are per /24).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent.parent
LEGIT_SOURCE = "127.1.0.2"
USER, PASSPHRASE = "alice", "hostile peers are users too"
RSS_BOUND = 50 << 20  # bytes an attack may add to the server's resident memory


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def keyfile(directory: Path) -> Path:
    p = directory / "keys"
    p.write_text(f"{USER} {PASSPHRASE}\n")
    p.chmod(0o600)  # a passphrase file others can read is refused, as ssh does
    return p


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Served:
    """A running ``xwamp server`` (or agent) with its stderr in a file (never a full pipe)."""

    def __init__(self, proc: subprocess.Popen, log: Path, twamp: int, owamp: int, keys: Path,
                 metrics: int | None = None) -> None:
        self.proc, self.log, self.twamp, self.owamp, self.keys, self.metrics = proc, log, twamp, owamp, keys, metrics
        self.rss0 = rss(proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_growth(self) -> int:
        return rss(self.pid) - self.rss0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first log match of ``pattern`` (a regex), waiting for it (no timed assertion:
        the timeout only keeps a broken test from hanging)."""
        end = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.text())
            if found or time.monotonic() > end:
                assert found, f"no log line matching {pattern!r} in:\n{self.text()[-3000:]}"
                return found
            time.sleep(0.1)

    def ping(self, source: str = LEGIT_SOURCE, count: int = 3, timeout: float = 30.0) -> dict:
        """``xwamp ping --mode auth -c 3`` from ``source``: the legitimate client."""
        return legit_ping(self.twamp, self.keys, source, count, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def legit_ping(port: int, keys: Path, source: str = LEGIT_SOURCE, count: int = 3, timeout: float = 30.0,
               host: str = "127.0.0.1") -> dict:
    """Run the legitimate client; its JSON result plus ``returncode``, ``stderr`` and ``seconds``."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "agent", "ping", host, "--port", str(port), "--source", source,
                        "--mode", "auth", "--keyfile", str(keys), "--user", USER, "-c", str(count), "-i", "0.05",
                        "--wait", "2", "--timeout", str(timeout), "--json"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout + 30)
    doc: dict = {}
    if r.returncode == 0:
        doc = json.loads(r.stdout)
    doc.update(returncode=r.returncode, stderr=r.stderr, seconds=time.monotonic() - t0)
    return doc


def received(doc: dict) -> int:
    return int(doc.get("summary", {}).get("loss", {}).get("received", 0))


def start_server(tmp: Path, *extra: str, protocol: str = "both") -> Served:
    """``xwamp -v server`` on 127.0.0.1, ephemeral control ports, keyfile, PBKDF2 Count 1024,
    offering unauth (the attackers) and auth (the legitimate client)."""
    keys = keyfile(tmp)
    log = tmp / f"server-{time.monotonic_ns()}.log"
    err = open(log, "w")
    cmd = [sys.executable, "-m", "agent", "-v", "server", "--listen", "127.0.0.1", "--protocol", protocol,
           "--twamp-port", "0", "--owamp-port", "0", "--keyfile", str(keys), "--count", "1024",
           "--mode", "unauth", "--mode", "auth", "--mode", "enc", "--duration", "600", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    ports = {"TWAMP": 0, "OWAMP": 0}
    want = {"both": 2}.get(protocol, 1)
    assert proc.stdout is not None
    while sum(1 for v in ports.values() if v) < want:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited: {log.read_text()}")
        m = re.search(r"(TWAMP|OWAMP) on \S+ port (\d+)", line)
        if m:
            ports[m.group(1)] = int(m.group(2))
    proc.stdout.close()  # nothing more is read: keep the pipe from filling
    return Served(proc, log, ports["TWAMP"], ports["OWAMP"], keys)


def start_agent(tmp: Path, server_toml: str = "", exporter_toml: str = "") -> Served:
    """``xwamp agent`` serving TWAMP/OWAMP on 127.0.0.1 and metrics on an ephemeral port."""
    keys = keyfile(tmp)
    tw, ow = free_port(), free_port()
    conf = tmp / f"agent-{time.monotonic_ns()}.toml"
    conf.write_text(f"""
[agent]
log_format = "logfmt"
log_level = "info"
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
keyfile = "{keys}"
modes = ["unauth", "auth"]
{server_toml}
[exporter]
port = 0
{exporter_toml}
""")
    e = env()
    e.pop("NOTIFY_SOCKET", None)
    log = tmp / f"agent-{time.monotonic_ns()}.log"
    err = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "agent", "--config", str(conf)], cwd=ROOT, env=e,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    err.close()
    end = time.monotonic() + 60
    metrics = None
    while metrics is None and time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited: {log.read_text()}")
        m = re.search(r'agent ready.*exporter="?127\.0\.0\.1:(\d+)', log.read_text())
        if m:
            metrics = int(m.group(1))
        time.sleep(0.1)
    assert metrics, log.read_text()
    return Served(proc, log, tw, ow, keys, metrics)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout: float = 10.0, scheme: str = "http", context=None) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/metrics", timeout=timeout, context=context) as r:
        return r.read().decode()


def attacker_addresses(n: int, per_prefix: int, second_octet: int = 20) -> Iterator[str]:
    """``n`` loopback addresses, ``per_prefix`` to a /24: 127.<second_octet>.<k>.<1..>."""
    for i in range(n):
        yield f"127.{second_octet}.{i // per_prefix}.{i % per_prefix + 1}"


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


async def attacker_client(port: int, twamp: bool, source: str = "127.9.0.1", mode: str = "unauth",
                          keys: Path | None = None):
    """The attacker as a library user: our own control client (no checks it could skip
    matter here; the server is what is under test)."""
    from agent.control.aio import AsyncControlClient
    from agent.control.keyring import PassphraseFile

    ks = PassphraseFile(str(keys)) if keys else None
    return await AsyncControlClient.connect("127.0.0.1", port, twamp=twamp, wanted=(mode,),
                                            key_id=USER if keys else "", key_source=ks,
                                            local_addr=source, timeout=20)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="xwamp-hostile-"))


async def twamp_session(conn, sock: socket.socket, receiver_port: int = 0, padding: int = 27):
    """Request-TW-Session (RFC 5357 §3.5) for the attacker's UDP ``sock``; its Accept-Session event."""
    from agent.control import messages as m

    req = m.RequestTWSession(conn.local[0], conn.peer[0], sock.getsockname()[1], receiver_port,
                             padding_length=padding, timeout=1 << 32)
    return await conn.request_tw_session(req)


def twamp_packet(seq: int, padding: int = 27) -> bytes:
    """RFC 5357 §4.1.2 unauthenticated sender packet: Seq(4) Timestamp(8) Error Estimate(2)
    and padding (27 octets makes it as large as the reply)."""
    import struct

    ntp = int((time.time() + 2208988800) * (1 << 32))
    return struct.pack("!IQH", seq, ntp, 0x0001) + bytes(padding)


def blast(sock: socket.socket, dest: tuple[str, int], seconds: float, packet=twamp_packet) -> tuple[int, int, float]:
    """Send as fast as we can for ``seconds`` and count the replies: (sent, replies, elapsed)."""
    sock.setblocking(False)
    sent = got = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for _ in range(64):
            try:
                sock.sendto(packet(sent), dest)
                sent += 1
            except BlockingIOError:
                break
        while True:
            try:
                sock.recv(4096)
                got += 1
            except BlockingIOError:
                break
    elapsed = time.monotonic() - t0
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        try:
            sock.recv(4096)
            got += 1
        except BlockingIOError:
            time.sleep(0.01)
    return sent, got, elapsed
