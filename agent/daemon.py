"""``xwamp agent``: one asyncio process that measures every tunnel and feeds Prometheus.

Pieces, all on one event loop:

* the **supervisor** (:class:`Daemon`): one :class:`SessionRunner` per measured peer —
  configured ``[[peers]]`` plus tunnels discovered in the SA table — restarted with
  backoff when they fail, diffed on SIGHUP so unchanged sessions keep running;
* the **SA/policy follower**: a dump of the kernel's SAs into a :class:`netlink.table.SATable`
  and of its policies into an :class:`agent.bound.PolicyMap`, both kept current by the
  same XFRM events and re-dumped every ``agent.sa_refresh_interval`` (kernel counters,
  lost events); discovery and the binder read them;
* the **binder runtime** (:class:`agent.bound.BinderRuntime`): a TunnelBinder (a control
  connection between a tunnel's *inner* addresses binds to its tunnel-mode SA pair,
  found through the outbound policy) and the rekey tracker: a rekey rebinds the bound
  sessions on the new pair, an SA deleted with no successor stops them (reason exported);
* the O/TWAMP **server** (agent.control.aio listeners with agent.session handlers);
* the **exporter** (exporters.prometheus.MetricsServer) over :class:`agent.metrics.MetricsState`.

Runners, the server and the SA source are pluggable (factories passed to Daemon), so the
supervisor is tested with fakes and the real control/test planes are wired in below.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from agent import config as cfg
from agent import sdnotify
from agent.metrics import MetricsState, SessionMetrics, Tunnel
from netlink.records import SA, IPAddress
from netlink.table import SATable

log = logging.getLogger("xwamp.agent")

STOP_TIMEOUT = 5.0  # per runner: long enough for Stop-Sessions, short of systemd's TimeoutStopSec
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
DISCOVERY_DEBOUNCE = 0.5  # a rekey is a burst of events: rediscover once
# Many sessions starting together (start-up, a big reload) are spread over up to this
# long, 5 ms apart on average: a thousand simultaneous control set-ups time out.
START_SPREAD_PER_SESSION, START_SPREAD_MAX = 0.005, 10.0


# ----------------------------------------------------------------------------- interfaces


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """What one runner measures. Equal specs across a reload = leave the runner alone."""

    key: str
    tunnel: Tunnel
    origin: str  # configured | discovered
    address: IPAddress
    local: IPAddress | None
    session: cfg.SessionTemplate


class SessionRunner(Protocol):
    """One measurement session towards one peer, as the supervisor drives it."""

    async def start(self) -> None:
        """Begin measuring (may return before the first packet); raise if it cannot."""

    async def wait(self) -> None:
        """Return (or raise) when the session ended by itself; the supervisor restarts it."""

    async def stop(self) -> None:
        """End cleanly (Stop-Sessions), release sockets. Idempotent."""

    def snapshot(self) -> dict[str, Any]:
        """Key-free status for logs."""


RunnerFactory = Callable[[SessionSpec, SessionMetrics], SessionRunner]


class Server(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def stats(self) -> dict[str, int]: ...


ServerFactory = Callable[[cfg.ServerSection], Server]


class SASource(Protocol):
    """Where the SA table comes from (the kernel through netlink, or a test's fake).
    ``events()`` yields SA and policy events; an optional ``dump_policies()`` (absent
    on fakes without policies) feeds the PolicyMap."""

    async def dump(self) -> list[SA]: ...

    def events(self) -> AsyncIterator[Any]: ...  # netlink.events.XfrmEvent


SA_GRACE = 5.0  # a bound SA deleted: wait this long for its successor before stopping the session


# ----------------------------------------------------------------------------- discovery


def _is_local_default(addr: IPAddress) -> bool:
    """True when ``addr`` is one of this host's (netns's) addresses: binding works only then."""
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.bind((str(addr), 0))
        return True
    except OSError:
        return False


def _within(addr: IPAddress, nets: tuple[Any, ...]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _selector_net(sa: SA) -> Any:
    sel = sa.selector
    try:
        return ipaddress.ip_network(f"{sel.daddr}/{sel.prefixlen_d}", strict=False)
    except ValueError:
        return None


def _inner_ends(policies: Any, o: SA, local: Callable[[IPAddress], bool]) -> tuple[IPAddress, IPAddress] | None:
    """For a tunnel-mode SA: the (local, remote) *inner* host addresses its outbound
    policy carries, when the selector names one host each side and the local one is
    ours. Traffic between the outer addresses does not go through the tunnel, so a
    tunnel is measured between these (the agents listen there)."""
    if policies is None or int(o.mode) != 1:  # XFRM_MODE_TUNNEL
        return None
    for p in policies.out_policies():
        s = p.selector
        full = 32 if s.saddr.version == 4 else 128
        if s.prefixlen_s != full or s.prefixlen_d != full:
            continue
        if not any(t.saddr == o.saddr and t.daddr == o.daddr and (not t.reqid or t.reqid == o.reqid)
                   for t in p.templates):
            continue
        if local(s.saddr) and not local(s.daddr):
            return s.saddr, s.daddr
    return None


def discover(table: SATable, d: cfg.DiscoverySection, is_local: Callable[[IPAddress], bool],
             policies: Any = None) -> list[SessionSpec]:
    """Tunnels to measure: each outbound/inbound SA pair whose local end is ours and whose
    remote end passes the filters. Keyed by (remote, reqid): stable across rekeys.
    Tunnel mode with a host-to-host policy: measured between the inner addresses."""
    if not d.enabled:
        return []
    local_cache: dict[IPAddress, bool] = {}

    def local(a: IPAddress) -> bool:
        if a not in local_cache:
            local_cache[a] = is_local(a)
        return local_cache[a]

    addrs = {sa.saddr for sa in table} | {sa.daddr for sa in table}
    mine = [a for a in addrs if local(a)]
    out: dict[str, SessionSpec] = {}
    for o, i in table.pairs(local=mine):
        if not local(o.saddr) or local(o.daddr):
            continue  # both ends here (a lab netns pair seen from one side) or neither
        remote = o.daddr
        if d.reqids and o.reqid not in d.reqids:
            continue
        if d.addresses and not _within(remote, d.addresses):
            continue
        if d.exclude and _within(remote, d.exclude):
            continue
        if d.selectors:
            net = _selector_net(o)
            if net is None or not any(net.version == s.version and net.overlaps(s) for s in d.selectors):
                continue
        key = f"sa:{remote}/{o.reqid}"
        inner = _inner_ends(policies, o, local)
        src, dst = inner if inner is not None else (o.saddr, remote)
        tunnel = Tunnel(name=f"{remote}/{o.reqid}", peer=str(dst), reqid=str(o.reqid), protocol=d.session.protocol)
        out[key] = SessionSpec(key, tunnel, "discovered", dst, src, d.session)
    return [out[k] for k in sorted(out)]


def configured(c: cfg.Config, policies: Any = None) -> list[SessionSpec]:
    """Configured peers; one carried by a tunnel-mode policy (given its ``source``) is
    labelled with the tunnel's reqid, so its session and SA series line up."""
    out = []
    for p in c.peers:
        reqid = ""
        if policies is not None and p.source is not None:
            o = policies.outer(p.source, p.address)
            reqid = str(o.reqid) if o is not None and o.reqid else ""
        out.append(SessionSpec(p.key, Tunnel(p.name, str(p.address), reqid, p.session.protocol), "configured",
                               p.address, p.source, p.session))
    return out


