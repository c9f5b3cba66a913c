"""Sender <-> reflector over real UDP on loopback, with kernel RX stamps and TTLs."""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from pathlib import Path

import pytest

from agent.engine.keys import TestKeys
from agent.engine.packets import (
    MODE_AUTHENTICATED,
    MODE_ENCRYPTED,
    MODE_MIXED,
    MODE_UNAUTHENTICATED,
    Proto,
    Security,
)
from agent.engine.reflector import ReflectorSession
from agent.engine.sender import TestSender
from agent.engine.udp import (
    OwampReceiverEndpoint,
    TwampReflectorEndpoint,
    run_twamp_sender,
)
from agent.sessions.results import summarize
from netlink.secret import Secret

KEYS = TestKeys(Secret(bytes(range(16))), Secret(bytes(range(40, 72))))



def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("mode", [MODE_UNAUTHENTICATED, MODE_AUTHENTICATED, MODE_ENCRYPTED, MODE_MIXED | MODE_ENCRYPTED])
def test_twamp_exchange_with_kernel_stamps(mode: int) -> None:
    async def main() -> tuple[list, dict]:
        async with TwampReflectorEndpoint(("127.0.0.1", 0)) as ep:
            ep.add_session(b"s" * 16, ("127.0.0.1", 0), mode, KEYS)
            recs = await run_twamp_sender(("127.0.0.1", 0), ("127.0.0.1", ep.port), mode, KEYS,
                                          count=5, interval=0.005, timeout=2.0)
            return recs, ep.counters()

    recs, counters = _run(main())
    assert [r.seq for r in recs] == list(range(5))
    assert all(not r.lost for r in recs)
    assert counters["reflected"] == 5 and counters["bad_hmac"] == 0
    for r in recs:
        assert r.t4_source in ("sw", "hw")  # kernel RX stamp on our side
        assert r.t1_ns <= r.t2_ns <= r.t3_ns <= r.t4_ns  # one clock on loopback
        assert r.t2_ns != r.t3_ns
        assert r.sender_ttl == 255 and r.reply_ttl == 255  # real received TTLs: we send 255 (RFC 4656 §4.1.2)
        assert 0 < r.rtt_ns < 50_000_000
    s = summarize(recs)
    assert s.loss.lost == 0 and s.rtt is not None and s.rtt.count == 5


def test_tampered_authenticated_packet_dropped_and_counted() -> None:
    async def main() -> dict:
        async with TwampReflectorEndpoint(("127.0.0.1", 0)) as ep:
            ep.add_session("sid", ("127.0.0.1", 0), MODE_ENCRYPTED, KEYS)
            snd = TestSender(Proto.TWAMP, Security.ENCRYPTED, keys=KEYS, error_estimate=1)
            good = snd.build(0, time.time_ns())
            bad = bytearray(snd.build(1, time.time_ns()))
            bad[20] ^= 0x10
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.bind(("127.0.0.1", 0))
                s.sendto(bytes(bad), ("127.0.0.1", ep.port))
                s.sendto(b"\x00" * 20, ("127.0.0.1", ep.port))  # short
                s.sendto(good, ("127.0.0.1", ep.port))
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(None, s.recv, 2048)
            assert snd.on_reply(data, time.time_ns(), 64) is not None
            return ep.remove_session("sid") or {}

    c = _run(main())
    assert c["bad_hmac"] == 1 and c["short"] == 1 and c["reflected"] == 1


