"""STAMP keyed from the tunnel (docs/wire-format.md §9): the key against a derivation written
here from the spec with raw `cryptography` calls; the pair each side picks through its policies;
a rekey overlap (both pairs tried, the one that verifies wins, counted), the grace period, the
mismatch count; and a daemon measuring itself over a (fake) tunnel, rekeyed mid-measurement."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac

from agent.daemon import config as cfg
from agent.daemon import supervisor as dm
from agent.engine.packets import Proto, Security
from agent.engine.sender import TestSender
from agent.sessions.bound import PolicyMap
from agent.sessions.stamp_keys import TunnelStampKeys
from netlink.events import EventKind, XfrmEvent
from netlink.fake import make_sa
from netlink.secret import Secret
from netlink.table import SATable
from tests.test_daemon import FakeXfrm, _free_port, _out_policy, until

A, B = "192.0.2.1", "192.0.2.2"  # outer
SND, REF = "127.0.0.1", "127.0.0.2"  # inner: the sender behind A, the reflector behind B


def _pair(spi_ab: int, spi_ba: int, add_time: int = 1_700_000_000):
    ab = make_sa(A, B, spi=spi_ab, reqid=7, add_time=add_time, enc_key=os.urandom(16), auth_key=os.urandom(32))
    ba = make_sa(B, A, spi=spi_ba, reqid=7, add_time=add_time, enc_key=os.urandom(16), auth_key=os.urandom(32))
    return ab, ba


def _spec_key(c2s, s2c) -> bytes:
    """wire-format §9.2 from the text: KEYMAT = enc‖auth (sender->reflector SA) ‖ enc‖auth (the
    other); K = first 32 octets of prf+(KEYMAT, "xwamp STAMP HMAC") = HMAC-SHA-256(KEYMAT, label ‖ 0x01)."""
    keymat = (c2s.crypt.key.reveal() + c2s.auth.key.reveal() + s2c.crypt.key.reveal() + s2c.auth.key.reveal())
    h = hmac.HMAC(keymat, hashes.SHA256())
    h.update(b"xwamp STAMP HMAC\x01")
    return h.finalize()


def _views(sas):
    t = SATable()
    t.replace_all(sas)
    sender = TunnelStampKeys(t, PolicyMap([_out_policy(SND, REF, A, B)]))
    clock = [0.0]
    refl = TunnelStampKeys(t, PolicyMap([_out_policy(REF, SND, B, A)]), local=REF, clock=lambda: clock[0])
    return t, sender, refl, clock


def _packet(key, seq: int = 0) -> bytes:
    return TestSender(Proto.STAMP, Security.AUTH, stamp_key=key, count=1).build(seq, 1_700_000_000 * 10**9)


def _reflect(r, pkt: bytes) -> bytes | None:
    return r.reflect(pkt, 1_700_000_000 * 10**9 + 10, 64, lambda: 1_700_000_000 * 10**9 + 20, None, (SND, 5000))


def test_both_ends_derive_the_spec_key_from_the_same_pair() -> None:
    ab, ba = _pair(0xA1, 0xB1)
    _t, sender, refl, _c = _views([ab, ba])
    key, tag = sender.sender_key(SND, REF)
    assert key.reveal() == _spec_key(ab, ba)
    assert tag == "spi_c2s=0x000000a1 spi_s2c=0x000000b1 reqid=7"
    assert key.reveal().hex() not in repr(key) + str(key)
    r = refl.reflector()
    out = _reflect(r, _packet(key))
    assert out is not None and len(out) == 112
    h = hmac.HMAC(_spec_key(ab, ba), hashes.SHA256())  # the reply is keyed with the same pair
    h.update(out[:96])
    assert out[96:112] == h.finalize()[:16]
    assert r.key_results == {"current": 1}


def test_rekey_overlap_grace_and_mismatch() -> None:
    ab, ba = _pair(0xA1, 0xB1)
    t, sender, refl, clock = _views([ab, ba])
    r = refl.reflector()
    old, _ = sender.sender_key(SND, REF)
    assert _reflect(r, _packet(old)) is not None
    nab, nba = _pair(0xA2, 0xB2, add_time=1_700_000_100)
    t.put(nab)
    t.put(nba)
    clock[0] += 2  # past the candidate cache
    new, tag = sender.sender_key(SND, REF)
    assert tag.startswith("spi_c2s=0x000000a2") and new.reveal() == _spec_key(nab, nba)
    assert _reflect(r, _packet(new, 1)) is not None  # the new pair: current
    assert _reflect(r, _packet(old, 2)) is not None  # the old one: still live, tried second
    assert r.key_results == {"current": 2, "previous": 1}
    for sa in (ab, ba):  # make-before-break: the old SAs go
        t.remove(sa.key_id)
    clock[0] += 2
    assert _reflect(r, _packet(old, 3)) is not None  # in flight across the rekey: within grace
    clock[0] += 20
    assert _reflect(r, _packet(old, 4)) is None  # past grace: no pair verifies it
    assert r.key_results["mismatch"] == 1 and r.counters.bad_hmac == 1
    wrong = _packet(Secret(os.urandom(32)), 5)
    assert _reflect(r, wrong) is None and r.key_results["mismatch"] == 2


def test_no_pair_is_one_refusal() -> None:
    _t, sender, refl, _c = _views([])
    import pytest

    from agent.binder.keys import BinderRefusal

    with pytest.raises(BinderRefusal) as e:
        sender.sender_key(SND, REF)
    assert e.value.reason.value == "no_sa" and sender.refusals["no_sa"] == 1
    r = refl.reflector()
    ab, ba = _pair(1, 2)
    k = TunnelStampKeys(SATable.from_sas([ab, ba]), PolicyMap([_out_policy(SND, REF, A, B)])).sender_key(SND, REF)[0]
    assert _reflect(r, _packet(k)) is None and r.key_results == {"no_sa": 1}


def test_daemon_stamp_keyed_from_tunnel_survives_rekey(tmp_path: Path) -> None:
    """One daemon: [reflector] on the inner address behind B, a stamp peer from behind A, both
    auth+ipsec-bound; a make-before-break rekey mid-measurement; no packet lost to keys."""
    port = _free_port()
    path = tmp_path / "x.toml"
    path.write_text(f"""
