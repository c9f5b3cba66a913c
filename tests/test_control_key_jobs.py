"""PBKDF2 (RFC 4656 §3.1) leaves the event loop: the sans-IO machines hand it out as a
KeyNeeded event (defer_keys=True) and the asyncio adapters run it in a worker thread,
so a slow derivation for one client never delays another client's handshake."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from agent.control import events as ev
from agent.control import keyring
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlListener
from agent.control.client import ControlClient
from agent.control.keyring import Pbkdf2Job, StaticKeySource
from agent.control.server import ControlServer, ServerConfig
from agent.sessions.session import TwampHandler
from netlink.secret import Secret

LO = ipaddress.IPv4Address("127.0.0.1")
KEYS = StaticKeySource({"slow": Secret(b"slow passphrase"), "fast": Secret(b"fast passphrase")})


def _pump_deferred(a, b) -> list[ev.Event]:
    """Like a real adapter: KeyNeeded jobs are run (here inline) and answered via key_ready()."""
    out: list[ev.Event] = []
    for _ in range(20):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                for e in dst.receive_data(data):
                    if isinstance(e, ev.KeyNeeded):
                        out.append(e)
                        out.extend(dst.key_ready(e.job()))
                    else:
                        out.append(e)
        if not moved:
            break
    return out


@pytest.mark.parametrize("mode", ["auth", "enc", "mixed"])
def test_deferred_handshake_completes_and_matches_inline(mode: str) -> None:
    srv = ControlServer(True, ServerConfig(count=1024), KEYS, local=(LO, 862), peer=(LO, 4000), defer_keys=True)
    cli = ControlClient(True, [mode], "fast", KEYS, defer_keys=True)
    evs = _pump_deferred(srv, cli)
    jobs = [e for e in evs if isinstance(e, ev.KeyNeeded)]
    assert len(jobs) == 2  # one PBKDF2 per side
    assert all(isinstance(j.job, Pbkdf2Job) and "passphrase" not in repr(j) for j in jobs)
    assert any(isinstance(e, ev.Ready) for e in evs) and srv.state == "request"
    cli.request_tw_session(m.RequestTWSession(LO, LO, 5000, 0))
    assert [type(e) for e in _pump_deferred(cli, srv)] == [ev.SessionRequested]


def test_input_during_the_derivation_is_buffered() -> None:
    srv = ControlServer(True, ServerConfig(count=1024), KEYS, local=(LO, 862), peer=(LO, 4000), defer_keys=True)
    cli = ControlClient(True, ["auth"], "fast", KEYS)  # inline on the client side
    cli.receive_data(srv.data_to_send())
    setup = cli.data_to_send()
    (need,) = srv.receive_data(setup)
    assert isinstance(need, ev.KeyNeeded) and srv.state == "wait-key"
    # the client pipelines nothing before Server-Start, but a hostile one may: it must wait
    assert srv.receive_data(b"\0" * 16) == [] and srv.state == "wait-key"
    evs = srv.key_ready(need.job())
    assert isinstance(evs[0], ev.SetupComplete)


def test_failed_derivation_is_refused_not_raised() -> None:
    srv = ControlServer(True, ServerConfig(count=1024), KEYS, local=(LO, 862), peer=(LO, 4000), defer_keys=True)
    cli = ControlClient(True, ["auth"], "fast", KEYS)
    cli.receive_data(srv.data_to_send())
    (need,) = srv.receive_data(cli.data_to_send())
    evs = srv.key_ready(None, MemoryError())
    assert isinstance(evs[0], ev.SetupRejected) and evs[0].accept == m.ACCEPT_INTERNAL_ERROR and srv.closed
    assert need is not None


def test_wrong_passphrase_after_deferred_derivation() -> None:
    bad = StaticKeySource({"fast": Secret(b"not the passphrase")})
    srv = ControlServer(True, ServerConfig(count=1024), KEYS, local=(LO, 862), peer=(LO, 4000), defer_keys=True)
    cli = ControlClient(True, ["auth"], "fast", bad)
    evs = _pump_deferred(srv, cli)
    assert any(isinstance(e, ev.SetupRejected) and e.accept == m.ACCEPT_FAILURE for e in evs)


def test_slow_derivation_does_not_delay_another_clients_handshake(monkeypatch) -> None:
    real = keyring.pbkdf2_key

    def slow_for_one_passphrase(pw: Secret, salt: bytes, count: int) -> Secret:
        if pw.reveal() == b"slow passphrase":
            time.sleep(0.8)  # stands in for a huge Count; like cryptography's PBKDF2 it frees the GIL
        return real(pw, salt, count)

    monkeypatch.setattr(keyring, "pbkdf2_key", slow_for_one_passphrase)

    async def main() -> None:
        lst = ControlListener(TwampHandler, twamp=True, hosts=["127.0.0.1"], port=0,
                              config=ServerConfig(count=1024), key_source=KEYS)
        await lst.start()
        port = lst.addresses[0][1]
        try:
            slow = asyncio.create_task(AsyncControlClient.connect("127.0.0.1", port, wanted=["auth"], key_id="slow",
                                                                  key_source=KEYS))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            fast = await AsyncControlClient.connect("127.0.0.1", port, wanted=["auth"], key_id="fast",
                                                    key_source=KEYS)
            took = time.monotonic() - t0
            assert took < 0.6 and not slow.done()  # the slow client's PBKDF2 is still running
            acc = await fast.request_tw_session(m.RequestTWSession(LO, LO, 5000, 0))
            assert acc.ok
            await fast.close()
            conn = await asyncio.wait_for(slow, 5)  # and it completes too
            assert conn.cli.state == "ready"
            await conn.close()
        finally:
            await lst.close()

    asyncio.run(main())
