"""Results statistics on hand-computed cases."""

from __future__ import annotations

import json

import pytest

from agent.engine.sender import PacketRecord
from agent.sessions.results import (
    format_reply,
    format_summary,
    percentile,
    reordering,
    summarize,
)

SYNC = 0x8001  # S=1, tiny error
UNSYNC = 0x0001
MS = 1_000_000


def rec(seq: int, rseq: int | None, *, fwd: int = 100_000, res: int = 10_000, rev: int = 200_000,
        arrival: int | None = None, err: int = SYNC) -> PacketRecord:
    t1 = seq * MS
    r = PacketRecord(seq=seq, t1_ns=t1, size=41, t1_error=SYNC)
    if rseq is None:
        return r
    r.reflector_seq = rseq
    r.t2_ns = t1 + fwd
    r.t3_ns = r.t2_ns + res
    r.t4_ns = r.t3_ns + rev
    r.reflector_error = err
    r.t4_error = SYNC
    r.sender_ttl, r.reply_ttl = 62, 61
    r.reply_size = 41
    r.arrival = arrival if arrival is not None else seq
    return r


def scenario() -> list[PacketRecord]:
    """Sent 0..9. Seq 3 lost forward; seq 6 reflected (rseq 5) but lost back.
    Seq 8 duplicated forward (reflector numbered both copies: 7 and 8); seq 7's reply
    duplicated on the way back (same rseq 6). Replies of 4 and 5 swapped on the way back.
    Seq 9 took 200 µs longer forward.
    """
    rs = [
        rec(0, 0, arrival=0),
        rec(1, 1, arrival=1),
        rec(2, 2, arrival=2),
        rec(3, None),
        rec(4, 3, arrival=4),
        rec(5, 4, arrival=3),
        rec(6, None),
        rec(7, 6, arrival=5),
        rec(8, 7, arrival=6),
        rec(9, 9, fwd=300_000, arrival=7),
    ]
    rs[8].duplicates.append((8, 0))  # forward duplicate: a second reflector number
    rs[7].duplicates.append((6, 0))  # reverse duplicate: same reflector number
    return rs


def test_loss_direction_duplicates_reordering() -> None:
    s = summarize(scenario())
    assert (s.loss.sent, s.loss.received, s.loss.lost) == (10, 8, 2)
    assert s.loss.percent == pytest.approx(20.0)
    assert (s.loss.forward, s.loss.reverse, s.loss.direction_exact) == (1, 1, True)
    assert (s.duplicates.total, s.duplicates.forward, s.duplicates.reverse) == (2, 1, 1)
    assert s.reorder_round_trip.reordered == 1 and s.reorder_round_trip.max_extent == 1
    assert s.reorder_forward is not None and s.reorder_forward.reordered == 0
    assert s.reorder_reverse is not None and s.reorder_reverse.reordered == 1


def test_rtt_one_way_ipdv() -> None:
    s = summarize(scenario())
    # RTT = fwd + rev = 0.3 ms for 7 packets, 0.5 ms for seq 9
    assert s.rtt is not None
    assert (s.rtt.count, s.rtt.min, s.rtt.max) == (8, pytest.approx(0.3), pytest.approx(0.5))
    assert s.rtt.mean == pytest.approx((7 * 0.3 + 0.5) / 8)
    assert s.one_way.trusted
    assert s.one_way.forward is not None and s.one_way.forward.max == pytest.approx(0.3)
    assert s.one_way.reverse is not None and s.one_way.reverse.mean == pytest.approx(0.2)
    # consecutive received pairs: (0,1) (1,2) (4,5) (7,8) (8,9); only (8,9) differs: 0.2 ms forward
    assert s.ipdv_forward is not None and s.ipdv_forward.count == 5
    assert s.ipdv_forward.max == pytest.approx(0.2) and s.ipdv_forward.p50 == 0
    assert s.ipdv_reverse is not None and s.ipdv_reverse.max == 0
    assert s.hops_forward == (62, 62) and s.hops_reverse == (61, 61)
    json.dumps(s.to_dict())  # JSON-able


