"""APIs other parts of the agent use: ControlListener.abort, the ``context`` property,
AsyncControlClient.connect(local_addr=...). Loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from typing import AsyncIterator

import pytest

from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlListener
from agent.control.client import ControlClient
from agent.control.keyring import HandshakeContext, StaticKeySource
from agent.control.server import ControlServer, ServerConfig
from agent.sessions.session import OwampHandler, PingOptions, TwampHandler, twamp_ping
from netlink.secret import Secret

KEYS = StaticKeySource({"alice": Secret(b"abort passphrase")})
CFG = ServerConfig(count=1024)
LO = ipaddress.ip_address("127.0.0.1")


class Recorder:
    def __init__(self, cls) -> None:
        self.cls, self.handlers = cls, []

    def __call__(self, srv):
        h = self.cls(srv)
        self.handlers.append(h)
        return h


async def _listener(factory, twamp: bool = True) -> ControlListener:
    lst = ControlListener(factory, twamp=twamp, hosts=["127.0.0.1"], port=0, config=CFG, key_source=KEYS)
    await lst.start()
    return lst


async def _until(cond, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _connected(cls, twamp: bool = True, **kw) -> AsyncIterator[tuple[ControlListener, AsyncControlClient,
                                                                             Recorder]]:
    """A listener serving ``cls`` handlers and one client connected to it; both closed after."""
    rec = Recorder(cls)
    lst = await _listener(rec, twamp)
    try:
        conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=twamp, timeout=5, **kw)
        try:
            yield lst, conn, rec
        finally:
            await conn.close()
    finally:
        await lst.close()


def _tw_request(conn: AsyncControlClient) -> m.RequestTWSession:
    return m.RequestTWSession(conn.local[0], conn.peer[0], 9, 0, padding_length=0, timeout=1 << 32)


# ------------------------------------------------------------------------------ context


def test_context_property_on_both_machines() -> None:
    srv = ControlServer(True, CFG, KEYS, local=(LO, 862), peer=(LO, 40000))
    cli = ControlClient(True, ["auth"], "alice", KEYS)
    assert cli.context is None  # nothing known before the greeting
    assert isinstance(srv.context, HandshakeContext) and srv.context.role == "server" and srv.context.mode == 0
    for _ in range(5):
        cli_evs = cli.receive_data(srv.data_to_send())
        srv.receive_data(cli.data_to_send())
        if any(isinstance(e, ev.Ready) for e in cli_evs):
            break
    assert cli.context is not None and cli.context.role == "client" and cli.context.mode == cli.mode == 2
    assert srv.context.mode == 2 and srv.context.peer == (LO, 40000) and srv.context.count == 1024
    with pytest.raises(AttributeError):
        cli.context = None  # type: ignore[misc]  # read-only


# ------------------------------------------------------------------------------ local_addr


def test_connect_local_addr_binds_control_and_test_traffic() -> None:
    async def main() -> None:
        rec = Recorder(TwampHandler)
        lst = await _listener(rec)
        try:
            port = lst.addresses[0][1]
            conn = await AsyncControlClient.connect("127.0.0.1", port, local_addr="127.0.0.2", timeout=5)
            try:
                assert str(conn.local[0]) == "127.0.0.2"
                assert str(rec.handlers[-1].srv.peer[0]) == "127.0.0.2"
            finally:
                await conn.close()
            opt = PingOptions("127.0.0.1", port, count=3, interval=0.01, wait=0.5, local_addr="127.0.0.2")
            res = await twamp_ping(opt)
            # The reflector answers its registered peer (the request's Sender Address) only,
            # so three replies mean the test packets came from the bound address too.
            assert res.summary.loss.received == 3
            assert str(rec.handlers[-1].srv.peer[0]) == "127.0.0.2"
        finally:
            await lst.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------ abort


def test_abort_in_test_state_sends_stop_sessions_and_closes_promptly() -> None:
    async def main() -> None:
        async with _connected(TwampHandler, wanted=("auth",), key_id="alice", key_source=KEYS) as (lst, conn, rec):
            assert (await conn.request_tw_session(_tw_request(conn))).ok
            assert await conn.start_sessions() == m.ACCEPT_OK
            handler = rec.handlers[-1]
            t0 = time.monotonic()
            assert lst.abort(handler) is True  # by handler; the ControlServer works too
            got = await conn._wait(ev.StopSessionsReceived, timeout=3)
            assert got.stop.accept == m.ACCEPT_INTERNAL_ERROR and got.stop.num_sessions == 1
            assert time.monotonic() - t0 < 1.0
            assert await asyncio.wait_for(conn.reader.read(), 3) == b""  # then the server closes
            assert handler.srv.closed and not handler.sessions  # reflection ended
            await _until(lambda: not lst._tasks)
            assert lst.abort(handler) is False  # no longer served

    asyncio.run(main())


def test_abort_before_tests_just_closes_with_accept_of_choice() -> None:
    async def main() -> None:
        async with _connected(TwampHandler) as (lst, conn, rec):
            srv = rec.handlers[-1].srv
            assert lst.abort(srv, m.ACCEPT_FAILURE)
            assert lst.abort(srv) is True  # a second call is harmless
            assert await asyncio.wait_for(conn.reader.read(), 3) == b""  # no Stop: nothing runs
            assert srv.closed

    asyncio.run(main())


def test_owamp_abort_reports_packets_sent_so_far() -> None:
    """A server-initiated OWAMP stop: the handler stops its sender and Stop-Sessions carries
    the Next Seqno of what it really sent (RFC 4656 §3.8), not 0 as a cancelled task would."""

    async def main() -> None:
        async with _connected(OwampHandler, twamp=False) as (lst, conn, rec):
            sid = m.make_sid(conn.local[0], 1)
            req = m.RequestSession(conn.peer[0], conn.local[0], 0, 9, sid=sid, conf_sender=True,
                                   conf_receiver=False, padding_length=0, timeout=1 << 32, num_packets=10_000,
                                   slots=(m.Slot.seconds(m.Slot.FIXED, 0.01),))
            assert (await conn.request_session(req)).ok
            assert await conn.start_sessions() == m.ACCEPT_OK
            await asyncio.sleep(0.3)
            assert lst.abort(rec.handlers[-1], m.ACCEPT_TEMPORARY_LIMIT)
            got = await conn._wait(ev.StopSessionsReceived, timeout=3)
            assert got.stop.accept == m.ACCEPT_TEMPORARY_LIMIT
            (d,) = got.stop.descriptions
            assert d.sid == sid and 5 <= d.next_seqno < 10_000

    asyncio.run(main())


def test_abort_waits_for_the_handler_answer() -> None:
    """An abort while the handler is answering is carried out once it answered: the
    reply is never cut in half, then the connection closes."""

    class Slow(TwampHandler):
        async def on_event(self, srv, e):
            if isinstance(e, ev.SessionRequested):
                await asyncio.sleep(0.2)
            await super().on_event(srv, e)

    async def main() -> None:
        async with _connected(Slow) as (lst, conn, rec):
            pending = asyncio.ensure_future(conn.request_tw_session(_tw_request(conn)))
            await _until(lambda: rec.handlers[-1].srv.awaiting == "accept")
            assert lst.abort(rec.handlers[-1])
            acc = await pending
            assert acc.ok  # the answer in progress went out whole
            assert await asyncio.wait_for(conn.reader.read(), 3) == b""

    asyncio.run(main())
