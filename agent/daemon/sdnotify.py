"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (no-op when unset)."""

from __future__ import annotations

import os
import socket


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...`` lines; True if sent.

    Never raises: a missing or dead notify socket must not take the agent down.
    """
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not path or not lines:
        return False
    if path[0] == "@":  # abstract namespace: leading NUL instead of '@'
        path = "\0" + path[1:]
    elif path[0] != "/":
        return False  # systemd also allows vsock:...; not for a router daemon
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), path)
        return True
    except OSError:
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    e = env if env is not None else os.environ
    usec, pid = e.get("WATCHDOG_USEC"), e.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        return None
