"""An asyncio event loop on a thread inside a named network namespace."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from netlink.netns import setns

T = TypeVar("T")


class NetnsLoop:
    """An asyncio event loop on a thread inside network namespace ``netns`` (a name under
    /run/netns or a path). setns(2) of CLONE_NEWNET changes only the calling thread, so
    the rest of the process stays where it was; every socket the loop's code creates
    belongs to ``netns``."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"netns-loop-{netns}", daemon=True)

    def start(self) -> "NetnsLoop":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        path = self.netns if self.netns.startswith("/") else os.path.join("/run/netns", self.netns)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
            self.loop = asyncio.new_event_loop()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the namespace's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> "asyncio.Future[T]":
        """Start ``coro`` on the loop; returns a concurrent.futures.Future."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[return-value]

    def close(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "NetnsLoop":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
