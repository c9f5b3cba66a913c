"""The agent's O/TWAMP servers (``[server]``): control listeners keyed by the binder and the
optional passphrase file, whose bound connections end with their SA."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any

from agent.daemon import config as cfg

if TYPE_CHECKING:
    from agent.daemon.supervisor import Daemon

log = logging.getLogger("xwamp.agent")


class ControlServers:
    """The O/TWAMP servers of ``[server]``: agent.control.aio listeners with agent.sessions.session
    handlers, keyed by the binder (IPsec modes) and the optional passphrase file."""

    def __init__(self, s: cfg.ServerSection, daemon: "Daemon") -> None:
        self.section = s
        self.daemon = daemon
        self.listeners: list[Any] = []
        # What agent.sessions.bound's bound reflector reports to (its "owner"): the runtime whose
        # tracker ends a connection's sessions when its SA dies, and recent connections.
        self.runtime = daemon.runtime
        self.connections: collections.deque = collections.deque(maxlen=256)
        self._ids = itertools.count(1)

    def _modes(self, twamp: bool) -> int:
        from agent.control import modes as md

        bits = 0
        for name in self.section.modes:
            sec, _, key = name.partition("+")
            bits |= int(md.by_name(sec).bit)
            if key:
                for b, k in md.key_modes(twamp).items():
                    if k.name == key:
                        bits |= b
        return md.offerable(bits, twamp)

    async def start(self) -> None:
        from agent.control import keyring
        from agent.control.aio import ControlListener, ListenerLimits
        from agent.control.authguard import AUTH_GUARD
        from agent.control.server import ServerConfig
        from agent.engine import timestamping as ts
        from agent.sessions import session

        s = self.section
        sources: list[Any] = []
        if self.daemon.rfc7717_keys is not None:  # first: it answers only for the RFC 7717 bit
            sources.append(self.daemon.rfc7717_keys)
        if self.runtime is not None:
            sources.append(self.runtime.keys)  # the reflectors read back the bindings it made
        if s.keyfile:
            sources.append(keyring.PassphraseFile(s.keyfile))
        ks = keyring.ChainedKeySource(*sources) if sources else None
        limits = ListenerLimits(max_connections=s.max_connections, max_per_client=s.max_connections_per_client,
                                max_sessions_per_client=s.max_sessions_per_client, idle_timeout=s.idle_timeout,
                                setup_timeout=s.setup_timeout, empty_test_timeout=s.empty_test_timeout,
                                max_per_prefix=s.max_connections_per_prefix, max_rate_per_client=s.max_rate_per_client)
        hosts = list(s.listen)
        twamp_handler: Any = session.TwampHandler
        if self.runtime is not None:
            from agent.sessions.bound_server import BoundReflector

            twamp_handler = lambda srv: BoundReflector(srv, self)  # noqa: E731 - follows its SA
        for twamp, port, enabled, handler in ((True, s.twamp_port, s.twamp, twamp_handler),
                                               (False, s.owamp_port, s.owamp, session.OwampHandler)):
            if not enabled:
                continue
            # Every [server] cap reaches the server (issue 11 row 4: max_rate was parsed, then dropped).
            conf = ServerConfig(modes=self._modes(twamp), max_sessions=s.max_sessions_per_connection,
                                max_packets=s.max_packets, max_padding=s.max_padding,
                                max_rate=s.max_rate, test_ports=s.test_ports, auth_guard=AUTH_GUARD,
                                test_iface=s.iface if ts.hardware_opt_in(s.iface) else None,
                                # plain unauth only when configured explicitly next to a keyfile (item 9)
                                allow_plain_unauth="unauth" in s.modes)
            lst = ControlListener(handler, twamp=twamp, hosts=hosts, port=port, config=conf, key_source=ks,
                                  limits=limits)
            try:
                await lst.start()
            except OSError:
                await self.stop()
                raise
            self.listeners.append(lst)
            log.info("server listening", extra={"protocol": "twamp" if twamp else "owamp",
                                                "addresses": ",".join(str(a[0]) for a in lst.addresses), "port": port})

    async def stop(self) -> None:
        for lst in self.listeners:
            with contextlib.suppress(Exception):
                await lst.close()
        self.listeners.clear()

    def abort(self, handler: Any, accept: int = 2) -> bool:
        """Server Stop-Sessions (Accept=2, internal error) and close for one connection,
        e.g. when its SA pair died (agent.sessions.bound_server.BoundReflector calls this)."""
        return any(lst.abort(handler, accept) for lst in self.listeners)

    def stats(self) -> dict[str, int]:
        from agent.control.authguard import AUTH_GUARD  # process-wide: both listeners share it
        from agent.sessions.session import POLICY

        out = {"connections_total": 0, "refused_total": 0}
        for lst in self.listeners:
            out["connections_total"] += lst.stats.get("accepted", 0)
            out["refused_total"] += lst.stats.get("refused", 0)
            for k in CAP_KEYS:  # xwamp_server_caps_total{cap=...} (docs/metrics.md)
                out[f"cap_{k}"] = out.get(f"cap_{k}", 0) + lst.stats.get(k, 0)
        for k, v in POLICY.items():
            out[f"cap_{k}"] = out.get(f"cap_{k}", 0) + v
        out["auth_failures_total"] = AUTH_GUARD.failures_total
        out["auth_rate_limited_total"] = AUTH_GUARD.limited_total
        return out


# Listener counters that say a cap acted (agent.control.aio.ControlListener.stats).
CAP_KEYS = ("evicted", "refused_prefix", "refused_rate", "refused_sessions", "refused_requests", "policed_rate_client")
