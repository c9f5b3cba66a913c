"""``xwamp agent``: one asyncio process that measures every tunnel and feeds Prometheus.

Pieces, all on one event loop:

* the **supervisor** (:class:`Daemon`): one :class:`SessionRunner` per measured peer —
  configured ``[[peers]]`` plus tunnels discovered in the SA table — restarted with
  backoff when they fail, diffed on SIGHUP so unchanged sessions keep running;
* the **SA/policy follower**: a dump of the kernel's SAs into a :class:`netlink.table.SATable`
  and of its policies into an :class:`agent.sessions.bound.PolicyMap`, both kept current by the
  same XFRM events; the counters of the *measured* SAs are re-read every
  ``agent.sa_refresh_interval`` with targeted GETSA (cost follows what is measured, not
  the table), and the whole table is re-dumped only after an event overrun (ENOBUFS) or
  every ``agent.sa_redump_interval``; discovery and the binder read them;
* the **binder runtime** (:class:`agent.sessions.bound.BinderRuntime`): a TunnelBinder (a control
  connection between a tunnel's *inner* addresses binds to its tunnel-mode SA pair,
  found through the outbound policy) and the rekey tracker: a rekey rebinds the bound
  sessions on the new pair, an SA deleted with no successor stops them (reason exported);
* the O/TWAMP **server** (agent.control.aio listeners with agent.sessions.session handlers);
* the **exporter** (exporters.prometheus.MetricsServer) over :class:`agent.sessions.metrics.MetricsState`.

Runners, the server and the SA source are pluggable (factories passed to Daemon), so the
supervisor is tested with fakes and the real control/test planes are wired in below.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from agent.daemon import config as cfg
from agent.daemon import sdnotify
from agent.daemon.cycles import STOP_TIMEOUT, CycleRunner
from agent.daemon.discovery import (
    SessionSpec,
    configured,
    discover,
    is_local_default,
    newest_sa,
)
from agent.daemon.servers import ControlServers
from agent.sessions.metrics import MetricsState, SessionMetrics, default_clock, default_stamps
from netlink.records import SA, IPAddress
from netlink.table import SATable

log = logging.getLogger("xwamp.agent")

BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
DISCOVERY_DEBOUNCE = 0.5  # a rekey is a burst of events: rediscover once
# Many sessions starting together (start-up, a big reload) are spread over up to this
# long, 5 ms apart on average: a thousand simultaneous control set-ups time out.
START_SPREAD_PER_SESSION, START_SPREAD_MAX = 0.005, 10.0


# ----------------------------------------------------------------------------- interfaces


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

    # Optional: ``async get_sas(sas) -> {key_id: SA | None}`` re-reads only those SAs
    # (targeted GETSA). Sources without it are re-dumped every sa_refresh_interval.


SA_GRACE = 5.0  # a bound SA deleted: wait this long for its successor before stopping the session


# ----------------------------------------------------------------------------- supervisor


class _Slot:
    """One supervised session: its spec, its runner task, and how it is doing."""

    def __init__(self, spec: SessionSpec, metrics: SessionMetrics) -> None:
        self.spec = spec
        self.metrics = metrics
        self.runner: SessionRunner | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.crashes = 0  # times its supervisor loop itself died (Daemon._supervisor_done)


class Daemon:
    def __init__(
        self,
        config: cfg.Config,
        config_path: str | None = None,
        *,
        runner_factory: RunnerFactory | None = None,
        server_factory: ServerFactory | None = None,
        sa_source: SASource | None = None,
        is_local: Callable[[IPAddress], bool] = is_local_default,
        notify: Callable[..., bool] = sdnotify.notify,
        on_log_config: Callable[[cfg.AgentSection], None] | None = None,
        metrics: MetricsState | None = None,
        exporter: bool = True,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.table = SATable()
        self.policies: Any = None  # agent.sessions.bound.PolicyMap, with the binder
        self.runtime: Any = None  # agent.sessions.bound.BinderRuntime
        self._rfc7717: tuple[Any, Any] | None = None  # (agent section, RFC7717KeySource)
        self.binder: Any = None
        # The process-wide stamp sources and the clock's estimate: without them the exporter showed
        # xwamp_timestamps_total as zeros and no xwamp_clock_* at all (docs/metrics.md promises both).
        self.metrics = metrics or MetricsState(config.exporter.buckets, config.exporter.ipdv_buckets,
                                               stamps=default_stamps(), clock=default_clock())
        self._runner_factory = runner_factory
        self._server_factory = server_factory
        self._sa_source = sa_source
        self._is_local = is_local
        self._notify = notify
        self._on_log_config = on_log_config
        self._want_exporter = exporter
        self.slots: dict[str, _Slot] = {}
        self.server: Server | None = None
        self.reflector: Any = None  # agent.daemon.stamp_reflector.StampReflectors ([reflector])
        self.exporter: Any = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._rediscover: asyncio.TimerHandle | None = None
        self._last_redump = time.monotonic()
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
            self.metrics.task_failed("background")
            log.error("background task failed", exc_info=(type(e), e, e.__traceback__))

    async def _start(self) -> None:
        self._setup_binder()
        if self._sa_source is None:
            self._sa_source = default_sa_source(self.config.agent.netns)
        if self._sa_source is not None:
            await self._load_policies()  # before the SAs: their discovery maps through policies
            try:
                self._load_table(await self._sa_source.dump(), "start")
            except Exception as e:  # EPERM, no XFRM, an undecodable record: measure what we can
                log.warning("cannot read the SA database: discovery and SA metrics off until it works",
                            extra={"error": str(e) or type(e).__name__})
            self._spawn(self._follow_sas())
            self._spawn(self._refresh_sas())
        if self._want_exporter and self.config.exporter.enabled:
            await self._start_exporter(self.config.exporter)
        if self.config.server.enabled:
            await self._start_server(self.config.server)
        if self.config.reflector.enabled:
            await self._start_reflector(self.config.reflector)
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
        if self.reflector is not None:
            await self.reflector.stop()
            self.reflector = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.runtime is not None:
            await self.runtime.close()
        if self.exporter is not None:
            await self.exporter.close()
            self.exporter = None
        self._restore_nics()

    def _restore_nics(self, keep: frozenset[str] = frozenset()) -> None:
        """Put back the NIC stamping configs the ``iface`` keys switched on (unless ptp4l has
        taken them over since): the NIC is left as we found it. ``keep``: still named (a reload)."""
        from agent.engine import timestamping as ts

        with contextlib.suppress(Exception):
            for iface in ts.restore_nic_configs(keep):
                log.info("NIC hardware stamping put back", extra={"iface": iface})

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
        from exporters.prometheus import MetricsServer, tls_context

        t = e.tls
        ctx = tls_context(t.cert_file, t.key_file, t.client_ca_file, t.client_auth_type) if t is not None else None
        srv = MetricsServer(self.snapshot, e.listen, e.port, ssl_context=ctx)
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
        if self.reflector is not None:
            self.metrics.reflector = self.reflector.counters()
        return self.metrics.snapshot()

    async def _start_reflector(self, r: cfg.ReflectorSection) -> None:
        from agent.daemon.stamp_reflector import StampReflectors

        refl = StampReflectors(r, self.runtime)
        try:
            await refl.start()
        except (OSError, ValueError) as e:
            # One feature among several, as the server: keep measuring, say why it is off.
            log.error("STAMP reflector not started", extra={"error": str(e)})
            return
        self.reflector = refl

    async def _start_server(self, s: cfg.ServerSection) -> bool:
        factory = self._server_factory or (lambda sec: ControlServers(sec, self))
        try:
            srv = factory(s)
            await srv.start()
        except Exception as e:  # a taken port (OSError), a key file broken since it was checked
            # The server is one feature among several: keep measuring, say why it is off.
            log.error("O/TWAMP server not started", extra={"error": str(e) or type(e).__name__})
            return False
        self.server = srv
        return True

    def _setup_binder(self) -> None:
        from agent.sessions import bound

        # One table, one policy map, one runtime: the server, every client session and
        # discovery see the same (netlink-event-fed) view of the kernel.
        self.policies = bound.PolicyMap()
        self.runtime = bound.BinderRuntime(self.table, self.policies, grace=SA_GRACE)
        self.runtime.start()  # the ticker: grace periods end in a Stop
        self.binder = self.runtime.binder
        binder = self.binder
        self.metrics.refusal_sources.append(lambda: binder.refusals)

    # ---- SA table ---------------------------------------------------------------------

    def _load_table(self, sas: list[SA], reason: str) -> None:
        """A full dump replaces the table; ``reason`` (start, overrun, schedule) is counted."""
        gc.unfreeze()  # what the last freeze kept out of collection may be garbage now
        self.table.replace_all(sas)  # the same object: the binder holds it
        # The table's records live until the next full dump: keep them (and whatever else
        # lives this long) out of the cyclic collector's full passes, which otherwise walk
        # every SA of a 50k table again and again for an agent that allocates per packet.
        # Records hold no cycles: refcounting still frees them when events replace them.
        gc.collect()
        gc.freeze()
        self._last_redump = time.monotonic()
        st = self.metrics.sa_table
        st[f"redumps_{reason}"] = st.get(f"redumps_{reason}", 0) + 1
        st["size"] = len(self.table)
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
                        # Events were lost (ENOBUFS): the only time the steady state re-dumps.
                        self.metrics.sa_table["overruns"] += 1
                        await self._load_policies()
                        self._load_table(await self._sa_source.dump(), "overrun")
                        continue
                    self.table.apply(ev)
                    self.metrics.sa_table["size"] = len(self.table)
                    if self.runtime is not None:
                        self.policies.apply(ev)
                        self.runtime.on_event(ev)  # after the table applied it (RekeyTracker's contract)
                    self._sas_changed()
                # The kernel's stream does not end by itself: following it again beats going
                # silently blind to rekeys and deletes.
                log.warning("SA event stream ended, following it again", extra={"retry_s": backoff})
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("SA event stream failed, retrying", extra={"error": str(e), "retry_s": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _refresh_sas(self) -> None:
        """Every sa_refresh_interval: the counters of the measured SAs (targeted GETSA);
        a full re-dump only every sa_redump_interval (events keep the table otherwise)."""
        assert self._sa_source is not None
        get_sas = getattr(self._sa_source, "get_sas", None)
        while True:
            await asyncio.sleep(self.config.agent.sa_refresh_interval)
            due = time.monotonic() - self._last_redump >= self.config.agent.sa_redump_interval
            try:
                if get_sas is not None and not due:
                    await self._refresh_measured(get_sas)
                    continue
                await self._load_policies()
                self._load_table(await self._sa_source.dump(), "schedule")
            except Exception as e:
                log.warning("SA refresh failed", extra={"error": str(e) or type(e).__name__})

    async def _refresh_measured(self, get_sas: Callable[[list[SA]], Awaitable[dict[Any, SA | None]]]) -> None:
        sas = [sa for slot in self.slots.values() for group in self._tunnel_sas(slot.spec) for sa in group]
        if not sas:
            return
        fresh = await get_sas(sas)
        self.metrics.sa_table["lookups"] += len(sas)
        for key, sa in fresh.items():
            # An SA gone from the kernel is left to its DEL_SA event (or the overrun
            # re-dump); one deleted meanwhile on the loop must not come back.
            if sa is not None and key in self.table:
                self.table.put(sa)
        self._update_sa_metrics()

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

    def _tunnel_sas(self, spec: SessionSpec) -> tuple[list[SA], list[SA]]:
        """(outbound, inbound) SAs of the tunnel ``spec`` measures, through the table's
        indexes: the cost follows the tunnel's SAs, not the table."""
        remote, local = spec.address, spec.local
        if self.policies is not None and local is not None:
            o = self.policies.outer(local, remote)
            if o is not None:  # tunnel mode: the SAs run between the outer addresses
                remote, local = o.peer, o.local
        sas = self.table.touching(remote)
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
        return outs, ins

    def _update_sa_metrics(self) -> None:
        for key, slot in self.slots.items():
            outs, ins = self._tunnel_sas(slot.spec)
            if not outs and not ins and key not in self.metrics.tunnels:
                continue
            t = self.metrics.tunnel_sas(key, slot.spec.tunnel)
            t.update("out", outs, newest_sa(outs))
            t.update("in", ins, newest_sa(ins))
            slot.metrics.rekeys = t.rekeys
            slot.metrics.sa_bound = t.bound

    # ---- sessions ---------------------------------------------------------------------

    def _desired(self, c: cfg.Config) -> list[SessionSpec]:
        specs = configured(c, self.policies)
        # A configured peer replaces the discovered session of the same protocol to that address
        # (a configured STAMP peer leaves the discovered TWAMP session of its tunnel running).
        taken = {(s.address, s.session.protocol) for s in specs}
        specs += [s for s in discover(self.table, c.discovery, self._is_local, self.policies)
                  if (s.address, s.session.protocol) not in taken]
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
        self._supervise_slot(slot, delay)
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

    def _supervise_slot(self, slot: _Slot, delay: float = 0.0) -> None:
        slot.task = asyncio.ensure_future(self._supervise(slot, delay))
        slot.task.add_done_callback(lambda t, slot=slot: self._supervisor_done(slot, t))

    def _supervisor_done(self, slot: _Slot, t: asyncio.Task) -> None:
        """A session's supervisor loop only ends when the session is removed: any other end
        (a bug, an unforeseen error) is logged, counted, and supervision starts again, with
        backoff, so one bad peer never silently stops being measured."""
        if t.cancelled() or slot.stopping or self.slots.get(slot.spec.key) is not slot:
            return
        e = t.exception()
        slot.crashes += 1
        slot.metrics.up = False
        slot.metrics.restarts += 1
        self.metrics.task_failed("session")
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(slot.crashes, 16))
        log.error("session supervisor ended unexpectedly, restarting it",
                  extra={"session": slot.spec.key, "error": (str(e) or type(e).__name__) if e else "returned",
                         "retry_s": round(delay, 1)},
                  exc_info=(type(e), e, e.__traceback__) if e is not None else None)
        self._supervise_slot(slot, delay)

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
            started, cycles = time.monotonic(), slot.metrics.cycles
            runner: SessionRunner | None = None
            try:
                # Inside the try: making a runner reads the peer's key file, which an operator
                # may have broken since the config was checked (KeyFileError): a restart too.
                runner = self._make_runner(slot.spec, slot.metrics)
                slot.runner = runner
                await runner.start()
                await runner.wait()
                reason = "ended"
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = str(e) or type(e).__name__  # key-free: BinderRefusal/ControlError/KeyFileError promise it
            finally:
                slot.metrics.up = False
            if slot.stopping:
                break
            if runner is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(runner.stop(), STOP_TIMEOUT)
            slot.metrics.restarts += 1
            if slot.metrics.cycles > cycles or time.monotonic() - started > 4 * BACKOFF_MAX:
                # The peer answered (a cycle completed) or it ran fine for a while: it came
                # back, and this is a fresh failure, retried soon rather than after the old backoff.
                backoff = BACKOFF_MIN
            delay = backoff * (0.5 + random.random())  # jitter: many sessions must not retry in lockstep
            log.warning("session ended, restarting", extra={"session": key, "reason": reason,
                                                            "retry_s": round(delay, 1)})
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)

    @property
    def rfc7717_keys(self) -> Any:
        """agent.binder.rfc7717.RFC7717KeySource over agent.ike_keys, or None (kept across
        reloads while [agent]'s IKE settings are unchanged)."""
        a = self.config.agent
        if not a.rfc7717_on:
            return None
        if self._rfc7717 is None or self._rfc7717[0] != (a.ike_keys, a.rfc7717_kdf):
            from agent.binder.keysource import FileIKEKeySource
            from agent.binder.rfc7717 import RFC7717KeySource

            self._rfc7717 = ((a.ike_keys, a.rfc7717_kdf),
                             RFC7717KeySource(FileIKEKeySource(a.ike_keys), a.rfc7717_kdf))  # type: ignore[arg-type]
        return self._rfc7717[1]

    def _client_key_source(self, spec: SessionSpec) -> Any:
        from agent.control import keyring

        sources: list[Any] = []
        if self.rfc7717_keys is not None:  # RFC 7717 first; it answers only for its own bit
            sources.append(self.rfc7717_keys)
        if self.runtime is not None:
            sources.append(self.runtime.keys)  # shared: the runner reads back the binding it made
        if spec.session.keyfile and spec.session.protocol != "stamp":  # STAMP's keyfile is an HMAC key
            sources.append(keyring.PassphraseFile(spec.session.keyfile))
        return keyring.ChainedKeySource(*sources) if sources else None

    # ---- reload -----------------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP: re-read the file; on error keep running with the old configuration.

        Validation is what ``xwamp agent --check`` does, key files loaded included: a reload
        it refuses changes nothing (configuration, server, sessions) and sets
        xwamp_config_last_reload_successful to 0."""
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
        ok = True
        if new.server != old.server:
            if self.server is not None:
                await self.server.stop()
                self.server = None
            if new.server.enabled and not await self._start_server(new.server):
                # Validation passed but the new server would not start (its port is taken):
                # serve with the previous settings rather than not at all; the reload failed.
                ok = False
                if old.server.enabled and await self._start_server(old.server):
                    log.warning("previous O/TWAMP server restored")
        await self._apply_sessions(self._desired(new))
        if new.reflector != old.reflector:
            if self.reflector is not None:
                await self.reflector.stop()
                self.reflector = None
            if new.reflector.enabled:
                await self._start_reflector(new.reflector)
        # A NIC no key names any more is put back now, not at shutdown (what uses it has restarted).
        self._restore_nics(keep=new.ifaces() | (old.ifaces() if not ok else frozenset()))
        self.metrics.reloaded(ok)
        log.info("configuration reloaded", extra={"sessions": len(self.slots)})
        self._notify(f"STATUS={self.status()}")
        return ok


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

    def _get_sas(self, sas: list[SA]) -> dict[Any, SA | None]:
        with self._nlc.XfrmClient(self._netns) as client:
            return client.get_sas(sas)

    async def get_sas(self, sas: list[SA]) -> dict[Any, SA | None]:
        """Targeted GETSA for the measured SAs only (netlink.client.XfrmClient.get_sas)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._get_sas, sas)

    async def events(self) -> AsyncIterator[Any]:
        from netlink import monitor

        async for ev in monitor.watch(self._netns):
            yield ev


def enter_netns(netns: str | None) -> None:
    """Move the whole process into a named network namespace (before any socket exists).
    Through netlink.netns.setns: os.setns exists only from Python 3.12 on."""
    if netns:
        from netlink.netns import enter

        enter(netns)


async def serve(config: cfg.Config, config_path: str | None, **kw: Any) -> int:
    return await Daemon(config, config_path, **kw).run()
