"""The server side of the key binder at run time: a TWAMP server whose IPsec-bound connections
stop reflecting (reason ``sa_deleted``) when their SA dies (docs/wire-format.md §5)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable
from dataclasses import dataclass

from agent.binder import announce as bd
from agent.binder.announce import (
    Rebind,
)
from agent.binder.keys import BinderRefusal
from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import (
    ControlListener,
    ListenerLimits,
)
from agent.control.server import ControlServer, ServerConfig
from agent.sessions.bound import Action, BinderRuntime, spis
from agent.sessions.session import TwampHandler

log = logging.getLogger("xwamp.bound")


# ----------------------------------------------------------------------------- server


@dataclass
class ServerConnection:
    """What a bound server connection did (results; no key material)."""

    peer: str
    mode: int = 0
    spi_c2s: int | None = None
    spi_s2c: int | None = None
    reqid: int | None = None
    sessions: int = 0
    client_stop: int | None = None  # Accept of the client's Stop-Sessions (0 = normal, §5 rebind)
    end: str | None = None  # "closed", "rebind" (the client reconnects), "sa_deleted"
    detail: str = ""


class BoundReflector:
    """session.TwampHandler plus the binding's fate: on Stop the reflector sessions end.

    ``owner`` provides ``runtime`` (BinderRuntime), ``connections`` (a list or bounded
    deque the connection's :class:`ServerConnection` is appended to) and ``_ids``."""

    def __init__(self, srv: ControlServer, owner: "BoundTwampServer") -> None:
        self.inner = TwampHandler(srv)
        self.owner = owner
        self.key: Hashable | None = None
        self.stopped = False
        self.rec = ServerConnection(str(srv.peer[0]) if srv.peer else "?")
        owner.connections.append(self.rec)

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SetupComplete):
            self.rec.mode = e.mode
            if e.mode & bd.IPSEC_BITS:
                rt = self.owner.runtime
                try:  # made by the greeting's announcement; kept until the connection closes
                    b = rt.binding_for("server", srv.local, srv.peer, e.mode)
                except BinderRefusal as err:
                    self.stopped = True
                    self.rec.end, self.rec.detail = err.reason.value, err.detail
                    return
                self.rec.spi_c2s, self.rec.spi_s2c, self.rec.reqid = b.c2s.spi, b.s2c.spi, b.reqid
                self.key = ("server", next(self.owner._ids))
                rt.bind(self.key, b, self._on_action)
            return
        if isinstance(e, ev.SessionRequested):
            if self.stopped:  # the SA this connection is keyed from is gone
                srv.accept_session(m.ACCEPT_FAILURE)
                return
            self.rec.sessions += 1
        elif isinstance(e, ev.StopRequested):
            self.rec.client_stop = e.stop.accept
        await self.inner.on_event(srv, e)

    def _on_action(self, a: Action) -> None:
        self.key = None
        if isinstance(a, Rebind):
            # wire-format §5: the client re-establishes on the new pair; this connection
            # keeps reflecting until the client's Stop-Sessions and close.
            self.rec.end, self.rec.detail = "rebind", repr(a)
            return
        self.stopped = True
        self.rec.end, self.rec.detail = a.reason.value, f"{spis(a.old)}"
        log.info("server: stopping sessions of %s: %s (%s)", self.rec.peer, a.reason.value, spis(a.old))
        # Server Stop-Sessions (Accept=2) and close through the listener when the owner
        # can (RFC 5357 §3.8); else just end the test sessions: the client sees its own Stop.
        abort = getattr(self.owner, "abort", None)
        if abort is None or not abort(self, m.ACCEPT_INTERNAL_ERROR):
            self.inner.close()

    def close(self) -> None:
        if self.key is not None:
            self.owner.runtime.release(self.key)
            self.key = None
        if self.rec.end is None:
            self.rec.end = "closed"
        self.inner.close()


class BoundTwampServer:
    """A TWAMP server keyed by the binder; IPsec-bound connections follow their SA."""

    def __init__(self, runtime: BinderRuntime, host: str, port: int = 0, *, modes: int | None = None,
                 key_source: object | None = None, limits: ListenerLimits = ListenerLimits(),
                 count: int = 1024) -> None:
        self.runtime = runtime
        if modes is None:
            modes = 1 | 2 | 4 | int(bd.Modes.IPSEC_BOUND | bd.Modes.IPSEC_ALT1)
            if runtime.binder.config.allow_alt2:
                modes |= int(bd.Modes.IPSEC_ALT2)
        self.connections: list[ServerConnection] = []
        self._ids = itertools.count(1)
        self.listener = ControlListener(lambda srv: BoundReflector(srv, self), twamp=True, hosts=[host], port=port,
                                        config=ServerConfig(modes=modes, count=count),
                                        key_source=key_source if key_source is not None else runtime.key_source,
                                        limits=limits)

    async def start(self) -> None:
        await self.listener.start()

    @property
    def port(self) -> int:
        return int(self.listener.addresses[0][1])

    async def close(self) -> None:
        await self.listener.close()

    def abort(self, handler: object, accept: int = m.ACCEPT_INTERNAL_ERROR) -> bool:
        return self.listener.abort(handler, accept)  # type: ignore[arg-type]
