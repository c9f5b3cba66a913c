"""Bystander SAs for the benchmarks that need a big XFRM table (sa_dump.py, agent_scale.py):
N ESP tunnel SAs, installed into a netns with one ``ip -batch`` (the fastest way iproute2
offers; one `ip xfrm state add` per SA would take minutes at 50k under TCG)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def bystander_lines(n: int) -> list[str]:
    """`ip -batch` lines for N SAs 10.1.a.b -> 10.2.a.b, SPIs from 0x10000, reqids from 1."""
    lines = []
    for i in range(n):
        a, b = (i >> 8) & 255, i & 255
        lines.append(
            f"xfrm state add src 10.1.{a}.{b} dst 10.2.{a}.{b} proto esp spi {0x10000 + i:#x} reqid {i + 1} "
            f"mode tunnel auth-trunc 'hmac(sha256)' 0x{i + 1:064x} 128 enc 'cbc(aes)' 0x{i + 1:032x}\n"
        )
    return lines


def ip_batch(ns: str, lines: list[str]) -> float:
    """Run ``lines`` through ``ip -n NS -batch``; the seconds it took."""
    with tempfile.NamedTemporaryFile("w", dir="/tmp", suffix=".batch", delete=False) as f:
        f.writelines(lines)
    try:
        t0 = time.perf_counter()
        subprocess.run(["ip", "-n", ns, "-batch", f.name], check=True)
        return time.perf_counter() - t0
    finally:
        os.unlink(f.name)