[server]
enabled = false
[exporter]
enabled = false
[reflector]
enabled = true
listen = ["{REF}"]
port = {port}
mode = "auth+ipsec-bound"
[[peers]]
name = "t"
address = "{REF}"
source = "{SND}"
protocol = "stamp"
mode = "auth+ipsec-bound"
port = {port}
interval = 0.01
count = 20
timeout = 0.3
""")
    ab, ba = _pair(0xA0B00001, 0xB0A00001)
    src = FakeXfrm([ab, ba])
    out: dict = {}

    async def main() -> None:
        d = dm.Daemon(cfg.load(path), str(path), sa_source=src, notify=lambda *l: True)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        m = d.metrics.sessions["peer:t"]
        await until(lambda: m.sa_keyed and m.cycles >= 1, 20)
        nab, nba = _pair(0xA0B00002, 0xB0A00002, add_time=1_700_000_100)
        for sa in (nab, nba):
            src.queue.put_nowait(XfrmEvent(EventKind.NEW_SA, sa=sa))
        for sa in (ab, ba):
            src.queue.put_nowait(XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=sa.key_id))
        await until(lambda: m.rebinds == 1, 20)
        cycles = m.cycles
        await until(lambda: m.cycles >= cycles + 2, 30)
        from exporters.prometheus import render

        out["body"] = render(d.snapshot())[0].decode()
        out["m"] = m
        out["refl"] = d.reflector.counters()
        d.request_stop()
        out["rc"] = await asyncio.wait_for(task, 20)

    asyncio.run(main())
    m = out["m"]
    assert out["rc"] == 0
    assert m.sent >= 60 and m.received == m.sent, (m.sent, m.received)
    body = out["body"]
    assert re.search(r'xwamp_stamp_reflector_packets_total\{result="tunnel_key_current"\} \d+', body)
    assert 'xwamp_stamp_reflector_packets_total{result="tunnel_key_mismatch"}' not in body
    assert 'xwamp_stamp_reflector_packets_total{result="bad_hmac"} 0.0' in body
    assert re.search(r'xwamp_session_rebinds_total\{name="t",peer="127.0.0.2",reqid="7",protocol="stamp"\} 1.0',
                     body)


def test_keyed_reflector_checks_each_packets_hmac_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key search verifies the packet; the base reflector does not verify it again (one
    HMAC-SHA-256 to check, one to sign the reply). A tampered packet is still dropped."""
    from agent.engine.crypto import StampCrypto

    ab, ba = _pair(0xA1, 0xB1)
    _t, sender, refl, _c = _views([ab, ba])
    key, _tag = sender.sender_key(SND, REF)
    pkt = _packet(key, 1)
    calls = []  # HMAC computations: StampCrypto.mac, or a fresh keyed HMAC from fast_mac()
    real, real_fast = StampCrypto.mac, StampCrypto.fast_mac
    monkeypatch.setattr(StampCrypto, "mac", lambda self, *parts: calls.append(1) or real(self, *parts))

    def fast_mac(self):
        new = real_fast(self)
        return lambda: calls.append(1) or new()

    monkeypatch.setattr(StampCrypto, "fast_mac", fast_mac)
    r = refl.reflector()  # its fast path takes fast_mac per key
    out = _reflect(r, pkt)
    assert out is not None and len(calls) == 2
    h = hmac.HMAC(_spec_key(ab, ba), hashes.SHA256())
    h.update(out[:96])
    assert out[96:112] == h.finalize()[:16]
    bad = bytearray(_packet(key, 2))
    bad[20] ^= 1
    assert _reflect(r, bytes(bad)) is None and r.counters.bad_hmac == 1
    assert r._verified is None
