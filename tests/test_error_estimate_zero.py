"""RFC 4656 §4.1.2: "Multiplier MUST NOT be set to zero. If Multiplier is zero, the packet
SHOULD be considered corrupt and discarded." The packets here are built with ``struct``
from the RFC 4656 §4.1.2 / RFC 5357 §4.2.1 unauthenticated layouts, not with xwamp's
encoders: Seq (4) | Timestamp (8) | Error Estimate (2) | padding; the reflector's reply
is Seq | Timestamp | Error Estimate | MBZ (2) | Receive Timestamp | Sender Seq | Sender
Timestamp | Sender Error Estimate | MBZ (2) | Sender TTL | padding."""

from __future__ import annotations

import struct

import pytest

from agent.engine.packets import Proto
from agent.engine.receiver import OwampReceiver
from agent.engine.reflector import ReflectorSession
from agent.engine.sender import TestSender
from agent.engine.timefmt import ntp_from_unix_ns

T0 = 1_780_000_000_000_000_000
TS = ntp_from_unix_ns(T0)


def sender_packet(seq: int, multiplier: int) -> bytes:
    return struct.pack("!IQH", seq, TS, (1 << 15) | multiplier) + bytes(27)  # S=1, Scale 0


@pytest.mark.parametrize("multiplier,kept", [(0, False), (1, True), (255, True)])
def test_owamp_receiver_discards_multiplier_zero(multiplier, kept) -> None:
    rcv = OwampReceiver()
    assert (rcv.on_packet(sender_packet(0, multiplier), T0 + 1000, 64) is not None) is kept
    assert rcv.counters.bad_error_estimate == (0 if kept else 1)
    assert len(rcv.records) == (1 if kept else 0)


@pytest.mark.parametrize("multiplier,kept", [(0, False), (7, True)])
def test_twamp_reflector_does_not_answer_multiplier_zero(multiplier, kept) -> None:
    ref = ReflectorSession(Proto.TWAMP, error_estimate=1)
    out = ref.reflect(sender_packet(3, multiplier), T0 + 1000, 64, lambda: T0 + 2000)
    assert (out is not None) is kept
    assert ref.counters.bad_error_estimate == (0 if kept else 1)


@pytest.mark.parametrize("multiplier,kept", [(0, False), (1, True)])
def test_twamp_sender_discards_a_reply_with_multiplier_zero(multiplier, kept) -> None:
    snd = TestSender(Proto.TWAMP, count=1, error_estimate=1)
    snd.build(0, T0)
    reply = struct.pack("!IQHHQIQHHB3x", 0, TS + 2, multiplier, 0, TS + 1, 0, TS, 1, 0, 64) + bytes(14)
    rec = snd.on_reply(reply, T0 + 5000, 64)
    assert (rec is not None) is kept
    assert snd.counters.bad_error_estimate == (0 if kept else 1)
    assert (snd.records()[0].t4_ns is not None) is kept
