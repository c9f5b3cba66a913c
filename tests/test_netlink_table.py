"""SATable semantics: identity, indexes, rekey overlap, event folding."""

from __future__ import annotations

import dataclasses
import ipaddress

from netlink.events import EventKind, XfrmEvent
from netlink.fake import make_sa
from netlink.records import Proto
from netlink.table import SATable

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
C = ipaddress.ip_address("2001:db8::3")
D = ipaddress.ip_address("2001:db8::4")


def test_get_by_identity_and_container_protocol() -> None:
    out = make_sa(A, B, spi=0x100)
    inb = make_sa(B, A, spi=0x200)
    t = SATable.from_sas([out, inb])
    assert len(t) == 2
    assert t.get(0x100, Proto.ESP, B) is out
    assert t.get(0x100, 50, B) is out
    assert t.get(0x100, Proto.AH, B) is None
    assert t.get(0x100, Proto.ESP, A) is None
    assert out in t and (0x200, 50, A) in t and (0x200, 50, B) not in t
    assert "x" not in t
    assert set(t) == {out, inb}


def test_by_reqid_and_between() -> None:
    sas = [make_sa(A, B, spi=1, reqid=7), make_sa(B, A, spi=2, reqid=7), make_sa(C, D, spi=3, reqid=8)]
    t = SATable.from_sas(sas)
    assert t.by_reqid(7) == sas[:2]
    assert t.by_reqid(8) == [sas[2]]
    assert t.by_reqid(9) == []
    assert t.between(C, D) == [sas[2]]
    assert t.between(D, C) == []


def test_pair_picks_newest_during_rekey_overlap() -> None:
    old_out = make_sa(A, B, spi=0x10, add_time=100)
    old_in = make_sa(B, A, spi=0x11, add_time=100)
    new_out = make_sa(A, B, spi=0x20, add_time=200)
    new_in = make_sa(B, A, spi=0x21, add_time=200)
    t = SATable.from_sas([new_out, old_out, new_in, old_in])  # insertion order must not matter here
    assert t.pair(A, B) == (new_out, new_in)
    assert t.pair(B, A) == (new_in, new_out)
    # Same second (add_time has 1 s resolution): the later inserted wins.
    t2 = SATable.from_sas([old_out, dataclasses.replace(new_out, current=old_out.current)])
    assert t2.pair(A, B)[0].spi == 0x20
    # After the old SAs go, the new stay.
    t.remove(old_out.key_id)
    assert t.pair(A, B) == (new_out, new_in)
    t.remove(new_out.key_id)
    assert t.pair(A, B) == (None, new_in)
    assert t.pair(C, D) == (None, None)


def test_pair_prefers_esp_and_ignores_ipcomp() -> None:
    ah = make_sa(A, B, spi=1, proto=Proto.AH, add_time=300)
    esp = make_sa(A, B, spi=2, proto=Proto.ESP, add_time=100)
    comp = make_sa(A, B, spi=3, proto=Proto.COMP, add_time=400)
    t = SATable.from_sas([ah, esp, comp])
    assert t.pair(A, B)[0] is esp
    assert t.pair(A, B, proto=Proto.AH)[0] is ah


def test_update_keeps_insertion_order_and_reindexes() -> None:
    first = make_sa(A, B, spi=1, reqid=1, add_time=100)
    second = make_sa(A, B, spi=2, reqid=1, add_time=100)
    t = SATable.from_sas([first, second])
    moved = dataclasses.replace(first, reqid=5)
    t.put(moved)
    assert len(t) == 2
    assert t.by_reqid(1) == [second]
    assert t.by_reqid(5) == [moved]
    assert t.pair(A, B)[0] is second  # `moved` is the same SA, not a newer one


