"""Shared by the long-running commands (``server``, ``reflect``) and the clients (``ping``, ``owping``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any, Awaitable, Callable


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


def run_client(name: str, args: argparse.Namespace, session: Callable[[Any], Awaitable[Any]],
               before: Callable[[], str | None] | None = None) -> tuple[int, Any]:
    """Build the client's options from ``args`` and run ``session(options)``.

    ``before`` runs once the options are built: it returns an error message (exit 2) or
    None, and may print a banner. Returns (exit code, result): 2 for bad options, 1 for
    control-plane or socket errors (printed as ``xwamp NAME: ...``), 130 on ^C, else
    (0, result)."""
    from agent.commands.ping import options
    from agent.control.aio import ControlError
    from agent.keyring import KeyFileError

    try:
        opt = options(args)
    except (ValueError, OSError, KeyFileError) as e:
        print(f"xwamp {name}: {e}", file=sys.stderr)
        return 2, None
    err = before() if before is not None else None
    if err is not None:
        print(f"xwamp {name}: {err}", file=sys.stderr)
        return 2, None
    try:
        return 0, asyncio.run(session(opt))
    except (ControlError, OSError) as e:
        print(f"xwamp {name}: {e}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        return 130, None