# ----------------------------------------------------------------------------- supervisor


class _Slot:
    """One supervised session: its spec, its runner task, and how it is doing."""

    def __init__(self, spec: SessionSpec, metrics: SessionMetrics) -> None:
        self.spec = spec
        self.metrics = metrics
        self.runner: SessionRunner | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False


class Daemon:
    def __init__(
        self,
        config: cfg.Config,
        config_path: str | None = None,
        *,
        runner_factory: RunnerFactory | None = None,
        server_factory: ServerFactory | None = None,
        sa_source: SASource | None = None,
        is_local: Callable[[IPAddress], bool] = _is_local_default,
        notify: Callable[..., bool] = sdnotify.notify,
        on_log_config: Callable[[cfg.AgentSection], None] | None = None,
        metrics: MetricsState | None = None,
        exporter: bool = True,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.table = SATable()
        self.policies: Any = None  # agent.bound.PolicyMap, with the binder
        self.runtime: Any = None  # agent.bound.BinderRuntime
        self.binder: Any = None
        self.metrics = metrics or MetricsState(config.exporter.buckets, config.exporter.ipdv_buckets)
        self._runner_factory = runner_factory
        self._server_factory = server_factory
        self._sa_source = sa_source
        self._is_local = is_local
        self._notify = notify
        self._on_log_config = on_log_config
        self._want_exporter = exporter
        self.slots: dict[str, _Slot] = {}
        self.server: Server | None = None
        self.exporter: Any = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._rediscover: asyncio.TimerHandle | None = None
        self._apply_lock = asyncio.Lock()  # reloads and rediscoveries must not interleave diffs
        self.ready = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig, fn in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                        (signal.SIGHUP, lambda: self._spawn(self.reload()))):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, fn)
        try:
            await self._start()
            self._notify("READY=1", f"STATUS={self.status()}")
            self.ready.set()
            log.info("agent ready", extra={"sessions": len(self.slots), "sas": len(self.table),
                                           "exporter": self._exporter_addr()})
            await self._stop.wait()
        finally:
            self._notify("STOPPING=1", "STATUS=stopping")
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info("agent stopped")
        return 0

    def request_stop(self) -> None:
        log.info("stop requested")
        self._stop.set()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            # A bug in a reload or rediscovery must be seen, and must not stop the agent.
            e = t.exception()
            log.error("background task failed", exc_info=(type(e), e, e.__traceback__))

    async def _start(self) -> None:
        self._setup_binder()
        if self._sa_source is None:
            self._sa_source = default_sa_source(self.config.agent.netns)
        if self._sa_source is not None:
            await self._load_policies()  # before the SAs: their discovery maps through policies
            try:
                self._load_table(await self._sa_source.dump())
            except Exception as e:  # EPERM, no XFRM, an undecodable record: measure what we can
                log.warning("cannot read the SA database: discovery and SA metrics off until it works",
                            extra={"error": str(e) or type(e).__name__})
            self._spawn(self._follow_sas())
            self._spawn(self._refresh_sas())
        if self._want_exporter and self.config.exporter.enabled:
            await self._start_exporter(self.config.exporter)
        if self.config.server.enabled:
            await self._start_server(self.config.server)
        await self._apply_sessions(self._desired(self.config))
        interval = sdnotify.watchdog_interval()
        if interval:
            self._spawn(self._watchdog(interval))

    async def _shutdown(self) -> None:
        if self._rediscover is not None:
            self._rediscover.cancel()
        # Sessions first (Stop-Sessions on live control connections), all at once.
        await asyncio.gather(*(self._stop_slot(k) for k in list(self.slots)), return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.stop(), STOP_TIMEOUT)
            self.server = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.runtime is not None:
            await self.runtime.close()
        if self.exporter is not None:
            await self.exporter.close()
            self.exporter = None

    async def _watchdog(self, interval: float) -> None:
        # The ping comes from the loop itself: a wedged loop stops it and systemd restarts us.
        while True:
            self._notify("WATCHDOG=1", f"STATUS={self.status()}")
            await asyncio.sleep(interval)

    def status(self) -> str:
        up = sum(1 for s in self.slots.values() if s.metrics.up)
        return f"{up}/{len(self.slots)} sessions up, {len(self.table)} SAs"

    # ---- exporter and server ----------------------------------------------------------

    async def _start_exporter(self, e: cfg.ExporterSection) -> None:
        from exporters.prometheus import MetricsServer

        srv = MetricsServer(self.snapshot, e.listen, e.port)
        await srv.start()  # a taken port is fatal at start-up (OSError), logged on reload
        self.exporter = srv
        log.info("exporter listening", extra={"address": e.listen, "port": srv.port})

    def _exporter_addr(self) -> str:
        return f"{self.exporter.host}:{self.exporter.port}" if self.exporter is not None else ""

    def snapshot(self) -> Any:
        srv = self.server
        if srv is not None:
            with contextlib.suppress(Exception):
                self.metrics.server.update(srv.stats())
        return self.metrics.snapshot()

    async def _start_server(self, s: cfg.ServerSection) -> None:
        factory = self._server_factory or (lambda sec: ControlServers(sec, self))
        srv = factory(s)
        try:
            await srv.start()
        except OSError as e:
            # The server is one feature among several: keep measuring, say why it is off.
            log.error("O/TWAMP server not started", extra={"error": str(e)})
            return
        self.server = srv

    def _setup_binder(self) -> None:
        from agent import bound

        # One table, one policy map, one runtime: the server, every client session and
        # discovery see the same (netlink-event-fed) view of the kernel.
        self.policies = bound.PolicyMap()
        self.runtime = bound.BinderRuntime(self.table, self.policies, grace=SA_GRACE)
        self.runtime.start()  # the ticker: grace periods end in a Stop
        self.binder = self.runtime.binder
        binder = self.binder
        self.metrics.refusal_sources.append(lambda: binder.refusals)

    # ---- SA table ---------------------------------------------------------------------

    def _load_table(self, sas: list[SA]) -> None:
        self.table.replace_all(sas)  # the same object: the binder holds it
        if self.runtime is not None:
            # Bound SAs that vanished between dumps (lost events) are treated as deleted.
            from netlink.events import EventKind, XfrmEvent

            self.runtime.on_event(XfrmEvent(EventKind.OVERFLOW))
        self._sas_changed()

    async def _load_policies(self) -> None:
        dump = getattr(self._sa_source, "dump_policies", None)
        if dump is None or self.policies is None:
            return
        try:
            pols = await dump()
        except Exception as e:
            log.warning("cannot read the IPsec policies: tunnel-mode binding off until it works",
                        extra={"error": str(e) or type(e).__name__})
            return
        self.policies.clear()
        for p in pols:
            self.policies.put(p)

    async def _follow_sas(self) -> None:
        assert self._sa_source is not None
        backoff = BACKOFF_MIN
        while True:
            try:
                async for ev in self._sa_source.events():
                    backoff = BACKOFF_MIN
                    if getattr(getattr(ev, "kind", None), "name", "") == "OVERFLOW":
                        await self._load_policies()
                        self._load_table(await self._sa_source.dump())  # events were lost: re-dump
                        continue
                    self.table.apply(ev)
                    if self.runtime is not None:
                        self.policies.apply(ev)
                        self.runtime.on_event(ev)  # after the table applied it (RekeyTracker's contract)
                    self._sas_changed()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("SA event stream failed, retrying", extra={"error": str(e), "retry_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _refresh_sas(self) -> None:
        assert self._sa_source is not None
        while True:
            await asyncio.sleep(self.config.agent.sa_refresh_interval)
            await self._load_policies()
            try:
                self._load_table(await self._sa_source.dump())
            except Exception as e:
                log.warning("SA re-dump failed", extra={"error": str(e) or type(e).__name__})

    def _sas_changed(self) -> None:
        """Schedule one fold of the table into SA metrics + rediscovery: a rekey or a
        start-up dump is a burst of events, and each fold walks the whole table."""
        if self._rediscover is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._rediscover = loop.call_later(DISCOVERY_DEBOUNCE, self._do_rediscover)

    def _do_rediscover(self) -> None:
        self._rediscover = None
        # Configured peers depend on the SAs too (a tunnel's reqid labels them): always
        # diff; unchanged sessions are left alone. Folds SA metrics too.
        self._spawn(self._apply_sessions(self._desired(self.config)))

    def _update_sa_metrics(self) -> None:
        by_remote: dict[IPAddress, list[SA]] = {}
        for sa in self.table:
            by_remote.setdefault(sa.daddr, []).append(sa)
            by_remote.setdefault(sa.saddr, []).append(sa)
        for key, slot in self.slots.items():
            spec = slot.spec
            remote, local = spec.address, spec.local
            if self.policies is not None and local is not None:
                o = self.policies.outer(local, remote)
                if o is not None:  # tunnel mode: the SAs run between the outer addresses
                    remote, local = o.peer, o.local
            sas = by_remote.get(remote, [])
            if spec.tunnel.reqid:
                reqid = int(spec.tunnel.reqid)
                sas = [sa for sa in sas if sa.reqid == reqid]
            outs = [sa for sa in sas if sa.daddr == remote and (local is None or sa.saddr == local)]
            ins = [sa for sa in sas if sa.saddr == remote and (local is None or sa.daddr == local)]
            if spec.origin == "configured" and outs:
                # A configured peer: the tunnel is the reqid of the newest outbound SA.
                best = max(outs, key=lambda s: (s.current.add_time, s.reqid))
                outs = [s for s in outs if s.reqid == best.reqid]
                ins = [s for s in ins if s.reqid == best.reqid]
            if not outs and not ins and key not in self.metrics.tunnels:
                continue
            t = self.metrics.tunnel_sas(key, spec.tunnel)
            t.update("out", outs, _newest(outs))
            t.update("in", ins, _newest(ins))
            slot.metrics.rekeys = t.rekeys
            slot.metrics.sa_bound = t.bound

    # ---- sessions ---------------------------------------------------------------------

    def _desired(self, c: cfg.Config) -> list[SessionSpec]:
        specs = configured(c, self.policies)
        taken = {s.address for s in specs}
        specs += [s for s in discover(self.table, c.discovery, self._is_local, self.policies)
                  if s.address not in taken]
        return specs

    async def _apply_sessions(self, specs: list[SessionSpec]) -> None:
        async with self._apply_lock:
            await self._apply_sessions_locked(specs)

    async def _apply_sessions_locked(self, specs: list[SessionSpec]) -> None:
        """Diff: stop sessions gone or changed, start new or changed ones, leave the rest."""
        want = {s.key: s for s in specs}
        doomed = [k for k, slot in self.slots.items() if want.get(k) != slot.spec]
        if doomed:
            await asyncio.gather(*(self._stop_slot(k) for k in doomed), return_exceptions=True)
        new = [spec for k, spec in want.items() if k not in self.slots]
        spread = min(START_SPREAD_MAX, START_SPREAD_PER_SESSION * len(new)) if len(new) > 1 else 0.0
        for spec in new:
            self._start_slot(spec, random.uniform(0, spread))
        if doomed or len(want) != len(self.slots):
            log.debug("sessions applied", extra={"sessions": len(self.slots)})
        self._update_sa_metrics()

    def _start_slot(self, spec: SessionSpec, delay: float = 0.0) -> None:
        m = self.metrics.session(spec.key, spec.tunnel, spec.origin)
        slot = _Slot(spec, m)
        self.slots[spec.key] = slot
        slot.task = asyncio.ensure_future(self._supervise(slot, delay))
        log.info("session added", extra={"session": spec.key, "peer": str(spec.address), "origin": spec.origin})

    async def _stop_slot(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        slot.stopping = True
        runner = slot.runner
        if runner is not None:
            try:
                await asyncio.wait_for(runner.stop(), STOP_TIMEOUT)
            except Exception as e:
                log.warning("session did not stop cleanly", extra={"session": key, "error": str(e) or type(e).__name__})
        if slot.task is not None:
            slot.task.cancel()
            await asyncio.gather(slot.task, return_exceptions=True)
        slot.metrics.up = False
        self.metrics.drop_session(key)
        self.metrics.drop_tunnel(key)
        log.info("session removed", extra={"session": key})

    def _make_runner(self, spec: SessionSpec, m: SessionMetrics) -> SessionRunner:
        if self._runner_factory is not None:
            return self._runner_factory(spec, m)
        return CycleRunner(spec, m, self._client_key_source(spec), self.runtime)

    async def _supervise(self, slot: _Slot, delay: float = 0.0) -> None:
        backoff = BACKOFF_MIN
        key = slot.spec.key
        if delay:
            await asyncio.sleep(delay)
        while not slot.stopping:
            runner = self._make_runner(slot.spec, slot.metrics)
            slot.runner = runner
            started = time.monotonic()
            try:
                await runner.start()
                await runner.wait()
                reason = "ended"
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = str(e) or type(e).__name__  # key-free: BinderRefusal/ControlError promise it
            finally:
                slot.metrics.up = False
            if slot.stopping:
                break
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.stop(), STOP_TIMEOUT)
            slot.metrics.restarts += 1
            if time.monotonic() - started > 4 * BACKOFF_MAX:
                backoff = BACKOFF_MIN  # it ran fine for a while: this is a fresh failure
            delay = backoff * (0.5 + random.random())  # jitter: many sessions must not retry in lockstep
            log.warning("session ended, restarting", extra={"session": key, "reason": reason,
                                                            "retry_s": round(delay, 1)})
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _client_key_source(self, spec: SessionSpec) -> Any:
        from agent import keyring

        sources: list[Any] = []
        if self.runtime is not None:
            sources.append(self.runtime.keys)  # shared: the runner reads back the binding it made
        if spec.session.keyfile:
            sources.append(keyring.PassphraseFile(spec.session.keyfile))
        return keyring.ChainedKeySource(*sources) if sources else None

    # ---- reload -----------------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP: re-read the file; on error keep running with the old configuration."""
        if self.config_path is None:
            return False
        try:
            new = cfg.load(self.config_path)
        except cfg.ConfigError as e:
            log.error("reload failed, keeping the running configuration", extra={"error": str(e)})
            self.metrics.reloaded(False)
            return False
        old, self.config = self.config, new
        if new.agent.netns != old.agent.netns:
            log.warning("agent.netns changes need a restart; ignored until then")
        if (new.agent.log_format, new.agent.log_level) != (old.agent.log_format, old.agent.log_level) \
                and self._on_log_config is not None:
            self._on_log_config(new.agent)
        if new.exporter.buckets != old.exporter.buckets or new.exporter.ipdv_buckets != old.exporter.ipdv_buckets:
            # New buckets are a new histogram layout: sessions restart with fresh metrics.
            self.metrics.buckets, self.metrics.ipdv_buckets = new.exporter.buckets, new.exporter.ipdv_buckets
            await asyncio.gather(*(self._stop_slot(k) for k in list(self.slots)), return_exceptions=True)
        if self._want_exporter and (new.exporter.enabled, new.exporter.listen, new.exporter.port) != \
                (old.exporter.enabled, old.exporter.listen, old.exporter.port):
            if self.exporter is not None:
                await self.exporter.close()
                self.exporter = None
            if new.exporter.enabled:
                try:
                    await self._start_exporter(new.exporter)
                except OSError as e:
                    log.error("exporter not restarted", extra={"error": str(e)})
        if new.server != old.server:
            if self.server is not None:
                await self.server.stop()
                self.server = None
            if new.server.enabled:
                await self._start_server(new.server)
        await self._apply_sessions(self._desired(new))
        self.metrics.reloaded(True)
        log.info("configuration reloaded", extra={"sessions": len(self.slots)})
        self._notify(f"STATUS={self.status()}")
        return True


def _newest(sas: list[SA]) -> SA | None:
    return max(sas, key=lambda s: s.current.add_time, default=None)


# ----------------------------------------------------------------------------- real planes


REBIND_TIMEOUT = 10.0  # after a rekey, the peer may need a moment to see the new pair (wire-format §5)
_bind_ids = itertools.count(1)


class SessionStopped(Exception):
    """The session's SA binding ended it (reason first: ``sa_deleted: spi...``); key-free."""


class CycleRunner:
    """A configured or discovered peer, measured in cycles of ``count`` packets.

    TWAMP: one control connection at a time; each cycle is Request-TW-Session,
    Start-Sessions, the packets, Stop-Sessions; then its records go to the metrics.
    :meth:`stop` interrupts the packets and still sends Stop-Sessions before closing.
    In an IPsec-derived mode the connection is bound to its SA pair (``runtime``, an
    agent.bound.BinderRuntime): on a rekey the cycle is cut short, Stop-Sessions
    (Accept=0) sent and the connection re-established on the new pair (``rebinds``);
    when the SA dies with no successor the runner ends with :class:`SessionStopped`.
    OWAMP: each cycle is one agent.session.owping conversation (both directions + fetch)."""

    def __init__(self, spec: SessionSpec, metrics: SessionMetrics, key_source: Any, runtime: Any = None) -> None:
        self.spec = spec
        self.metrics = metrics
        self.key_source = key_source
        self.runtime = runtime
        self._task: asyncio.Task | None = None
        self._sender: asyncio.Future | None = None
        self._stopping = False
        self._cycles = 0
        self.stop_sent = False
        self.binding: Any = None  # the live agent.binder.Binding, for snapshots (repr is key-free)

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._twamp() if self.spec.session.protocol == "twamp" else self._owamp())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        self._stopping = True
        if self._task is None or self._task.done():
            return
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()  # the cycle then sends Stop-Sessions and closes
            done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT / 2)
            if done:
                return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        return {"peer": str(self.spec.address), "cycles": self._cycles, "up": self.metrics.up,
                "binding": repr(self.binding) if self.binding is not None else ""}

    async def _twamp(self) -> None:
        from agent.binder import Rebind

        from agent.control.aio import GreetingRefused
        from agent.ipsec_keys import BinderRefusal

        rebind_deadline: float | None = None
        while not self._stopping:
            try:
                action = await self._twamp_connection()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if rebind_deadline is not None and time.monotonic() < rebind_deadline and not self._stopping:
                    log.info("re-establishing on the new SA pair failed, retrying",
                             extra={"session": self.spec.key, "error": str(e) or type(e).__name__})
                    await asyncio.sleep(0.5)
                    continue
                # Our binder refused the peer's greeting or the pair: not a network failure.
                if isinstance(e, (GreetingRefused, BinderRefusal)):
                    self.metrics.stop_binder_refused += 1
                raise
            rebind_deadline = None
            if action is None:
                return
            if isinstance(action, Rebind):
                self.metrics.rebinds += 1
                log.info("rekey: rebinding the session on the new SA pair",
                         extra={"session": self.spec.key, "spi_c2s": f"0x{action.new_c2s.spi:08x}",
                                "spi_s2c": f"0x{action.new_s2c.spi:08x}", "reqid": action.old.reqid})
                rebind_deadline = time.monotonic() + REBIND_TIMEOUT
                continue
            self.metrics.stop_sa_deleted += 1
            raise SessionStopped(f"{action.reason.value}: spi_c2s=0x{action.old.c2s.spi:08x} "
                                 f"spi_s2c=0x{action.old.s2c.spi:08x} reqid={action.old.reqid}")

    async def _twamp_connection(self) -> Any:
        """One control connection: cycles until stopped (None) or the binder acts (Rebind/Stop)."""
        from agent.binder import IPSEC_BITS, Stop
        from agent.control import messages as m
        from agent.control.aio import AsyncControlClient, ControlError, family_of
        from agent.test import udp
        from agent.test.packets import Proto, security_from_mode, symmetric_padding

        t = self.spec.session
        host = str(self.spec.address)
        # From the configured source / the tunnel's inner address: the connection (and so
        # the test packets, sent from its local address) must take the measured path.
        local = str(self.spec.local) if self.spec.local is not None else None
        conn = await AsyncControlClient.connect(host, t.effective_port, twamp=True, wanted=t.modes,
                                                key_id=t.user or "", key_source=self.key_source,
                                                family=family_of(host), local_addr=local)
        loop = asyncio.get_running_loop()
        action: asyncio.Future = loop.create_future()
        key: tuple[str, str, int] | None = None
        try:
            mode = conn.cli.mode
            if self.runtime is not None and mode & IPSEC_BITS:
                assert conn.greeting is not None
                self.binding = self.runtime.binding_for("client", conn.local, conn.peer, mode, conn.greeting.unused)

                def on_action(a: Any) -> None:
                    if not action.done():
                        action.set_result(a)
                    if self._sender is not None and not self._sender.done():
                        self._sender.cancel()  # the cycle ends now; Stop-Sessions follows

                key = ("daemon", self.spec.key, next(_bind_ids))
                self.runtime.bind(key, self.binding, on_action)  # may decide at once (SA already gone)
                self.metrics.sa_keyed = True
                log.info("session bound to its SA pair",
                         extra={"session": self.spec.key, "spi_c2s": f"0x{self.binding.c2s.spi:08x}",
                                "spi_s2c": f"0x{self.binding.s2c.spi:08x}", "reqid": self.binding.reqid,
                                "mode": f"0x{mode:08x}"})
            local_ip, peer_ip = conn.local[0], conn.peer[0]
            pad = t.padding if t.padding is not None else symmetric_padding(Proto.TWAMP, security_from_mode(mode))
            while not self._stopping and not action.done():
                sock = udp.open_udp_socket((str(local_ip), 0), dscp=t.dscp or None)
                try:
                    req = m.RequestTWSession(local_ip, peer_ip, sock.getsockname()[1], 0, padding_length=pad,
                                             timeout=int(t.timeout * (1 << 32)), type_p=m.typep_from_dscp(t.dscp))
                    acc = await conn.request_tw_session(req)
                    if not acc.ok:
                        raise ControlError(f"session refused: {m.ACCEPT_NAMES[acc.accept.accept]}")
                    if await conn.start_sessions() != m.ACCEPT_OK:
                        raise ControlError("Start-Sessions refused")
                    self.metrics.up = True
                    self._sender = asyncio.ensure_future(udp.run_twamp_sender(
                        ("", 0), (str(peer_ip), acc.accept.port), mode, acc.test_keys, count=t.count,
                        interval=t.interval, schedule=t.schedule, padding=pad, timeout=t.timeout, sock=sock,
                        hardware=False))
                    if action.done():  # decided while we set up: no packets on a dead pair
                        self._sender.cancel()
                    records = None
                    try:
                        records = await self._sender
                    except asyncio.CancelledError:
                        if not self._stopping and not action.done():
                            raise  # we were cancelled, not just the packets
                    # wire-format §5: Accept=0 before re-establishing on a new pair; after a
                    # Stop the tunnel is gone and the message may never arrive (Accept=2 says why).
                    outcome = action.result() if action.done() else None
                    if isinstance(outcome, Stop):
                        with contextlib.suppress(ControlError, OSError, asyncio.TimeoutError):
                            await asyncio.wait_for(conn.stop_sessions(1, m.ACCEPT_INTERNAL_ERROR), 2.0)
                    else:
                        await conn.stop_sessions(1)
                    self.stop_sent = True
                    if records is None:
                        break
                    self.metrics.observe_cycle(records, reflector_stateful=True)
                    self._cycles += 1
                finally:
                    self._sender = None
                    sock.close()
            return action.result() if action.done() else None
        finally:
            if key is not None:
                self.runtime.release(key)
            self.binding = None
            self.metrics.up = False
            self.metrics.sa_keyed = False
            await conn.close()

    async def _owamp(self) -> None:
        from agent.session import PingOptions, owping

        t = self.spec.session
        while not self._stopping:
            opt = PingOptions(host=str(self.spec.address), port=t.effective_port, count=t.count, interval=t.interval,
                              schedule=t.schedule, padding=t.padding, dscp=t.dscp, wanted=t.modes,
                              key_id=t.user or "", key_source=self.key_source, wait=t.timeout)
            ow = await owping(opt)
            self.metrics.up = True
            self.metrics.observe_owamp(ow.forward_records, ow.forward.sent, ow.reverse_records, ow.reverse.sent)
            self._cycles += 1