def test_stamp_default_session_ipv6_and_auth() -> None:
    key = Secret(b"0123456789abcdef0123456789abcdef")

    async def main() -> tuple[list, list, dict]:
        async with TwampReflectorEndpoint(("::", 0), default=ReflectorSession(Proto.STAMP, Security.AUTH, stamp_key=key)) as ep:
            ok = await run_twamp_sender(("::", 0), ("::1", ep.port), MODE_AUTHENTICATED, proto=Proto.STAMP,
                                        stamp_key=key, count=3, interval=0.005, timeout=2.0)
            wrong = await run_twamp_sender(("0.0.0.0", 0), ("127.0.0.1", ep.port), MODE_AUTHENTICATED, proto=Proto.STAMP,
                                           stamp_key=Secret(b"x" * 32), count=2, interval=0.005, timeout=0.2)
            return ok, wrong, ep.counters()

    ok, wrong, c = _run(main())
    assert all(not r.lost and r.size == 112 for r in ok)
    assert all(r.lost for r in wrong)
    assert c["reflected"] == 3 and c["bad_hmac"] == 2


def test_owamp_receiver_endpoint() -> None:
    async def main():
        async with OwampReceiverEndpoint(("127.0.0.1", 0)) as ep:
            rcv = ep.add_session("o", ("127.0.0.1", 0), MODE_AUTHENTICATED, KEYS, expected=4)
            recs = await run_twamp_sender(("127.0.0.1", 0), ("127.0.0.1", ep.port), MODE_AUTHENTICATED, KEYS,
                                          proto=Proto.OWAMP, count=4, interval=0.002, timeout=0.2,
                                          spin_ns=200_000)
            await asyncio.sleep(0.05)
            return recs, rcv

    recs, rcv = _run(main())
    assert len(recs) == 4 and all(r.lost for r in recs)  # one-way: nothing comes back
    assert sorted(r.seq for r in rcv.records) == [0, 1, 2, 3]
    assert all(r.recv_source in ("sw", "hw") and r.ttl == 255 for r in rcv.records)


def test_reflect_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import build_parser
    from agent.control.keyring import read_hmac_key

    kf = tmp_path / "key"
    kf.write_text("0x" + "ab" * 32 + "\n")
    kf.chmod(0o600)  # secret files readable by others are refused
    assert read_hmac_key(kf) == b"\xab" * 32
    with socket.socket() as s:  # any free port number
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = build_parser().parse_args(["reflect", "--listen", "127.0.0.1", "--port", str(port),
                                      "--auth-key-file", str(kf), "--duration", "0.2"])
    assert isinstance(args, argparse.Namespace)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "authenticated" in out and "reflected 0" in out
    assert "ab" * 8 not in out  # the key never shows, only its fingerprint


def test_stamp_cos_tlv_and_session_dscp_over_udp() -> None:
    from agent.engine import tlv

    async def main() -> tuple[list, list, dict]:
        async with TwampReflectorEndpoint(("::", 0), default=ReflectorSession(Proto.STAMP)) as ep:
            ep.add_session("t", ("::1", 0), MODE_UNAUTHENTICATED, dscp=34)
            cos = await run_twamp_sender(("0.0.0.0", 0), ("127.0.0.1", ep.port), proto=Proto.STAMP, dscp=10,
                                         tlvs=[tlv.class_of_service(46)], count=2, interval=0.005, timeout=2.0)
            tw = await run_twamp_sender(("::1", 0), ("::1", ep.port), count=2, interval=0.005, timeout=2.0)
            return cos, tw, ep.counters()

    cos, tw, c = _run(main())
    assert all(not r.lost for r in cos + tw) and c["send_errors"] == 0
    got = tlv.parse_tlvs(cos[0].reply_tlvs)[0]
    assert tlv.parse_class_of_service(got.value)[:2] == (46, 10)  # DSCP1 kept, DSCP2 = what arrived


def test_fuzz_decode_ancillary() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agent.engine.udp import decode_ancillary

    item = st.tuples(st.sampled_from([0, 1, 41, socket.SOL_SOCKET]), st.integers(0, 70), st.binary(max_size=64))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(item, max_size=4))
    def check(anc: list) -> None:
        rx, src, ttl, tos = decode_ancillary(anc, None)
        assert rx is None or rx > 0
        assert src == "sw"

    check()
