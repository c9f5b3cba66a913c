"""Sockets inside a named network namespace.

A socket belongs to the namespace it was created in, for its whole life. So
we create it in a short-lived thread that first setns(2)s into the target:
network namespaces are per thread (task), the calling thread and the rest of
the process never change namespace, and unlike pyroute2's netns helper no
child process is forked (forking a threaded asyncio process is fragile) and a
missing namespace is an error, never silently created.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import threading

from netlink.errors import NetnsNotFoundError, XfrmError

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add` bind-mounts namespaces

_libc: ctypes.CDLL | None = None


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the calling thread; the one wrapper the package uses."""
    global _libc
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, nstype)
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def netns_path(netns: str) -> str:
    """``ip netns`` name -> /run/netns/NAME; absolute paths (/proc/PID/ns/net) pass."""
    if netns.startswith("/"):
        return netns
    if not netns or "/" in netns or netns in (".", ".."):
        raise NetnsNotFoundError(errno.ENOENT, f"invalid network namespace name {netns!r}")
    return os.path.join(NETNS_RUN_DIR, netns)


def enter(netns: str) -> None:
    """Move the calling thread into network namespace ``netns`` (a name under /run/netns
    or a path). Called while the process is still single-threaded, it moves the whole
    process: every socket and thread made afterwards lives there."""
    path = netns_path(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFoundError(errno.ENOENT, f"network namespace {netns!r} not found ({path})") from None
    try:
        setns(fd, CLONE_NEWNET)
    finally:
        os.close(fd)


def create_socket(family: int, type_: int, proto: int, netns: str | None = None) -> socket.socket:
    """``socket.socket(family, type_, proto)``, created inside ``netns`` if given."""
    if netns is None:
        return socket.socket(family, type_, proto)
    path = netns_path(netns)
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFoundError(errno.ENOENT, f"network namespace {netns!r} not found ({path})") from None
    result: list[socket.socket | BaseException] = []

    def worker() -> None:
        try:
            setns(nsfd, CLONE_NEWNET)
            result.append(socket.socket(family, type_, proto))
        except BaseException as exc:  # handed to the caller below
            result.append(exc)

    try:
        t = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(nsfd)
    out = result[0] if result else XfrmError("netns worker thread produced nothing")
    if isinstance(out, BaseException):
        if isinstance(out, OSError) and out.errno in (errno.EPERM, errno.EACCES) and not isinstance(out, XfrmError):
            raise PermissionError(out.errno, f"entering network namespace {netns!r} needs CAP_SYS_ADMIN") from None
        if isinstance(out, OSError) and out.errno == errno.EINVAL:
            raise NetnsNotFoundError(errno.EINVAL, f"{path} is not a network namespace") from None
        raise out
    return out
