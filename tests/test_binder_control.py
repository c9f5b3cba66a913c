"""The binder plugged into the sans-IO control client and server (agent.control) through
agent.control.keyring's seam: full handshakes in every IPsec-keyed mode, on the host."""

from __future__ import annotations

import ipaddress
import os

import pytest

from agent.binder import announce as bd
from agent.binder.announce import Binder, BinderConfig, BinderKeySource, Modes
from agent.control import events as ev
from agent.control import messages as m
from agent.control.client import ControlClient
from agent.control.keyring import ChainedKeySource, StaticKeySource
from agent.control.server import ControlServer, ServerConfig
from netlink.fake import make_sa
from netlink.secret import Secret
from netlink.table import SATable

CA, SA_ = ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("192.0.2.20")


@pytest.fixture(autouse=True, scope="module")
def _modes() -> None:
    bd.register_modes()


def _tables():
    sas = [make_sa(CA, SA_, spi=0xC0000001, reqid=7, enc_key=os.urandom(16), auth_key=os.urandom(32)),
           make_sa(SA_, CA, spi=0xC0000002, reqid=7, enc_key=os.urandom(16), auth_key=os.urandom(32))]
    return SATable.from_sas(sas), SATable.from_sas(sas)


def _run(mode_name: str, srv_bits: int, cfg: BinderConfig = BinderConfig(), client_table=None,
         key_id: str = "xwamp-ipsec"):
    st_, ct = _tables()
    sks = BinderKeySource(Binder(st_, cfg))
    cks = BinderKeySource(Binder(client_table if client_table is not None else ct, cfg))
    passphrases = StaticKeySource({"alice": Secret(b"pw")})
    srv = ControlServer(True, ServerConfig(count=1024, modes=srv_bits), ChainedKeySource(sks, passphrases),
                        local=(SA_, 862), peer=(CA, 40000))
    cli = ControlClient(True, [mode_name], key_id, ChainedKeySource(cks, passphrases),
                        local=(CA, 40000), peer=(SA_, 862), max_count=1024)
    greeting = srv.data_to_send()
    assert m.ServerGreeting.unpack(greeting).unused[:5] == (0xC0000001).to_bytes(4, "big") + b"\x32"
    cevs = cli.receive_data(greeting)
    evs = srv.receive_data(cli.data_to_send())
    return srv, cli, evs, cevs, cks.binder


@pytest.mark.parametrize("name,bits", [
    ("auth+ipsec-bound", 2 | Modes.IPSEC_BOUND),
    ("enc+ipsec-bound", 4 | Modes.IPSEC_BOUND),
    ("auth+ipsec-alt1", 2 | Modes.IPSEC_ALT1),
    ("enc+ipsec-alt1", 4 | Modes.IPSEC_ALT1),
    ("auth+ipsec-alt2", 2 | Modes.IPSEC_ALT2),
])
def test_handshake_and_test_keys(name: str, bits: int) -> None:
    srv, cli, evs, _, _ = _run(name, int(bits) | 1 | 2 | 4, BinderConfig(allow_alt2=True, sid_bound=True))
    assert isinstance(evs[0], ev.SetupComplete), evs
    assert isinstance(cli.receive_data(srv.data_to_send())[0], ev.Ready)
    cli.request_tw_session(m.RequestTWSession(CA, SA_))
    sid = srv.receive_data(cli.data_to_send())[0].sid
    srv.accept_session(0, 7001)
    acc = cli.receive_data(srv.data_to_send())[0]
    assert acc.test_keys is not None and acc.test_keys == srv.test_keys(sid)


def test_client_without_matching_sa_cannot_finish() -> None:
    # The client's kernel does not hold the announced SA: the binder refuses, the client
    # closes the connection (draft §4.1 "MUST close") and nothing reaches the server.
    srv, cli, evs, cevs, cbinder = _run("auth+ipsec-bound", 2 | int(Modes.IPSEC_BOUND), client_table=SATable())
    assert cli.closed and evs == []
    assert any(isinstance(e, ev.ProtocolFailure) for e in cevs)
    assert cbinder.refusals == {"no_sa": 1}


def test_mismatched_keys_are_rejected_by_server() -> None:
    st_, _ = _tables()
    _, other = _tables()  # same SPIs, different key bytes: a forged or stale view
    sks = BinderKeySource(Binder(st_))
    cks = BinderKeySource(Binder(other))
    srv = ControlServer(True, ServerConfig(count=1024, modes=2 | int(Modes.IPSEC_ALT1)), sks,
                        local=(SA_, 862), peer=(CA, 40000))
    cli = ControlClient(True, ["auth+ipsec-alt1"], "xwamp-ipsec", cks, local=(CA, 40000), peer=(SA_, 862),
                        max_count=1024)
    cli.receive_data(srv.data_to_send())
    evs = srv.receive_data(cli.data_to_send())
    assert isinstance(evs[0], ev.SetupRejected) and evs[0].accept == m.ACCEPT_FAILURE
    assert sks.binder.refusals["token_mismatch"] == 1


def test_classic_modes_still_use_passphrases() -> None:
    srv, cli, evs, _, _ = _run("auth", 1 | 2 | 4 | int(Modes.IPSEC_BOUND), key_id="alice")
    assert isinstance(evs[0], ev.SetupComplete)
    assert isinstance(cli.receive_data(srv.data_to_send())[0], ev.Ready)