def test_unsynchronised_one_way_marked_untrusted() -> None:
    rs = [rec(i, i, err=UNSYNC) for i in range(3)]
    s = summarize(rs)
    assert not s.one_way.trusted
    assert "NOT synchronised" in format_summary(s)


def test_stateless_reflector_cannot_tell_direction() -> None:
    rs = [rec(0, 0), rec(1, None), rec(2, 2)]  # reflector copies our seq
    s = summarize(rs, reflector_stateful=False)
    assert s.loss.lost == 1 and s.loss.forward is None and s.loss.reverse is None
    s = summarize(rs, reflector_stateful=None)
    assert s.loss.lost == 1 and s.loss.forward is None and s.loss.reverse is None


def test_trailing_loss_is_not_exact() -> None:
    rs = [rec(0, 0), rec(1, 1), rec(2, None)]
    s = summarize(rs)
    assert s.loss.forward == 1 and s.loss.reverse == 0 and not s.loss.direction_exact


def test_reordering_rfc4737_example() -> None:
    r = reordering([1, 2, 3, 5, 6, 7, 8, 4, 9])
    assert r.reordered == 1 and r.max_extent == 4
    assert reordering([0, 1, 2]).reordered == 0
    r2 = reordering([3, 0, 1, 2])
    assert r2.reordered == 3 and r2.max_extent == 3


def test_percentile() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([0, 10], 95) == pytest.approx(9.5)


def test_text_output() -> None:
    rs = scenario()
    text = format_summary(summarize(rs), "192.0.2.1")
    assert "10 packets transmitted, 8 received, 20.0% packet loss (forward 1, reverse 1)" in text
    assert "2 duplicates (fwd 1, rev 1)" in text
    line = format_reply(rs[9], "192.0.2.1")
    assert "seq=9" in line and "rtt=0.500 ms" in line and "fwd=0.300 rev=0.200 ms" in line
    assert format_reply(rs[3]) == "seq=3 lost"


def test_empty() -> None:
    s = summarize([rec(0, None)])
    assert s.rtt is None and s.loss.lost == 1
    assert "100.0% packet loss" in format_summary(s)


def test_owamp_summary_from_fetch_records() -> None:
    from agent.engine.receiver import FETCH_RECORD, decode_fetch_records
    from agent.engine.timefmt import ntp_from_unix_ns
    from agent.sessions.results import format_owamp_summary, summarize_owamp

    t0 = 1_780_000_000 * 10**9

    def r(seq: int, delay_ns: int | None, ttl: int = 60, err: int = SYNC) -> bytes:
        sts = ntp_from_unix_ns(t0 + seq * MS)
        rts = 0 if delay_ns is None else ntp_from_unix_ns(t0 + seq * MS + delay_ns)
        return FETCH_RECORD.pack(seq, err, SYNC, sts, rts, ttl)

    # arrival order 0,2,1 (1 reordered), 3 duplicated, 4 lost; delays 1.0/1.0/1.5/1.0 ms
    raw = r(0, MS) + r(2, MS) + r(1, 3 * MS // 2) + r(3, MS) + r(3, MS) + r(4, None)
    s = summarize_owamp(decode_fetch_records(raw), sent=5)
    assert (s.sent, s.received, s.lost, s.duplicates) == (5, 4, 1, 1)
    assert s.percent == pytest.approx(20.0)
    assert s.delay is not None and s.delay.min == pytest.approx(1.0, abs=1e-6) and s.delay.max == pytest.approx(1.5, abs=1e-6)
    assert s.ipdv is not None and s.ipdv.max == pytest.approx(0.5, abs=1e-6) and s.ipdv.count == 3
    assert s.reorder.reordered == 1 and s.trusted and s.ttl == (60, 60)
    assert "5 sent, 4 received, 20.0% lost, 1 duplicates" in format_owamp_summary(s)
    unsync = summarize_owamp(decode_fetch_records(r(0, MS, err=UNSYNC)))
    assert not unsync.trusted and unsync.sent == 1