def test_pairs_by_reqid_and_orientation() -> None:
    t1o, t1i = make_sa(A, B, spi=1, reqid=1), make_sa(B, A, spi=2, reqid=1)
    t2o, t2i = make_sa(C, D, spi=3, reqid=2), make_sa(D, C, spi=4, reqid=2)
    lone = make_sa(A, C, spi=5, reqid=3)
    t = SATable.from_sas([t1o, t1i, t2o, t2i, lone])
    assert sorted(t.pairs(), key=lambda p: p[0].spi) == [(t1o, t1i), (t2o, t2i)]
    assert sorted(t.pairs(local=[B, D]), key=lambda p: p[0].spi) == [(t1i, t1o), (t2i, t2o)]


def test_pairs_falls_back_to_addresses_when_reqids_differ() -> None:
    o, i = make_sa(A, B, spi=1, reqid=0), make_sa(B, A, spi=2, reqid=9)
    assert SATable.from_sas([o, i]).pairs(local=[A]) == [(o, i)]


def test_pairs_two_tunnels_same_peers_different_reqids() -> None:
    sas = [make_sa(A, B, spi=1, reqid=1), make_sa(B, A, spi=2, reqid=1),
           make_sa(A, B, spi=3, reqid=2), make_sa(B, A, spi=4, reqid=2)]
    got = sorted((o.spi, i.spi) for o, i in SATable.from_sas(sas).pairs(local=[A]))
    assert got == [(1, 2), (3, 4)]


def test_apply_events() -> None:
    t = SATable()
    sa = make_sa(A, B, spi=9, packets=0)
    t.apply(XfrmEvent(EventKind.NEW_SA, sa=sa))
    assert t.get(9, 50, B) is sa
    upd = dataclasses.replace(sa, replay_window=64)
    t.apply(XfrmEvent(EventKind.UPD_SA, sa=upd))
    assert t.get(9, 50, B) is upd and len(t) == 1
    # A soft expire carries fresh counters but no algorithms: keys must survive.
    soft = dataclasses.replace(upd, crypt=None, auth=None, current=dataclasses.replace(upd.current, packets=7))
    t.apply(XfrmEvent(EventKind.EXPIRE, sa=soft, hard=False))
    held = t.get(9, 50, B)
    assert held is not None and held.current.packets == 7 and held.crypt == upd.crypt and held.auth == upd.auth
    t.apply(XfrmEvent(EventKind.NEW_POLICY))
    assert len(t) == 1
    t.apply(XfrmEvent(EventKind.EXPIRE, sa=soft, hard=True))
    assert len(t) == 0
    # A soft expire for an SA we do not hold does not resurrect it.
    t.apply(XfrmEvent(EventKind.EXPIRE, sa=soft, hard=False))
    assert len(t) == 0
    t.apply(XfrmEvent(EventKind.NEW_SA, sa=sa))
    t.apply(XfrmEvent(EventKind.DEL_SA, sa_id=(9, Proto.ESP, B)))
    assert len(t) == 0 and t.by_reqid(sa.reqid) == [] and t.between(A, B) == []
    t.apply(XfrmEvent(EventKind.DEL_SA, sa_id=(9, 50, B)))  # deleting twice is harmless
    assert len(t) == 0


def test_repr_shows_no_keys() -> None:
    sa = make_sa(enc_key=b"\xab" * 16, auth_key=b"\xcd" * 32)
    for text in (repr(sa), str(sa), repr(SATable.from_sas([sa])), repr(XfrmEvent(EventKind.NEW_SA, sa=sa))):
        assert "abab" not in text.lower() and "cdcd" not in text.lower()
        assert "\\xab" not in text and "\\xcd" not in text


def test_flush_by_protocol() -> None:
    esp, ah = make_sa(A, B, spi=1), make_sa(A, B, spi=2, proto=Proto.AH)
    t = SATable.from_sas([esp, ah])
    t.apply(XfrmEvent(EventKind.FLUSH_SA, proto=Proto.AH))
    assert list(t) == [esp]
    t.apply(XfrmEvent(EventKind.FLUSH_SA, proto=255))  # IPSEC_PROTO_ANY
    assert len(t) == 0 and t.by_reqid(1) == []
