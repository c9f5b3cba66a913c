"""Shared by the long-running commands (``server``, ``reflect``) and the clients (``ping``, ``owping``)."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from agent.sessions.bound import BinderRuntime, XfrmFollower

EXIT_GREETING_REFUSED = 3  # a client's IPsec check refused the server's greeting (SA pair not ours)

# One line per binder refusal a client meets at the greeting (wire-format §6).
GREETING_REFUSALS = {
    "no_sa": "the server announced an SA our kernel does not hold",
    "no_reverse_sa": "our kernel holds no SA back to the server for the announced pair",
    "sa_mismatch": "the announced SA pair does not connect us to the server",
    "bad_announcement": "the server's SA announcement is malformed",
    "unsupported_prf": "the server announced a PRF we do not accept",
    "bad_mode": "the chosen mode does not go with this key mode",
    "keys_redacted": "our kernel hides the SA keys (run as root / with CAP_NET_ADMIN)",
}


def ipsec_modes(security: Sequence[str]) -> tuple[str, ...]:
    """``security+key`` names of the IPsec-bound modes (wire-format §1): ALT1/ALT2 need
    a keyed security mode, IPSEC_BOUND also goes with unauth."""
    return tuple(f"{s}+{k}" for k in ("ipsec-bound", "ipsec-alt1", "ipsec-alt2") for s in security
                 if s != "unauth" or k == "ipsec-bound")


def is_ipsec_mode(name: str) -> bool:
    return name.partition("+")[2].startswith("ipsec-")


def enter_netns(netns: str) -> None:
    """Move this (still single-threaded) process into network namespace ``netns``: every
    socket and every thread made afterwards (asyncio's executor too) lives there."""
    from netlink.netns import enter  # one setns(2) wrapper for the package

    enter(netns)


def netns_entered(command: str, netns: str | None) -> bool:
    """``--netns``: enter it before any thread or socket exists; False (the error printed
    as ``xwamp COMMAND: ...``) if it cannot be entered. True without one."""
    if not netns:
        return True
    try:
        enter_netns(netns)
    except OSError as e:
        print(f"xwamp {command}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def iface_usable(command: str, iface: str | None) -> bool:
    """``--iface``: it must name an interface of the (entered) netns; else one line
    ``xwamp COMMAND: --iface X: no interface named 'X'`` and False (exit 2). Whether the NIC
    stamps in hardware is not an error: software stamps where it cannot, as logged."""
    if not iface:
        return True
    import socket

    try:
        socket.if_nametoindex(iface)
    except OSError:
        print(f"xwamp {command}: --iface {iface}: no interface named {iface!r}", file=sys.stderr)
        return False
    return True


async def open_follower(netns: str | None) -> "XfrmFollower":
    """The live SA table and policies (netlink), kept current. Tests replace this."""
    from agent.sessions.bound import XfrmFollower

    fol = XfrmFollower(netns)
    await fol.start()
    return fol


async def ipsec_runtime(netns: str | None, *, allow_alt2: bool = False,
                        fallback: Sequence[object] = ()) -> tuple["XfrmFollower", "BinderRuntime"]:
    """The key binder over the live SA table (agent.sessions.bound, read-only use): its
    ``key_source`` serves the IPsec-bound modes, ``fallback`` sources the passphrase ones."""
    from agent.binder.announce import BinderConfig
    from agent.sessions.bound import BinderRuntime

    fol = await open_follower(netns)
    try:
        rt = BinderRuntime.following(fol, config=BinderConfig(allow_alt2=allow_alt2), fallback=fallback)
    except BaseException:
        await fol.close()
        raise
    rt.start()  # grace periods end in a Stop even without XFRM events
    return fol, rt


async def wait_until_stopped(duration: float) -> None:
    """Return on SIGINT/SIGTERM, or after ``duration`` seconds when that is > 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if duration > 0:
        try:
            await asyncio.wait_for(stop.wait(), duration)
        except asyncio.TimeoutError:
            pass
    else:
        await stop.wait()
