"""IPsec-bound modes from the command line, on the host: ``xwamp server --ipsec`` and
``xwamp ping/owping --mode X+ipsec-*`` over loopback, with in-memory SA tables standing
in for each side's kernel (the netlink follower is replaced; everything else is live).
Server 127.0.0.2, client 127.0.0.1: one SA each way between them (no policy needed)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import threading
import time

import pytest

from agent import cli
from agent.binder.announce import BinderConfig, Modes
from agent.commands import _runtime
from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlListener, GreetingRefused
from agent.control.server import ServerConfig
from agent.sessions.bound import BinderRuntime, XfrmFollower
from agent.sessions.session import SaBoundHandler, TwampHandler
from netlink.events import EventKind, XfrmEvent
from netlink.fake import make_sa

CLIENT, SERVER = "127.0.0.1", "127.0.0.2"
SPI_CS, SPI_SC = 0xA0B00001, 0xB0A00001
IPSEC_CFG = ServerConfig(count=1024, modes=1 | 2 | 4 | int(Modes.IPSEC_BOUND))


def sa_pair(spi_cs: int = SPI_CS, spi_sc: int = SPI_SC, reqid: int = 7):
    return (make_sa(CLIENT, SERVER, spi=spi_cs, reqid=reqid, enc_key=os.urandom(16), auth_key=os.urandom(32)),
            make_sa(SERVER, CLIENT, spi=spi_sc, reqid=reqid, enc_key=os.urandom(16), auth_key=os.urandom(32)))


class Kernels:
    """Hands out one fake SA table per open_follower() call, in order (server first)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queue: list[list] = []
        self.opened: list[XfrmFollower] = []

        async def fake(netns: str | None) -> XfrmFollower:
            fol = XfrmFollower(sas=self.queue.pop(0))
            self.opened.append(fol)
            return fol

        monkeypatch.setattr(_runtime, "open_follower", fake)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((SERVER, 0))
        return s.getsockname()[1]


def _serve(argv: list[str]) -> tuple[threading.Thread, list[int]]:
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(cli.main(argv)), daemon=True)
    t.start()
    return t, rc


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((SERVER, port), 0.2):
                return
        except OSError:
            assert time.monotonic() < end, "server did not come up"
            time.sleep(0.05)


def test_cli_ipsec_modes_end_to_end_and_mismatch(monkeypatch, capsys) -> None:
    k = Kernels(monkeypatch)
    shared = list(sa_pair())
    k.queue.append(shared)  # the server's kernel
    tw, ow = _free_port(), _free_port()
    server, rc = _serve(["server", "--listen", SERVER, "--twamp-port", str(tw), "--owamp-port", str(ow),
                         "--ipsec", "--allow-alt2", "--duration", "8"])
    try:
        _wait_listening(tw)
        _wait_listening(ow)
        out = capsys.readouterr().out
        # keys configured: plain unauth is not offered unless asked for (issue 11 item 9)
        assert "modes auth, enc, mixed, ipsec-bound, ipsec-alt1, ipsec-alt2" in out

        def client(cmd: str, port: int, mode: str, sas) -> tuple[int, str, str]:
            k.queue.append(sas)
            code = cli.main([cmd, SERVER, "--port", str(port), "--source", CLIENT, "--mode", mode, "-c", "3",
                             "-i", "0.01", "--wait", "0.5", "--timeout", "5", "--json"])
            got = capsys.readouterr()
            return code, got.out, got.err

        for mode in ("auth+ipsec-bound", "enc+ipsec-alt1", "unauth+ipsec-bound", "auth+ipsec-alt2"):
            code, out, err = client("ping", tw, mode, list(shared))
            assert code == 0, err
            doc = json.loads(out)
            assert doc["mode"] == mode and doc["summary"]["loss"]["received"] == 3
        code, out, err = client("owping", ow, "enc+ipsec-bound", list(shared))
        assert code == 0, err
        doc = json.loads(out)
        assert doc["mode"] == "enc+ipsec-bound" and doc["forward"]["received"] == doc["reverse"]["received"] == 3

        # Our kernel holds another SA pair: the client refuses the greeting, one line, exit 3.
        code, out, err = client("ping", tw, "auth+ipsec-bound", list(sa_pair(0xA0B00002, 0xB0A00002)))
        assert code == _runtime.EXIT_GREETING_REFUSED and out == ""
        lines = [ln for ln in err.splitlines() if ln.startswith("xwamp ping:")]
        assert lines == [f"xwamp ping: IPsec check failed: the server announced an SA our kernel does not hold "
                         f"(no_sa: spi=0x{SPI_CS:08x} proto=50 daddr={SERVER})"]
        # The client's SA goes elsewhere: the announced SPI exists but not from us.
        wrong = make_sa("127.0.0.3", SERVER, spi=SPI_CS, reqid=7)
        code, _, err = client("ping", tw, "enc+ipsec-alt1", [wrong, shared[1]])
        assert code == _runtime.EXIT_GREETING_REFUSED and "(sa_mismatch: " in err
        for sa in shared:  # no key material anywhere in what the user sees
            for alg in (sa.crypt, sa.auth):
                assert alg.key.reveal().hex() not in err
    finally:
        server.join(15)
    assert rc == [0]