class ControlServers:
    """The O/TWAMP servers of ``[server]``: agent.control.aio listeners with agent.session
    handlers, keyed by the binder (IPsec modes) and the optional passphrase file."""

    def __init__(self, s: cfg.ServerSection, daemon: Daemon) -> None:
        self.section = s
        self.daemon = daemon
        self.listeners: list[Any] = []
        # What agent.bound's bound reflector reports to (its "owner"): the runtime whose
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
                    if k.name == key or (key == "rfc7717" and k.name.startswith("rfc7717")):
                        bits |= b
        return md.offerable(bits, twamp)

    async def start(self) -> None:
        from agent import keyring, session
        from agent.control.aio import ControlListener, ListenerLimits
        from agent.control.server import ServerConfig

        s = self.section
        sources: list[Any] = []
        if self.runtime is not None:
            sources.append(self.runtime.keys)  # the reflectors read back the bindings it made
        if s.keyfile:
            sources.append(keyring.PassphraseFile(s.keyfile))
        ks = keyring.ChainedKeySource(*sources) if sources else None
        limits = ListenerLimits(max_connections=s.max_connections, max_per_client=s.max_connections_per_client,
                                max_sessions_per_client=s.max_sessions_per_client, idle_timeout=s.idle_timeout)
        hosts = list(s.listen)
        twamp_handler: Any = session.TwampHandler
        if self.runtime is not None:
            from agent.bound import BoundReflector

            twamp_handler = lambda srv: BoundReflector(srv, self)  # noqa: E731 - follows its SA
        for twamp, port, enabled, handler in ((True, s.twamp_port, s.twamp, twamp_handler),
                                               (False, s.owamp_port, s.owamp, session.OwampHandler)):
            if not enabled:
                continue
            conf = ServerConfig(modes=self._modes(twamp), max_sessions=s.max_sessions_per_connection,
                                max_packets=s.max_packets, max_padding=s.max_padding)
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
        e.g. when its SA pair died (agent.bound.BoundReflector calls this)."""
        return any(lst.abort(handler, accept) for lst in self.listeners)

    def stats(self) -> dict[str, int]:
        out = {"connections_total": 0, "refused_total": 0}
        for lst in self.listeners:
            out["connections_total"] += lst.stats.get("accepted", 0)
            out["refused_total"] += lst.stats.get("refused", 0)
        return out


def default_sa_source(netns: str | None) -> SASource | None:
    """The kernel's SAs via netlink.client (dumps) and netlink.monitor (events)."""
    from netlink import client as nlc

    return _NetlinkSource(nlc, netns)


