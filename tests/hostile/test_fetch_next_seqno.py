"""A hostile OWAMP client (written here from RFC 4656 with struct, not with our codecs) asks
for one 10-packet session, stops it claiming Next Seqno 2^32-1, then fetches everything.

Before: the server's receiver appended a "lost" record for every sequence number below Next
Seqno, four billion of them, until memory ran out. Found on the Fetch-Session path by
tests/fuzz/targets.py server_session (corpus: seed-owamp-huge-next-seqno). Now Next Seqno is
bounded by the session's Number of Packets (RFC 4656 §3.8: the packets the sender sent)."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"server closed after {len(buf)} of {n} octets"
        buf += chunk
    return buf


def _conversation(port: int, next_seqno: int) -> tuple[int, int, int]:
    """(Fetch-Ack Accept, Next Seqno, Number of Records) after Request, Start, Stop, Fetch."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        greeting = _recv(s, 64)  # Unused(12) Modes(4) Challenge(16) Salt(16) Count(4) MBZ(12)
        assert struct.unpack_from("!I", greeting, 12)[0] & 1
        s.sendall(struct.pack("!I80s64s16s", 1, b"", bytes(64), bytes(16)))  # Set-Up-Response, unauthenticated
        start = _recv(s, 48)  # MBZ(15) Accept(1) Server-IV(16) Start-Time(8) MBZ(8)
        assert start[15] == 0
        lo = socket.inet_aton("127.0.0.1") + bytes(12)
        # Request-Session: Conf-Receiver (the server receives), 10 packets, one fixed slot
        req = struct.pack("!BBBBIIHH16s16s16sIQQI8s16s", 1, 4, 0, 1, 1, 10, 0, 0, lo, lo, bytes(16), 0, 0,
                          2 << 32, 0, bytes(8), bytes(16))
        req += struct.pack("!B7sQ", 1, bytes(7), 1 << 28) + bytes(16)
        s.sendall(req)
        accept = _recv(s, 48)  # Accept(1) MBZ(1) Port(2) SID(16) ... HMAC(16)
        assert accept[0] == 0, accept[0]
        sid = accept[4:20]
        s.sendall(struct.pack("!B15s16s", 2, bytes(15), bytes(16)))  # Start-Sessions
        assert _recv(s, 32)[0] == 0  # Start-Ack
        # Stop-Sessions with one session description: SID, Next Seqno, no skip ranges, padded
        s.sendall(struct.pack("!BBHI8s", 3, 0, 0, 1, bytes(8)) + struct.pack("!16sII8s", sid, next_seqno, 0, bytes(8))
                  + bytes(16))
        stop = _recv(s, 16)  # the server's Stop-Sessions: it sent nothing itself
        assert stop[0] == 3
        nsess = struct.unpack_from("!I", stop, 4)[0]
        assert nsess == 0
        _recv(s, 16)  # its HMAC block
        s.sendall(struct.pack("!B7sII16s16s", 4, bytes(7), 0, 0xFFFFFFFF, sid, bytes(16)))  # Fetch-Session, all
        ack = _recv(s, 32)
        acc, _fin, nxt, nskip, nrec = ack[0], ack[1], *struct.unpack_from("!III", ack, 4)
        if acc == 0:
            _recv(s, 112 + 16 + 16)  # the original Request-Session
            _recv(s, (8 * nskip + 15) // 16 * 16 + 16)  # skip ranges + HMAC
            _recv(s, (25 * nrec + 15) // 16 * 16 + 16)  # records + HMAC
        return acc, nxt, nrec


def test_fetch_after_stop_with_huge_next_seqno_is_bounded() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "agent", "server", "--protocol", "owamp", "--listen", "127.0.0.1",
                          "--owamp-port", "0", "--duration", "120"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        m = re.search(r"OWAMP on 127\.0\.0\.1 port (\d+)", line)
        assert m, line + p.stderr.read() if p.poll() is not None else line
        port = int(m.group(1))
        acc, nxt, nrec = _conversation(port, 0xFFFFFFFF)
        assert acc == 0 and nrec <= 10, (acc, nxt, nrec)  # 10 lost records, not 4 billion
        acc, nxt, nrec = _conversation(port, 3)  # an honest Next Seqno still works as before
        assert acc == 0 and nrec == 3
        assert p.poll() is None  # and the server is still there
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
