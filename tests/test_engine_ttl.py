"""Issue 13 §3: test packets leave with TTL / Hop Limit 255 (RFC 4656 §4.1.2: "The sender
SHOULD set the TTL in IPv4 (or Hop Limit in IPv6) in the UDP packet to 255"), so peers that
report hops as 255 - TTL print 0 on loopback, not 191. Checked with plain sockets reading
IP_RECVTTL / IPV6_RECVHOPLIMIT, not with xwamp's decoder."""

from __future__ import annotations

import socket
import struct

import pytest

from agent.engine.udp import open_udp_socket

IP_RECVTTL, IP_TTL_CMSG = 12, 2
IPV6_RECVHOPLIMIT, IPV6_HOPLIMIT = 51, 52


def _received_ttl(fam: int, sender_local: str, dest: str, send_to: str | None = None) -> int:
    rx = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET:
            rx.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        else:
            rx.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
        rx.bind((dest, 0))
        rx.settimeout(5)
        tx = open_udp_socket((sender_local, 0))
        try:
            tx.sendto(b"x" * 44, (send_to or dest, rx.getsockname()[1]))
            _data, anc, _f, _a = rx.recvmsg(64, 64)
        finally:
            tx.close()
    finally:
        rx.close()
    for level, ctype, data in anc:
        if (level, ctype) in ((socket.IPPROTO_IP, IP_TTL_CMSG), (socket.IPPROTO_IPV6, IPV6_HOPLIMIT)):
            return struct.unpack("=i", data[:4])[0]
    raise AssertionError("no TTL in the ancillary data")


def test_ipv4_test_packets_have_ttl_255() -> None:
    assert _received_ttl(socket.AF_INET, "127.0.0.1", "127.0.0.1") == 255


def test_dual_stack_socket_to_ipv4_has_ttl_255() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        ttl = _received_ttl(socket.AF_INET, "::", "127.0.0.1", "::ffff:127.0.0.1")
    except OSError as e:
        pytest.skip(f"no dual-stack socket here: {e}")
    assert ttl == 255


def test_ipv6_test_packets_have_hop_limit_255() -> None:
    try:
        ttl = _received_ttl(socket.AF_INET6, "::1", "::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    assert ttl == 255