def test_cli_ipsec_option_errors(monkeypatch, capsys) -> None:
    assert cli.main(["server", "--allow-alt2", "--duration", "0.1"]) == 2
    assert "--allow-alt2 needs --ipsec" in capsys.readouterr().err
    # IPsec modes need no keyfile; plain keyed modes still do
    assert cli.main(["ping", SERVER, "--mode", "auth"]) == 2
    assert cli.main(["ping", SERVER, "--netns", "xwamp-no-such-ns", "--mode", "auth+ipsec-bound"]) == 2
    assert "xwamp-no-such-ns" in capsys.readouterr().err


def test_sa_deletion_aborts_the_bound_connection() -> None:
    """SaBoundHandler + ControlListener.abort: the server's SA pair is deleted with no
    successor, so its tests stop (Stop-Sessions Accept=2, wire-format §5), then it closes."""

    async def main() -> None:
        ab, ba = sa_pair()
        srv_fol, cli_fol = XfrmFollower(sas=[ab, ba]), XfrmFollower(sas=[ab, ba])
        srv_rt = BinderRuntime.following(srv_fol, grace=0.0)
        cli_rt = BinderRuntime.following(cli_fol)
        handlers: list[SaBoundHandler] = []
        lst: ControlListener

        def factory(srv):
            h = SaBoundHandler(TwampHandler(srv), srv, srv_rt, lambda s, accept: lst.abort(s, accept))
            handlers.append(h)
            return h

        lst = ControlListener(factory, twamp=True, hosts=[SERVER], port=0, config=IPSEC_CFG,
                              key_source=srv_rt.key_source)
        await lst.start()
        try:
            conn = await AsyncControlClient.connect(SERVER, lst.addresses[0][1], wanted=("auth+ipsec-bound",),
                                                    key_source=cli_rt.key_source, local_addr=CLIENT, timeout=5)
            try:
                req = m.RequestTWSession(ipaddress.ip_address(CLIENT), ipaddress.ip_address(SERVER), 9, 0,
                                         padding_length=0, timeout=1 << 32)
                assert (await conn.request_tw_session(req)).ok
                assert await conn.start_sessions() == m.ACCEPT_OK
                assert handlers[-1].key is not None and srv_rt.counters()["bound"] == 1
                for sa in (ab, ba):
                    srv_fol.inject(XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=sa.key_id))
                srv_rt.tick()  # grace 0: Stop now
                got = await conn._wait(ev.StopSessionsReceived, timeout=3)
                assert got.stop.accept == m.ACCEPT_INTERNAL_ERROR
                assert await asyncio.wait_for(conn.reader.read(), 3) == b""
                assert handlers[-1].stopped == "sa_deleted" and srv_rt.counters()["bound"] == 0
            finally:
                await conn.close()
        finally:
            await lst.close()

    asyncio.run(main())


def test_greeting_refused_is_a_control_error_with_the_reason() -> None:
    async def main() -> None:
        ab, ba = sa_pair()
        srv_rt = BinderRuntime(XfrmFollower(sas=[ab, ba]).table, config=BinderConfig())
        cli_rt = BinderRuntime(XfrmFollower(sas=list(sa_pair(0x1111, 0x2222))).table)
        lst = ControlListener(TwampHandler, twamp=True, hosts=[SERVER], port=0, config=IPSEC_CFG,
                              key_source=srv_rt.key_source)
        await lst.start()
        try:
            with pytest.raises(GreetingRefused) as e:
                await AsyncControlClient.connect(SERVER, lst.addresses[0][1], wanted=("unauth+ipsec-bound",),
                                                 key_source=cli_rt.key_source, local_addr=CLIENT, timeout=5)
            assert e.value.reason == "no_sa" and f"spi=0x{SPI_CS:08x}" in e.value.detail
            assert cli_rt.binder.refusals["no_sa"] == 1
        finally:
            await lst.close()

    asyncio.run(main())