class _NetlinkSource:
    def __init__(self, nlc: Any, netns: str | None) -> None:
        self._nlc = nlc
        self._netns = netns

    def _dump(self) -> list[SA]:
        with self._nlc.XfrmClient(self._netns) as client:
            return list(client.dump_sas())

    async def dump(self) -> list[SA]:
        # A big dump decodes for a while: keep the loop (test packets) free meanwhile.
        return await asyncio.get_running_loop().run_in_executor(None, self._dump)

    def _dump_policies(self) -> list[Any]:
        with self._nlc.XfrmClient(self._netns) as client:
            return list(client.dump_policies())

    async def dump_policies(self) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self._dump_policies)

    async def events(self) -> AsyncIterator[Any]:
        from netlink import monitor

        async for ev in monitor.watch(self._netns):
            yield ev


def enter_netns(netns: str | None) -> None:
    """Move the whole process into a named network namespace (before any socket exists)."""
    if not netns:
        return
    from netlink.netns import netns_path

    fd = os.open(netns_path(netns), os.O_RDONLY)
    try:
        os.setns(fd, os.CLONE_NEWNET)
    finally:
        os.close(fd)


async def serve(config: cfg.Config, config_path: str | None, **kw: Any) -> int:
    return await Daemon(config, config_path, **kw).run()
