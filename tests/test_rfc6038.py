"""RFC 6038: Reflect Octets (mode bit 32) and Symmetrical Size (bit 64).

Wire layout of the control fields (independent implementations, see
docs/protocol-interop.md), the reflector's copy at the right place, the mode
negotiation, and full sessions over loopback that use both features."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest

from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import ControlError, ControlListener
from agent.control.client import ControlClient
from agent.control.keyring import StaticKeySource
from agent.control.modes import Mode
from agent.control.server import ControlServer, ServerConfig
from agent.engine.keys import TestKeys
from agent.engine.packets import (
    MODE_AUTHENTICATED,
    MODE_SYMMETRICAL_SIZE,
    MODE_UNAUTHENTICATED,
    Proto,
    Security,
    reflect_offset,
)
from agent.engine.reflector import ReflectorSession
from agent.engine.sender import TestSender
from agent.sessions.session import PingOptions, TwampHandler, twamp_ping
from netlink.secret import Secret

LO = ipaddress.IPv4Address("127.0.0.1")
PW = StaticKeySource({"alice": Secret(b"rfc 6038 passphrase")})
KEYS = TestKeys(Secret(bytes(range(16))), Secret(bytes(range(32))))
T0 = 1_780_000_000_000_000_000
FEATURES = int(Mode.REFLECT_OCTETS | Mode.SYMMETRICAL_SIZE)


def _now() -> int:
    return T0 + 5_000


# ------------------------------------------------------------------ control layout


def test_request_tw_session_reflect_fields_at_88_and_90() -> None:
    req = m.RequestTWSession(LO, LO, 5000, 6000, padding_length=27, octets_to_reflect=0xABCD, reflect_length=0x0102)
    raw = req.pack()
    assert len(raw) == 112
    assert raw[84:88] == bytes(4)  # Type-P unchanged before them
    assert raw[88:92] == b"\xab\xcd\x01\x02" and raw[92:96] == bytes(4)  # MBZ(4) follows, then HMAC at 96
    back = m.RequestTWSession.unpack(raw)
    assert back == req and (back.octets_to_reflect, back.reflect_length) == (0xABCD, 0x0102)
    # without the feature the octets stay zero, as before
    assert m.RequestTWSession(LO, LO).pack()[88:96] == bytes(8)
    with pytest.raises(ValueError):
        m.RequestTWSession(LO, LO, reflect_length=1 << 16)


def test_accept_session_reflected_and_server_octets_at_20_and_22() -> None:
    sid = bytes(range(16))
    acc = m.AcceptSession(0, 7000, sid, reflected_octets=0x1234, server_octets=0x5678)
    raw = acc.pack()
    assert len(raw) == 48 and raw[4:20] == sid
    assert raw[20:24] == b"\x12\x34\x56\x78" and raw[24:32] == bytes(8)
    assert m.AcceptSession.unpack(raw) == acc
    assert m.AcceptSession(0, 1, sid).pack()[20:32] == bytes(12)


def _pump(a, b) -> list[ev.Event]:
    out: list[ev.Event] = []
    for _ in range(10):
        x = a.data_to_send()
        if x:
            out += b.receive_data(x)
        y = b.data_to_send()
        if y:
            out += a.receive_data(y)
        if not x and not y:
            break
    return out


@pytest.mark.parametrize("offered,wanted,selected", [
    (FEATURES, FEATURES, FEATURES),
    (int(Mode.SYMMETRICAL_SIZE), FEATURES, int(Mode.SYMMETRICAL_SIZE)),  # only what the server offers
    (FEATURES, 0, 0),  # and only what the client wants
])
def test_feature_negotiation(offered: int, wanted: int, selected: int) -> None:
    srv = ControlServer(True, ServerConfig(count=1024, modes=2 | offered), PW, local=(LO, 862), peer=(LO, 4000))
    cli = ControlClient(True, ["auth"], "alice", PW, features=wanted)
    evs = _pump(srv, cli)
    assert any(isinstance(e, ev.Ready) for e in evs)
    assert cli.mode == srv.mode == 2 | selected


def test_server_refuses_feature_bits_it_did_not_offer() -> None:
    srv = ControlServer(True, ServerConfig(count=1024, modes=1), None)
    srv.data_to_send()
    evs = srv.receive_data(m.SetUpResponse(1 | int(Mode.SYMMETRICAL_SIZE)).pack())
    assert isinstance(evs[0], ev.SetupRejected) and evs[0].accept == m.ACCEPT_NOT_SUPPORTED


@pytest.mark.parametrize("negotiated", [True, False])
def test_accept_session_echoes_octets_only_when_negotiated(negotiated: bool) -> None:
    srv = ControlServer(True, ServerConfig(count=1024, modes=1 | FEATURES), None, local=(LO, 862), peer=(LO, 4000))
    cli = ControlClient(True, ["unauth"], features=FEATURES if negotiated else 0)
    _pump(srv, cli)
    cli.request_tw_session(m.RequestTWSession(LO, LO, 5000, 0, octets_to_reflect=0xBEEF, reflect_length=4))
    (req,) = _pump(cli, srv)
    assert isinstance(req, ev.SessionRequested) and req.request.reflect_length == 4
    srv.accept_session(0, 7000, server_octets=0x0102)
    (acc,) = _pump(srv, cli)
    assert isinstance(acc, ev.SessionAccepted)
    want = (0xBEEF, 0x0102) if negotiated else (0, 0)
    assert (acc.accept.reflected_octets, acc.accept.server_octets) == want


# ------------------------------------------------------------------ test packets


def _sender_packet(length: int) -> bytes:
    return struct.pack("!IQH", 3, 1 << 32, 0x8001) + bytes((i * 7 + 1) & 0xFF for i in range(length - 14))


@pytest.mark.parametrize("mode,src", [(MODE_UNAUTHENTICATED, 14), (MODE_UNAUTHENTICATED | MODE_SYMMETRICAL_SIZE, 41)])
def test_reflector_copies_padding_to_reflect_after_sender_ttl(mode: int, src: int) -> None:
    assert reflect_offset(mode) == src
    r = ReflectorSession(reflect=(src, 8), error_estimate=1)
    data = _sender_packet(80)
    out = r.reflect(data, T0, 64, _now)
    assert out is not None and len(out) == 80  # RFC 5357 size unchanged
    assert out[41:49] == data[src:src + 8]  # right after Sender TTL
    assert out[49:] == data[14 + 8:80 - 27]  # the rest: the ordinary re-used padding
    plain = ReflectorSession(error_estimate=1).reflect(data, T0, 64, _now)
    assert plain is not None and plain[41:] == data[14:53]


@pytest.mark.parametrize("sec", [Security.AUTH, Security.ENCRYPTED])
def test_sender_and_reflector_agree_authenticated(sec: Security) -> None:
    mode = (MODE_AUTHENTICATED if sec is Security.AUTH else 4) | MODE_SYMMETRICAL_SIZE
    at = reflect_offset(mode)
    assert at == 112  # after the 64 symmetrical-size MBZ octets of a 48-octet sender base
    snd = TestSender(Proto.TWAMP, sec, keys=KEYS, padding=64 + 16, reflect=(at, 6), server_octets=0x0A0B,
                     error_estimate=1)
    d = snd.build(0, T0)
    assert len(d) == 128 and d[112:114] == b"\x0a\x0b"  # Server Octets open the padding to reflect
    ref = ReflectorSession(Proto.TWAMP, sec, keys=KEYS, reflect=(at, 6), error_estimate=1)
    out = ref.reflect(d, T0, 60, _now)
    assert out is not None and len(out) == 128 and out[112:118] == d[112:118]
    rec = snd.on_reply(out, T0 + 1, 60)
    assert rec is not None and rec.reflected_ok is True
    wrong = ReflectorSession(Proto.TWAMP, sec, keys=KEYS, error_estimate=1).reflect(snd.build(1, T0), T0, 60, _now)
    rec = snd.on_reply(wrong or b"", T0 + 1, 60)
    assert rec is not None and rec.reflected_ok is False and snd.counters.reflect_mismatch == 1


def test_reflect_is_twamp_only() -> None:
    with pytest.raises(ValueError):
        ReflectorSession(Proto.STAMP, reflect=(44, 4))


# ------------------------------------------------------------------ full sessions


async def _listener(modes: int) -> ControlListener:
    lst = ControlListener(TwampHandler, twamp=True, hosts=["127.0.0.1"], port=0,
                          config=ServerConfig(count=1024, modes=modes), key_source=PW)
    await lst.start()
    return lst


@pytest.mark.parametrize("mode,features", [("unauth", FEATURES), ("unauth", int(Mode.REFLECT_OCTETS)),
                                           ("auth", FEATURES), ("enc", int(Mode.REFLECT_OCTETS))])
def test_full_session_with_reflect_octets(mode: str, features: int) -> None:
    async def main() -> None:
        lst = await _listener(1 | 2 | 4 | FEATURES)
        try:
            opt = PingOptions("127.0.0.1", lst.addresses[0][1], count=4, interval=0.01, wanted=(mode,),
                              key_id="alice", key_source=PW, wait=0.5, timeout=5.0, features=features,
                              reflect_length=10)
            res = await twamp_ping(opt)
            assert res.mode & features == features
            assert res.summary.loss.received == 4
            assert all(r.reflected_ok is True for r in res.records)
            assert res.counters["reflect_mismatch"] == 0
            if features & Mode.SYMMETRICAL_SIZE:  # the padding to reflect follows the MBZ: same size both ways
                assert all(r.reply_size == r.size for r in res.records)
        finally:
            await lst.close()

    asyncio.run(main())


def test_reflect_octets_not_offered_is_an_error() -> None:
    async def main() -> None:
        lst = await _listener(1 | int(Mode.SYMMETRICAL_SIZE))
        try:
            opt = PingOptions("127.0.0.1", lst.addresses[0][1], count=1, interval=0.01, wait=0.2, timeout=5.0,
                              reflect_length=4)
            with pytest.raises(ControlError, match="Reflect Octets"):
                await twamp_ping(opt)
        finally:
            await lst.close()

    asyncio.run(main())
