"""agent.binder.announce: announcement codec, server/client binding over SATables, keys per mode,
the keyring adapter, and rekey tracking."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.binder import announce as bd
from agent.binder.announce import (
    Announcement,
    Binder,
    BinderConfig,
    BinderKeySource,
    Modes,
    Rebind,
    RekeyTracker,
    Root,
    Stop,
)
from agent.binder.ikev2 import PRF
from agent.binder.keys import BinderRefusal, Reason
from agent.binder.keysource import ChildEntry, IKEEntry, StaticIKEKeySource
from agent.control.keyring import HandshakeContext, TokenRejected
from netlink.events import EventKind, XfrmEvent
from netlink.fake import make_sa
from netlink.records import Proto
from netlink.secret import Secret
from netlink.table import SATable

CA, SA_ = ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("192.0.2.20")
ENC_C, AUTH_C, ENC_S, AUTH_S = (os.urandom(16), os.urandom(32), os.urandom(16), os.urandom(32))


def _pair(spi_c=0xC0000001, spi_s=0xC0000002, reqid=7, add_time=1_700_000_000, proto=Proto.ESP, **kw):
    c2s = make_sa(CA, SA_, spi=spi_c, reqid=reqid, add_time=add_time, proto=proto, enc_key=ENC_C, auth_key=AUTH_C, **kw)
    s2c = make_sa(SA_, CA, spi=spi_s, reqid=reqid, add_time=add_time, proto=proto, enc_key=ENC_S, auth_key=AUTH_S, **kw)
    return c2s, s2c


def _tables(*sas):
    # Both hosts' kernels hold both SAs of the pair (one inbound, one outbound each).
    return SATable.from_sas(sas), SATable.from_sas(sas)


# --- announcement codec ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=12))
def test_unpack_any_12_octets(data: bytes) -> None:
    try:
        a = Announcement.unpack(data)
    except BinderRefusal as e:
        assert e.reason is Reason.BAD_ANNOUNCEMENT
    else:
        assert a.pack() == data  # what parses, round-trips exactly (no ignored octets)


@settings(max_examples=100, deadline=None)
@given(spi_c=st.integers(256, 2**32 - 1), spi_s=st.integers(256, 2**32 - 1), proto=st.sampled_from([50, 51]),
       root=st.sampled_from(list(Root)), prf=st.sampled_from(list(PRF)), sid=st.booleans())
def test_announcement_roundtrip(spi_c, spi_s, proto, root, prf, sid) -> None:
    a = Announcement(spi_c, proto, root, prf, 1 if sid else 0, spi_s)
    raw = a.pack()
    assert len(raw) == 12 and raw[:4] == spi_c.to_bytes(4, "big") and raw[4] == proto  # draft's SPI+proto first
    assert Announcement.unpack(raw) == a
    ctx = HandshakeContext("client", "twamp", greeting_unused=raw)
    assert ctx.ipsec_hint == (spi_c, proto)  # the control plane's reading agrees


@pytest.mark.parametrize("raw", [
    bytes(12), bytes(11),
    (0xC0000001).to_bytes(4, "big") + bytes([108, 0, 5, 0]) + (0xC0000002).to_bytes(4, "big"),  # IPcomp
    (0xFF).to_bytes(4, "big") + bytes([50, 0, 5, 0]) + (0xC0000002).to_bytes(4, "big"),  # reserved SPI
    (0xC0000001).to_bytes(4, "big") + bytes([50, 2, 5, 0]) + (0xC0000002).to_bytes(4, "big"),  # root
    (0xC0000001).to_bytes(4, "big") + bytes([50, 0, 1, 0]) + (0xC0000002).to_bytes(4, "big"),  # prf md5
    (0xC0000001).to_bytes(4, "big") + bytes([50, 0, 5, 2]) + (0xC0000002).to_bytes(4, "big"),  # flags
])
def test_unpack_rejects(raw: bytes) -> None:
    with pytest.raises(BinderRefusal) as ei:
        Announcement.unpack(raw)
    assert ei.value.reason is Reason.BAD_ANNOUNCEMENT


# --- server + client over their own tables -------------------------------------------


def test_server_announces_client_accepts_same_keys() -> None:
    c2s, s2c = _pair()
    st_, ct = _tables(c2s, s2c)
    server = Binder(st_, BinderConfig(sid_bound=True))
    client = Binder(ct)
    sb = server.announce(SA_, CA)
    raw = sb.announcement.pack()
    assert int.from_bytes(raw[:4], "big") == 0xC0000001 and int.from_bytes(raw[8:], "big") == 0xC0000002
    cb = client.accept(raw, CA, SA_)
    assert sb.root() == cb.root()
    assert sb.root().reveal() == ENC_C + AUTH_C + ENC_S + AUTH_S
    bound = Modes.IPSEC_BOUND | 2
    assert sb.token_key(bound) == cb.token_key(bound)
    sid = os.urandom(16)
    assert sb.test_keys(bound, sid) == cb.test_keys(bound, sid) is not None
    assert sb.control_keys(Modes.IPSEC_ALT1 | 4) == cb.control_keys(Modes.IPSEC_ALT1 | 4)
    challenge = os.urandom(16)
    token, keys = cb.make_token(Modes.IPSEC_ALT1 | 4, challenge)
    assert sb.token_ok(Modes.IPSEC_ALT1 | 4, challenge, token)
    assert keys.as_test_keys() == sb.test_keys(Modes.IPSEC_ALT1 | 4, sid)  # one pair for Control and Test
    assert sb.test_keys(2, sid) is None  # classic modes keep RFC 4656 derivation


def test_ah_pair() -> None:
    c2s, s2c = _pair(proto=Proto.AH)
    st_, ct = _tables(c2s, s2c)
    raw = Binder(st_).announce(SA_, CA).announcement.pack()
    assert raw[4] == 51
    cb = Binder(ct).accept(raw, CA, SA_)
    assert cb.root().reveal() == AUTH_C + AUTH_S
    with pytest.raises(BinderRefusal) as ei:
        Binder(ct, BinderConfig(allow_alt2=True)).accept(raw, CA, SA_).control_keys(Modes.IPSEC_ALT2 | 2)
    assert ei.value.reason is Reason.ALT2_AH


def test_rekey_overlap_pair_is_consistent() -> None:
    old = _pair(0xC0000001, 0xC0000002, add_time=100)
    new = _pair(0xD0000001, 0xD0000002, add_time=200)
    other = _pair(0xE0000001, 0xE0000002, reqid=9, add_time=300)  # another CHILD_SA between the same hosts
    st_, ct = _tables(*old, *new)
    sb = Binder(st_).announce(SA_, CA)
    assert (sb.c2s.spi, sb.s2c.spi) == (0xD0000001, 0xD0000002)
    # With a newer CHILD_SA of another reqid, the pair still shares one reqid.
    st2 = SATable.from_sas([*old, other[0], new[1]])
    b2 = Binder(st2).announce(SA_, CA)
    assert b2.c2s.reqid == b2.s2c.reqid
    assert Binder(ct).accept(sb.announcement.pack(), CA, SA_).root() == sb.root()


def _announce_raw(**kw) -> bytes:
    a = dict(spi_c2s=0xC0000001, proto=50, root=Root.KEYMAT, prf=PRF.HMAC_SHA2_256, flags=0, spi_s2c=0xC0000002)
    a.update(kw)
    return Announcement(**a).pack()


@pytest.mark.parametrize("sas,raw,reason", [
    (lambda: [], _announce_raw(), Reason.NO_SA),
    (lambda: [_pair()[0]], _announce_raw(), Reason.NO_REVERSE_SA),
    (lambda: list(_pair()), _announce_raw(spi_c2s=0xC0000003), Reason.NO_SA),
    (lambda: list(_pair()), _announce_raw(proto=51), Reason.NO_SA),
    (lambda: [_pair()[0], dataclasses.replace(_pair()[1], reqid=8)], _announce_raw(), Reason.SA_MISMATCH),
    (lambda: [dataclasses.replace(_pair()[0], saddr=ipaddress.ip_address("192.0.2.99")), _pair()[1]],
     _announce_raw(), Reason.SA_MISMATCH),
    (lambda: [dataclasses.replace(_pair()[0], auth=None), _pair()[1]], _announce_raw(), Reason.ENCRYPTION_ONLY_ESP),
    (lambda: list(_pair()), _announce_raw(root=Root.SKEYSEED), Reason.NO_IKE_SOURCE),
    (lambda: list(_pair()), _announce_raw(prf=PRF.HMAC_SHA1), Reason.UNSUPPORTED_PRF),
    (lambda: list(_pair()), b"\x00" * 12, Reason.BAD_ANNOUNCEMENT),
])
def test_client_refusals(sas, raw, reason) -> None:
    b = Binder(SATable.from_sas(sas()), BinderConfig(accept_prfs=frozenset({PRF.HMAC_SHA2_256})))
    with pytest.raises(BinderRefusal) as ei:
        b.accept(raw, CA, SA_)
    assert ei.value.reason is reason
    assert b.refusals == {reason.value: 1}


def test_server_refusals() -> None:
    with pytest.raises(BinderRefusal) as ei:
        Binder(SATable()).announce(SA_, CA)
    assert ei.value.reason is Reason.NO_SA
    with pytest.raises(BinderRefusal) as ei:
        Binder(SATable.from_sas([_pair()[0]])).announce(SA_, CA)
    assert ei.value.reason is Reason.NO_REVERSE_SA
    redacted = [make_sa(CA, SA_, spi=0xC0000001, reqid=7, enc_key=bytes(16), auth_key=bytes(32)),
                make_sa(SA_, CA, spi=0xC0000002, reqid=7, enc_key=bytes(16), auth_key=bytes(32))]
    with pytest.raises(BinderRefusal) as ei:
        Binder(SATable.from_sas(redacted)).announce(SA_, CA)
    assert ei.value.reason is Reason.KEYS_REDACTED


def test_skeyseed_root() -> None:
    c2s, s2c = _pair()
    seed, sk_d = os.urandom(32), os.urandom(32)
    src = StaticIKEKeySource([IKEEntry(os.urandom(8), os.urandom(8), PRF.HMAC_SHA2_256, Secret(sk_d), Secret(seed),
                                       children=(ChildEntry(7, frozenset((c2s.spi, s2c.spi))),))])
    st_, ct = _tables(c2s, s2c)
    cfg = BinderConfig(root=Root.SKEYSEED)
    sb = Binder(st_, cfg, src).announce(SA_, CA)
    cb = Binder(ct, cfg, src).accept(sb.announcement.pack(), CA, SA_)
    assert sb.root().reveal() == seed == cb.root().reveal()
    # RFC 7717 is its own key mode now (agent.binder.rfc7717): the binder neither offers nor keys it
    assert not Binder(st_, cfg, src).offerable(sb, "owamp") & bd.RFC7717_OWAMP
    assert cb.token_key(bd.RFC7717_TWAMP | 2, "twamp") is None


@pytest.mark.parametrize("mode,ok", [
    (Modes.IPSEC_BOUND | 1, True), (Modes.IPSEC_BOUND | 2, True), (Modes.IPSEC_ALT1 | 4, True),
    (Modes.IPSEC_ALT1 | 1, False), (Modes.IPSEC_ALT2 | 1, False), (Modes.IPSEC_BOUND | Modes.IPSEC_ALT1 | 2, False),
    (bd.RFC7717_TWAMP | 2, True), (bd.RFC7717_TWAMP | Modes.IPSEC_ALT1 | 2, False), (2, True),
])
def test_check_mode(mode, ok) -> None:
    b = Binder(SATable())
    if ok:
        b.check_mode(int(mode), "twamp")
    else:
        with pytest.raises(BinderRefusal) as ei:
            b.check_mode(int(mode), "twamp")
        assert ei.value.reason is Reason.BAD_MODE


def test_alt2_gated_and_offerable() -> None:
    c2s, s2c = _pair()
    st_, _ = _tables(c2s, s2c)
    b = Binder(st_)
    sb = b.announce(SA_, CA)
    assert not b.offerable(sb) & Modes.IPSEC_ALT2
    with pytest.raises(BinderRefusal):
        sb.control_keys(Modes.IPSEC_ALT2 | 2)
    b2 = Binder(st_, BinderConfig(allow_alt2=True))
    sb2 = b2.announce(SA_, CA)
    assert b2.offerable(sb2) & Modes.IPSEC_ALT2
    keys = sb2.control_keys(Modes.IPSEC_ALT2 | 2)
    assert keys.aes_key.reveal() == ENC_C and keys.hmac_key.reveal() == AUTH_C
    assert sb2.token_ok(Modes.IPSEC_ALT2 | 2, os.urandom(16), bytes(64))
    assert not sb2.token_ok(Modes.IPSEC_ALT2 | 2, os.urandom(16), b"\x01" + bytes(63))


# --- keyring adapter -------------------------------------------------------------


def _ctxs(mode: int, unused: bytes = bytes(12)):
    srv = HandshakeContext("server", "twamp", (SA_, 862), (CA, 40000), mode, b"", 0, unused)
    cli = HandshakeContext("client", "twamp", (CA, 40000), (SA_, 862), mode, b"", 0, unused)
    return srv, cli


def test_keysource_adapter_bound_and_alt1() -> None:
    c2s, s2c = _pair()
    st_, ct = _tables(c2s, s2c)
    server, client = BinderKeySource(Binder(st_)), BinderKeySource(Binder(ct))
    srv0, _ = _ctxs(0)
    unused = server.greeting_extra(srv0)
    assert unused is not None and len(unused) == 12
    # IPSEC_BOUND: both sides hand the control plane the same 16-octet Token key
    srv, cli = _ctxs(int(Modes.IPSEC_BOUND | 2), unused)
    assert client.validate(cli) is not None
    assert server.token_key("x", srv) == client.token_key("x", cli) is not None
    assert server.make_token("x", srv, bytes(16)) is None  # RFC 4656 Token for this mode
    # ALT1: derived keys, Token exchange through make_token/open_token
    srv, cli = _ctxs(int(Modes.IPSEC_ALT1 | 4), unused)
    ch = os.urandom(16)
    token, keys = client.make_token("x", cli, ch)
    assert server.open_token("x", srv, ch, token) == keys
    with pytest.raises(TokenRejected):
        server.open_token("x", srv, os.urandom(16), token)
    assert server.token_key("x", srv) is None
    sid = os.urandom(16)
    assert client.test_keys(sid, cli) == server.test_keys(sid, srv) == keys.as_test_keys()
    # classic modes are not the binder's business
    srv, cli = _ctxs(2, unused)
    assert server.token_key("x", srv) is None and client.test_keys(sid, cli) is None
    server.forget(srv0)
    assert "bindings" in repr(server)


def test_keysource_adapter_refusals() -> None:
    srv, cli = _ctxs(int(Modes.IPSEC_BOUND | 2), _announce_raw())
    empty = BinderKeySource(Binder(SATable()))
    assert empty.greeting_extra(srv) is None  # no pair: server must not offer the IPsec bits
    with pytest.raises(BinderRefusal) as ei:
        empty.validate(cli)
    assert ei.value.reason is Reason.NO_SA
    srv, cli = _ctxs(int(Modes.IPSEC_ALT1 | 4), _announce_raw())
    with pytest.raises(TokenRejected):
        empty.open_token("x", srv, bytes(16), bytes(64))


def test_register_modes_with_control_plane() -> None:
    from agent.control import modes as md

    bd.register_modes()
    bd.register_modes()  # idempotent
    km = md.key_modes(True)
    assert int(Modes.IPSEC_BOUND) in km and km[int(Modes.IPSEC_BOUND)].with_unauth
    assert not km[int(Modes.IPSEC_ALT1)].with_unauth


def test_logs_never_carry_keys(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="xwamp.binder")
    c2s, s2c = _pair()
    st_, ct = _tables(c2s, s2c)
    sb = Binder(st_).announce(SA_, CA)
    cb = Binder(ct).accept(sb.announcement.pack(), CA, SA_)
    with pytest.raises(BinderRefusal):
        Binder(SATable()).accept(_announce_raw(), CA, SA_)
    text = caplog.text + repr(sb) + sb.describe() + repr(cb)
    assert "root_fp=" in sb.describe() and "0xc0000001" in text
    for k in (ENC_C, AUTH_C, ENC_S, AUTH_S, sb.root().reveal(), sb.token_key(int(Modes.IPSEC_BOUND | 2)).reveal()):
        assert k.hex() not in text.lower()


# --- rekey -----------------------------------------------------------------------


def _bound(table: SATable):
    return Binder(table).announce(SA_, CA)


def _ev(kind, sa=None, sa_id=None, hard=None):
    return XfrmEvent(kind, sa=sa, sa_id=sa_id, hard=hard)


def test_rekey_make_before_break() -> None:
    old = _pair(0xC0000001, 0xC0000002, add_time=100)
    table = SATable.from_sas(old)
    tr = RekeyTracker(table)
    tr.watch("conn1", _bound(table))
    new = _pair(0xD0000001, 0xD0000002, add_time=200)
    acts = []
    for sa in new:  # new SAs alone change nothing
        ev = _ev(EventKind.NEW_SA, sa)
        table.apply(ev)
        acts += tr.on_event(ev, now=1.0)
    assert acts == []
    ev = _ev(EventKind.EXPIRE, old[0], hard=False)  # soft expire: nothing
    table.apply(ev)
    assert tr.on_event(ev, 1.5) == []
    ev = _ev(EventKind.DEL_SA, sa_id=old[0].key_id)
    table.apply(ev)
    acts = tr.on_event(ev, now=2.0)
    assert len(acts) == 1 and isinstance(acts[0], Rebind)
    assert (acts[0].new_c2s.spi, acts[0].new_s2c.spi) == (0xD0000001, 0xD0000002)
    assert tr.rekeys == 1 and len(tr) == 0
    ev = _ev(EventKind.DEL_SA, sa_id=old[1].key_id)  # the second deletion is no longer ours
    table.apply(ev)
    assert tr.on_event(ev, 2.1) == []


def test_rekey_break_before_make_within_grace() -> None:
    old = _pair(add_time=100)
    table = SATable.from_sas(old)
    tr = RekeyTracker(table, grace=5.0)
    tr.watch("c", _bound(table))
    for sa in old:
        ev = _ev(EventKind.EXPIRE, sa, hard=True)
        table.apply(ev)
        assert tr.on_event(ev, 10.0) == []
    new = _pair(0xD0000001, 0xD0000002, add_time=200)
    ev = _ev(EventKind.NEW_SA, new[0])
    table.apply(ev)
    assert tr.on_event(ev, 11.0) == []  # only one direction yet
    ev = _ev(EventKind.NEW_SA, new[1])
    table.apply(ev)
    acts = tr.on_event(ev, 12.0)
    assert [type(a) for a in acts] == [Rebind]


def test_deleted_without_successor_stops_after_grace() -> None:
    old = _pair()
    unrelated = _pair(0xE0000001, 0xE0000002, reqid=9)
    table = SATable.from_sas([*old, *unrelated])
    tr = RekeyTracker(table, grace=5.0)
    tr.watch("c", _bound(SATable.from_sas(old)))
    ev = _ev(EventKind.DEL_SA, sa_id=old[1].key_id)
    table.apply(ev)
    assert tr.on_event(ev, 100.0) == []
    assert tr.tick(104.9) == []
    acts = tr.tick(105.0)
    assert len(acts) == 1 and isinstance(acts[0], Stop) and acts[0].reason is Reason.SA_DELETED
    assert tr.stops == 1 and "sa_deleted" in repr(acts[0])
    assert tr.tick(200.0) == []


def test_tracker_ignores_unwatched_and_unwatch() -> None:
    old = _pair()
    table = SATable.from_sas(old)
    tr = RekeyTracker(table)
    tr.watch("c", _bound(table))
    tr.unwatch("c")
    ev = _ev(EventKind.DEL_SA, sa_id=old[0].key_id)
    table.apply(ev)
    assert tr.on_event(ev, 0.0) == [] and tr.tick(100.0) == []


def test_adapter_counts_key_derivation_refusals() -> None:
    c2s, s2c = _pair()
    st_, _ = _tables(c2s, s2c)
    src = BinderKeySource(Binder(st_))  # ALT2 disabled by default
    srv, _ = _ctxs(int(Modes.IPSEC_ALT2 | 2))
    with pytest.raises(TokenRejected):
        src.open_token("x", srv, bytes(16), bytes(64))
    srv, _ = _ctxs(int(bd.RFC7717_TWAMP | 2))
    assert src.token_key("x", srv) is None  # not the binder's: agent.binder.rfc7717
    assert src.binder.refusals == {"bad_mode": 1}


def test_v4_mapped_connection_addresses() -> None:
    c2s, s2c = _pair()
    st_, ct = _tables(c2s, s2c)
    m_c, m_s = ipaddress.ip_address(f"::ffff:{CA}"), ipaddress.ip_address(f"::ffff:{SA_}")
    sb = Binder(st_).announce(m_s, m_c)
    assert Binder(ct).accept(sb.announcement.pack(), m_c, m_s).root() == sb.root()
