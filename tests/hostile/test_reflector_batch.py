"""The reflector's recvmmsg/sendmmsg path (agent.engine.mmsg) against what a hostile or broken
peer, or a poor kernel, makes of it: an oversized datagram in the queue (MSG_TRUNC), control
messages cut short (MSG_CTRUNC), a peer whose port is closed (ICMP errors on the socket),
sendmmsg taking only part of a batch and refusing one (ENOBUFS), and no recvmmsg at all
(ENOSYS). Each is counted, nothing raises, and every other request is answered."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import socket
import struct

import pytest

from agent.engine import mmsg, udp
from agent.engine.packets import Proto
from agent.engine.reflector import ReflectorSession
from agent.engine.udp import RECV_BUF, TwampReflectorEndpoint

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="libc without recvmmsg/sendmmsg")

N = 100


def _req(i: int) -> bytes:
    """RFC 5357 §4.1.2 unauthenticated sender packet, 41 octets."""
    return struct.pack("!IQH", i, 0x0102030405060708, 0x0001) + bytes(27)


async def _drive(sends, *, ctl: int | None = None, patch=None) -> tuple[TwampReflectorEndpoint, list[bytes]]:
    """Start a reflector, run ``sends(port) -> (client socket, expected requests)``, then drive
    the batched path by hand and collect the replies."""
    ep = TwampReflectorEndpoint(("127.0.0.1", 0), default=ReflectorSession(Proto.TWAMP, error_estimate=0x0001))
    await ep.start()
    assert ep.sock is not None
    ep._loop.remove_reader(ep.sock.fileno())  # type: ignore[union-attr]
    ep._mb = ep._batch_buffers() if ctl is None else ep._batch_buffers(ctl)
    ep._queued = True
    if patch is not None:
        patch(ep)
    client, want = sends(ep.port)
    try:
        for _ in range(50):
            ep._on_readable()
        client.settimeout(3.0)  # only waited for when a reply is missing
        got = []
        try:
            while len(got) < want:
                got.append(client.recv(65535))
        except TimeoutError:
            pass
        return ep, got
    finally:
        client.close()
        ep.close()


def _client() -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    return c


def test_truncated_datagram_counted_others_answered() -> None:
    def sends(port: int):
        c = _client()
        for i in range(N):
            c.sendto(_req(i) if i != 40 else _req(i) + bytes(RECV_BUF + 100), ("127.0.0.1", port))
        return c, N - 1

    ep, got = asyncio.run(_drive(sends))
    assert len(got) == N - 1 and ep.truncated == 1 and ep.counters()["truncated"] == 1
    assert [struct.unpack_from("!I", r, 24)[0] for r in got] == [i for i in range(N) if i != 40]


def test_control_buffer_overflow_counted_and_answered() -> None:
    """A control buffer too small for the stamp: MSG_CTRUNC, T2 from the clock, still answered."""
    def sends(port: int):
        c = _client()
        for i in range(N):
            c.sendto(_req(i), ("127.0.0.1", port))
        return c, N

    ep, got = asyncio.run(_drive(sends, ctl=socket.CMSG_SPACE(4)))
    assert len(got) == N and ep.ctrunc == N and ep.counters()["ctrunc"] == N and ep.send_errors == 0


def test_peer_gone_icmp_errors_do_not_stop_the_batch() -> None:
    """Requests from a port closed before its replies go: the ICMP port-unreachable errors land on
    the reflector socket (IP_RECVERR); the other peer's requests are all answered."""
    def sends(port: int):
        gone, c = _client(), _client()
        for i in range(N):
            (gone if i % 2 else c).sendto(_req(i), ("127.0.0.1", port))
        gone.close()
        return c, N // 2

    ep, got = asyncio.run(_drive(sends))
    assert len(got) == N // 2
    assert [struct.unpack_from("!I", r, 24)[0] for r in got] == list(range(0, N, 2))
    assert ep.default is not None and ep.default.counters.received == N


def test_partial_sendmmsg_and_refused_message() -> None:
    """sendmmsg takes 3, then refuses one with ENOBUFS: that one is counted in send_errors, the rest
    of the batch is retried and sent (never dropped silently)."""
    calls: list[tuple[int, int]] = []

    def patch(ep: TwampReflectorEndpoint) -> None:
        mb = ep._mb
        assert mb is not None
        real = mb.send

        def send(start: int, count: int) -> tuple[int, int]:
            calls.append((start, count))
            if len(calls) == 1:
                return real(start, min(3, count))
            if len(calls) == 2:
                return 0, errno.ENOBUFS
            return real(start, count)

        mb.send = send  # type: ignore[method-assign]

    def sends(port: int):
        c = _client()
        for i in range(N):
            c.sendto(_req(i), ("127.0.0.1", port))
        return c, N - 1

    ep, got = asyncio.run(_drive(sends, patch=patch))
    assert ep.send_errors == 1 and len(got) == N - 1
    lost = calls[1][0]  # the slot refused: the 4th reply of a batch
    seqs = [struct.unpack_from("!I", r, 24)[0] for r in got]
    assert len(set(seqs)) == N - 1 and calls[2][0] == lost + 1


def test_no_recvmmsg_in_the_kernel_falls_back(monkeypatch, caplog) -> None:
    """ENOSYS from recvmmsg: one log line, the per-packet path answers everything."""
    def enosys(*_a):
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(mmsg, "_recvmmsg", enosys)
    monkeypatch.setattr(udp, "_MMSG_LOGGED", [])

    def sends(port: int):
        c = _client()
        for i in range(N):
            c.sendto(_req(i), ("127.0.0.1", port))
        return c, N

    with caplog.at_level(logging.INFO, logger="agent.engine.udp"):
        ep, got = asyncio.run(_drive(sends))
    assert len(got) == N and not ep.mmsg and ep._mb is None and ep.batched == 0
    assert len([r for r in caplog.records if "recvmmsg" in r.getMessage()]) == 1


def test_no_symbols_in_libc(monkeypatch, caplog) -> None:
    monkeypatch.setattr(mmsg, "_sendmmsg", None)
    monkeypatch.setattr(udp, "_MMSG_LOGGED", [])
    with caplog.at_level(logging.INFO, logger="agent.engine.udp"):
        eps = [TwampReflectorEndpoint(("127.0.0.1", 0)) for _ in range(3)]
    assert not any(ep.mmsg for ep in eps)
    assert len([r for r in caplog.records if "recvmmsg" in r.getMessage()]) == 1
