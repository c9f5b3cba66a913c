"""Hostile peers against the STAMP additions: malformed Follow-Up TLVs, reflectors lying in their
follow-ups, senders spraying sessions (SSIDs/ports) and tunnel-keyed reflectors flooded from many
addresses. Each answer is bounded: a flag, a count, a drop; never a traceback or unbounded memory."""

from __future__ import annotations

import os
import struct

from agent.engine import tlv
from agent.engine.followup import MAX_STREAMS, ReplyTxStamps
from agent.engine.packets import Proto
from agent.engine.reflector import ReflectorSession
from agent.engine.sender import TestSender
from agent.engine.txlag import TxLag
from agent.sessions import stamp_keys
from agent.sessions.bound import PolicyMap
from agent.sessions.stamp import MAX_FUT_WAIT, FollowUpCorrector
from netlink.table import SATable

T0 = 1_700_000_000 * 10**9


def _ntp(ns: int) -> int:
    sec, frac = divmod(ns, 10**9)
    return ((sec + 2_208_988_800) << 32) | (frac * (1 << 32) // 10**9)


def test_follow_up_tlv_of_the_wrong_length_is_flagged_malformed() -> None:
    txs = ReplyTxStamps(TxLag())
    sess = ReflectorSession(Proto.STAMP, stateful=False)
    sess.follow_up = txs.follow_up
    for n in (0, 4, 15, 17, 1000):
        pkt = TestSender(Proto.STAMP, tlvs=[tlv.Tlv(0, tlv.T_FOLLOW_UP, bytes(n))], count=1).build(0, T0)
        out = sess.reflect(pkt, T0 + 1, 64, lambda: T0 + 2)
        (t,) = tlv.parse_tlvs(out[44:])
        assert t.type == tlv.T_FOLLOW_UP and t.flags & tlv.FLAG_M and len(t.value) == n


def test_session_spray_keeps_bounded_state() -> None:
    txs = ReplyTxStamps(TxLag())
    for i in range(MAX_STREAMS + 500):
        txs.sent((("192.0.2.1", i & 0xFFFF), i >> 16), 0, T0)
        txs.on_stamp(i, T0 + 1000, "sw")
    assert len(txs._last) == MAX_STREAMS and len(txs._pending) == 0


def test_lying_reflector_follow_ups_are_refused_or_ignored() -> None:
    """Follow-ups naming unknown sequence numbers, times before T2 or far after, or garbage modes."""
    s = TestSender(Proto.STAMP, tlvs=[tlv.follow_up_request()], count=8)
    fix = FollowUpCorrector()
    lies = [struct.pack("!IQB3x", 999_999, _ntp(T0), 2),  # unknown seq
            struct.pack("!IQB3x", 0, _ntp(T0 - 5 * 10**9), 2),  # before T2
            struct.pack("!IQB3x", 1, _ntp(T0 + 3600 * 10**9), 1),  # an hour later
            struct.pack("!IQB3x", 2, _ntp(T0 + 100), 77),  # unknown mode: not a stamp
            os.urandom(16)]
    for n, fut in enumerate([bytes(16)] + lies):
        sseq, sts, serr = struct.unpack_from("!IQH", s.build(n, T0))
        reply = struct.pack("!IQHHQIQH2xB3x", n, _ntp(T0 + 2), 1, 0, _ntp(T0 + 1), sseq, sts, serr, 64)
        rec = s.on_reply(reply + struct.pack("!BBH", 0, 7, 16) + fut, T0 + 3, 64)
        fix.on_record(rec)
    assert fix.corrected == 0 and fix.rejected >= 2
    assert all(r.t3_ns is None for r in s.records() if r.follow_up == "pending")


def test_pending_samples_are_bounded() -> None:
    fix = FollowUpCorrector()
    s = TestSender(Proto.STAMP, tlvs=[tlv.follow_up_request()], count=MAX_FUT_WAIT + 100)
    for n in range(MAX_FUT_WAIT + 100):
        sseq, sts, serr = struct.unpack_from("!IQH", s.build(n, T0))
        reply = struct.pack("!IQHHQIQH2xB3x", n, _ntp(T0 + 2), 1, 0, _ntp(T0 + 1), sseq, sts, serr, 64)
        fut = struct.pack("!IQB3x", 10**9 + n, _ntp(T0), 2)  # always naming a reply never sent
        fix.on_record(s.on_reply(reply + struct.pack("!BBH", 0, 7, 16) + fut, T0 + 3, 64))
    assert len(fix._waiting) == MAX_FUT_WAIT


def test_tunnel_keyed_reflector_flooded_from_many_addresses() -> None:
    keys = stamp_keys.TunnelStampKeys(SATable(), PolicyMap(), local="127.0.0.2")
    r = keys.reflector()
    pkt = bytes(112)
    for i in range(stamp_keys.MAX_PEERS + 300):
        host = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        assert r.reflect(pkt, T0, 64, lambda: T0, None, (host, 862)) is None
    assert len(keys._cands) <= stamp_keys.MAX_PEERS
    assert r.key_results["no_sa"] == stamp_keys.MAX_PEERS + 300 and r.counters.bad_hmac == stamp_keys.MAX_PEERS + 300
    # a name that is no address at all: no candidates, no exception
    assert r.reflect(pkt, T0, 64, lambda: T0, None, ("not-an-ip", 1)) is None
