"""Follow XFRM changes: multicast notifications as XfrmEvents, and a table kept current.

* :class:`XfrmMonitor` — a socket subscribed to XFRMNLGRP_SA, _POLICY and
  _EXPIRE. Blocking (``events(timeout)``), pollable (``fileno()`` +
  ``read_nowait()``) or asyncio (``async for ev in monitor``).
* :func:`watch` — ``async for event in watch(netns)``.
* :class:`TableFollower` — an SATable mirrored from the kernel: subscribe
  first, then dump, then apply what arrived meanwhile and everything after.

Notifications can be lost when the socket buffer overflows (the kernel then
fails our next recv with ENOBUFS); the monitor turns that into an OVERFLOW
event and the follower re-dumps.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

from netlink import constants as C
from netlink.client import XfrmClient, open_xfrm_socket
from netlink.decode import decode_messages
from netlink.errors import XfrmDecodeError, kernel_error
from netlink.events import EventKind, XfrmEvent
from netlink.records import SA
from netlink.table import SATable

log = logging.getLogger(__name__)

DEFAULT_GROUPS = (C.XFRMNLGRP_SA, C.XFRMNLGRP_POLICY, C.XFRMNLGRP_EXPIRE)


class XfrmMonitor:
    """A NETLINK_XFRM socket subscribed to notification groups."""

    def __init__(
        self,
        netns: str | None = None,
        groups: Iterable[int] = DEFAULT_GROUPS,
        rcvbuf: int = 8 << 20,
    ) -> None:
        self.netns = netns
        self._sock = open_xfrm_socket(netns, rcvbuf=rcvbuf)
        try:
            for group in groups:
                self._sock.setsockopt(C.SOL_NETLINK, C.NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            self._sock.close()
            raise kernel_error(exc.errno or errno.EIO, "subscribing to XFRM notifications") from None
        self._sock.setblocking(False)
        self._pending: deque[XfrmEvent] = deque()
        self.overruns = 0  # ENOBUFS seen: notifications the kernel could not queue for us

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "XfrmMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_nowait(self) -> list[XfrmEvent]:
        """Every event already received; [] if none. Never blocks."""
        out = list(self._pending)
        self._pending.clear()
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    log.warning("XFRM notifications were lost (socket overflow); consumers must re-dump")
                    self._discard_queued()
                    out.append(XfrmEvent(EventKind.OVERFLOW))
                    return out
                raise kernel_error(exc.errno or errno.EIO, "reading XFRM notifications") from None
            try:
                messages = decode_messages(data)
            except XfrmDecodeError as exc:
                # One bad datagram must not stop monitoring; the state may now be off.
                log.error("undecodable XFRM notification dropped: %s", exc)
                out.append(XfrmEvent(EventKind.OVERFLOW))
                continue
            for m in messages:
                if m.event is not None:
                    out.append(m.event)

    def _discard_queued(self, limit: int = 4096) -> None:
        """After an overrun: drop what is still queued. Those notifications are older
        than the re-dump the consumer is about to make, and some of their successors
        were lost: applying a queued NEW_SA after the dump would resurrect an SA whose
        DEL_SA was dropped. ENOBUFS met meanwhile are the same overrun (counted)."""
        for _ in range(limit):  # bounded: a busy kernel must not keep us here
            try:
                self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    return
                self.overruns += 1

    def events(self, timeout: float | None = None) -> list[XfrmEvent]:
        """Wait up to ``timeout`` seconds (None: forever) for events; [] on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self.read_nowait()
            if got:
                return got
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return []
            select.select([self._sock], [], [], left)

    async def __aiter__(self) -> AsyncIterator[XfrmEvent]:
        """Events as they arrive, on the running loop (fd reader, no thread)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self._sock.fileno()  # kept: after close() fileno() is -1
        loop.add_reader(fd, ready.set)
        try:
            while True:
                for ev in self.read_nowait():
                    yield ev
                ready.clear()
                # Re-check after clear(): data may have arrived in between.
                for ev in self.read_nowait():
                    yield ev
                await ready.wait()
        finally:
            if not loop.is_closed():
                loop.remove_reader(fd)


async def watch(netns: str | None = None, groups: Iterable[int] = DEFAULT_GROUPS) -> AsyncIterator[XfrmEvent]:
    """``async for event in watch("vrf-red"): ...`` — closes its socket when the loop ends."""
    mon = XfrmMonitor(netns, groups)
    events = mon.__aiter__()
    try:
        async for ev in events:
            yield ev
    finally:
        await events.aclose()  # unregister the fd reader before the socket closes
        mon.close()


class TableFollower:
    """An SATable that follows the kernel.

        follower = TableFollower(netns)
        follower.start()            # subscribe, dump, catch up
        follower.poll()             # apply what arrived (non-blocking), or
        await follower.run()        # follow forever on the running loop

    ``on_event(event)`` is called after each event is applied (and with an
    OVERFLOW event after each re-dump).

    Steady state costs what is measured, not the table: events keep the table
    current, :meth:`refresh` re-reads the counters of chosen SAs with targeted
    XFRM_MSG_GETSA, and a full re-dump happens only after an overrun (``resyncs``)
    or when the owner asks (:meth:`resync`, e.g. on a slow schedule).
    """

    def __init__(self, netns: str | None = None, on_event: Callable[[XfrmEvent], None] | None = None,
                 rcvbuf: int = 8 << 20) -> None:
        self.netns = netns
        self.rcvbuf = rcvbuf  # notification socket buffer: smaller overruns sooner (tests)
        self.table = SATable()
        self.on_event = on_event
        self._monitor: XfrmMonitor | None = None
        self.resyncs = 0  # re-dumps forced by an overrun
        self.redumps = 0  # every full dump, the first one included

    def start(self) -> SATable:
        # Subscribe *before* dumping: a change racing with the dump is then
        # both (maybe) in the dump and in the queue, and re-applying queued
        # events on top of the dump converges (put/remove are idempotent).
        self._monitor = XfrmMonitor(self.netns, rcvbuf=self.rcvbuf)
        self._resync()
        self.poll()
        return self.table

    def _resync(self) -> None:
        with XfrmClient(self.netns) as client:
            sas = client.dump_sas()
        self.table.replace_all(sas)  # same object: holders of .table stay current
        self.redumps += 1

    def resync(self) -> None:
        """A full re-dump now (the owner's slow schedule); blocking."""
        self._resync()

    def refresh(self, sas: Iterable[SA]) -> int:
        """Re-read the kernel's counters of ``sas`` (targeted GETSA, blocking) into the
        table; returns how many were refreshed. An SA the kernel no longer holds is
        left to its DEL_SA event (or the overrun re-dump): removing it here could race
        with a re-added SA of the same identity. Call it from the thread that applies
        events (the table is not locked); asyncio owners fetch with
        XfrmClient.get_sas in a worker and put the results on the loop."""
        sas = list(sas)
        if not sas:
            return 0
        with XfrmClient(self.netns) as client:
            fresh = client.get_sas(sas)
        n = 0
        for key, sa in fresh.items():
            # Only SAs still held: a DEL_SA applied meanwhile must not be undone.
            if sa is not None and key in self.table:
                self.table.put(sa)
                n += 1
        return n

    def _apply(self, events: list[XfrmEvent]) -> int:
        for ev in events:
            if ev.kind is EventKind.OVERFLOW:
                self.resyncs += 1
                self._resync()
            else:
                self.table.apply(ev)
            if self.on_event is not None:
                self.on_event(ev)
        return len(events)

    def poll(self) -> int:
        """Apply every event received so far; returns how many."""
        if self._monitor is None:
            raise RuntimeError("TableFollower.start() first")
        return self._apply(self._monitor.read_nowait())

    def wait(self, timeout: float | None = None) -> int:
        """Block up to ``timeout`` for events, apply them; returns how many."""
        if self._monitor is None:
            raise RuntimeError("TableFollower.start() first")
        return self._apply(self._monitor.events(timeout))

    async def run(self) -> None:
        """Follow on the running loop until cancelled (dumps run in a worker thread)."""
        loop = asyncio.get_running_loop()
        if self._monitor is None:
            self._monitor = XfrmMonitor(self.netns, rcvbuf=self.rcvbuf)
            await loop.run_in_executor(None, self._resync)
        async for ev in self._monitor:
            if ev.kind is EventKind.OVERFLOW:
                self.resyncs += 1
                await loop.run_in_executor(None, self._resync)
            else:
                self.table.apply(ev)
            if self.on_event is not None:
                self.on_event(ev)

    @property
    def overruns(self) -> int:
        """ENOBUFS seen on the notification socket (several may make one resync)."""
        return self._monitor.overruns if self._monitor is not None else self._overruns_closed

    _overruns_closed = 0

    def close(self) -> None:
        if self._monitor is not None:
            self._overruns_closed = self._monitor.overruns
            self._monitor.close()
            self._monitor = None

    def __enter__(self) -> "TableFollower":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
