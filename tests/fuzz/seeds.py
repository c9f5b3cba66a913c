"""Writes the seed corpus of every fuzz target (tests/fuzz/corpus/TARGET/seed-*).

    PYTHONPATH=. .venv/bin/python tests/fuzz/seeds.py

Seeds are valid inputs built here with struct from the RFC layouts (and the recorded kernel
datagrams of tests/data/xfrm), so the fuzzer starts deep in each decoder. Findings are
kept beside them as ``regress-*`` files and never rewritten by this script.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


def _put(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def control_messages() -> None:
    from agent.control import messages as m
    from tests.fuzz.targets import LO

    fixed = [m.ServerGreeting(1 | 2 | 4, b"c" * 16, b"s" * 16, 1024).pack(),
             m.SetUpResponse(1, "alice").pack(),
             m.ServerStart(0, b"i" * 16, 123 << 32).pack(),
             m.RequestTWSession(LO, LO, 5000, 6000, type_p=46 << 24).pack(),
             m.RequestSession(LO, LO, 1, 2, num_packets=10, slots=(m.Slot.seconds(m.Slot.FIXED, 0.1),)).pack(),
             m.AcceptSession(0, 862, b"S" * 16).pack(),
             m.StartSessions().pack(),
             m.StartAck(0).pack(),
             m.FetchSession(b"S" * 16, 0, 0xFFFFFFFF).pack(),
             m.FetchAck(0, True, 10, 1, 2).pack(),
             m.StartNSessions((b"a" * 16, b"b" * 16)).pack(),
             m.StartNAck((b"a" * 16,), 0).pack(),
             m.StopNSessions((b"a" * 16,)).pack(),
             m.StopNAck((b"a" * 16,), 0).pack()]
    for i, raw in enumerate(fixed):
        _put("control_messages", f"{i:02d}", bytes([i]) + raw)
    n = len(fixed)
    _put("control_messages", "skip", bytes([n, 2]) + m.FetchSkipRanges(((1, 2), (5, 9))).pack())
    from agent.engine.timefmt import ErrorEstimate

    err = ErrorEstimate(True, False, 0, 1)
    rec = m.DataRecord(3, 100 << 32, err, 101 << 32, err, 64)
    _put("control_messages", "records", bytes([n + 1, 2]) + m.FetchRecords((rec, rec)).pack())
    _put("control_messages", "stop-tw", bytes([n + 2]) + m.StopSessions(0, 1).pack())
    _put("control_messages", "stop-ow", bytes([0x80 | (n + 2)]) + m.StopSessions(
        0, 1, (m.SessionDescription(b"S" * 16, 10, ((1, 2),)),)).pack())
    _put("control_messages", "datarecord", bytes([n + 3]) + rec.pack())


def test_packets() -> None:
    from agent.engine import packets as pk
    from agent.engine import tlv
    from agent.engine.crypto import StampCrypto
    from netlink.secret import Secret
    from tests.fuzz.targets import _test_keys

    s = pk.SenderPacket(7, 0xE000000000000000, 0x8001, 3, b"")
    r = pk.ReflectorPacket(7, 0xE000000100000000, 0x8001, 0xE000000080000000, 6, 0xE000000000000000, 0x8001, 64, 3)
    for pi, proto in enumerate((pk.Proto.TWAMP, pk.Proto.OWAMP, pk.Proto.STAMP)):
        for si, sec in enumerate((pk.Security.UNAUTH, pk.Security.AUTH, pk.Security.ENCRYPTED)):
            if proto is pk.Proto.STAMP and sec is pk.Security.ENCRYPTED:
                continue
            crypto = None
            if sec is not pk.Security.UNAUTH:
                crypto = (StampCrypto(Secret(b"k" * 32)) if proto is pk.Proto.STAMP
                          else pk.session_crypto(proto, sec, _test_keys()))
            sel = pi + 3 * si
            _put("test_packets", f"sender-{proto.value}-{sec.name}", bytes([sel]) + pk.encode_sender(s, proto, sec, crypto))
            if proto is not pk.Proto.OWAMP:
                _put("test_packets", f"refl-{proto.value}-{sec.name}",
                     bytes([0x80 | sel]) + pk.encode_reflector(r, proto, sec, crypto))
                _put("test_packets", f"reflector-{proto.value}-{sec.name}",
                     bytes([0x40 | sel]) + pk.encode_sender(s, proto, sec, crypto))
    tlvs = tlv.encode_tlvs([tlv.class_of_service(46), tlv.timestamp_info(), tlv.direct_measurement(5),
                            tlv.extra_padding(8)])
    _put("test_packets", "reflector-stamp-tlvs",
         bytes([0x40 | 2]) + pk.encode_sender(s, pk.Proto.STAMP, pk.Security.UNAUTH) + tlvs)


def stamp_tlv() -> None:
    from agent.engine import tlv
    from agent.engine.crypto import StampCrypto
    from netlink.secret import Secret

    body = tlv.encode_tlvs([tlv.class_of_service(46), tlv.timestamp_info(1, 1, 1, 1), tlv.direct_measurement(5),
                            tlv.extra_padding(12), tlv.Tlv(0, 99, b"xyz")])
    _put("stamp_tlv", "all", bytes([6]) + body)
    crypto = StampCrypto(Secret(b"k" * 32))
    _put("stamp_tlv", "hmac", bytes([7]) + tlv.sender_tlvs([tlv.class_of_service(10)], crypto, 1))
    _put("stamp_tlv", "empty", bytes([0]))


def netlink_xfrm() -> None:
    rec = json.loads((HERE.parent / "data" / "xfrm" / "recorded.json").read_text())
    seen = set()
    for i, d in enumerate(rec["datagrams"]):
        raw = bytes.fromhex(d["hex"])[:4000]
        label = d["label"].replace(":", "-").replace("/", "-")
        if label in seen:
            continue
        seen.add(label)
        _put("netlink_xfrm", f"{i:02d}-{label}", bytes([0]) + raw)
        if "newsa" in label or "dump" in label and "sa" in label:
            _put("netlink_xfrm", f"{i:02d}-{label}-sa", bytes([2]) + raw[16:])
        if "policy" in label:
            _put("netlink_xfrm", f"{i:02d}-{label}-policy", bytes([3]) + raw[16:])


def server_stream() -> None:
    from agent.control import messages as m
    from tests.fuzz.targets import LO

    setup = m.SetUpResponse(1).pack()
    _put("server_stream", "setup", bytes([0x01]) + setup)
    _put("server_stream", "tw-request", bytes([0x05 | (3 << 3)]) + m.RequestTWSession(LO, LO, 5000, 0).pack()
         + m.StartSessions().pack() + m.StopSessions(0, 1).pack())
    ow = m.RequestSession(LO, LO, 1, 2, num_packets=10, slots=(m.Slot.seconds(m.Slot.FIXED, 0.1),))
    _put("server_stream", "ow-request", bytes([0x04]) + ow.pack() + m.StartSessions().pack()
         + m.StopSessions(0, 1, (m.SessionDescription(b"S" * 16, 10),)).pack() + m.FetchSession(b"S" * 16).pack())


def _request_ops(twamp: bool) -> bytes:
    """Reader bytes for tests.fuzz.targets._request (flags 0: IPv4 loopback, Conf-Receiver),
    then the application's answer (accept OK)."""
    req = bytearray([0, 0x00])  # op 0, flags
    if not twamp:
        req += bytes([0])  # slots - 1
    req += b"S" * 16 + bytes(8)  # SID, MBZ
    if not twamp:
        req += struct.pack("!I", 10)  # Number of Packets
    req += struct.pack("!HH", 5000, 6000)
    req += bytes([0]) + struct.pack("!I", 0)  # padding length
    req += bytes([0])  # Start Time 0
    req += struct.pack("!Q", 2 << 32)  # Timeout
    req += bytes([0, 0])  # Type-P: DSCP 0
    if not twamp:
        req += bytes([1]) + struct.pack("!Q", 1 << 28)  # a fixed slot
    return bytes(req) + bytes([0, 0])  # accept OK, port


START = bytes([2, 0, 0])  # Start-Sessions, MBZ zero, Start-Ack OK


def server_session() -> None:
    packets = bytes([5, 0, 3]) + b"".join(struct.pack("!IQH", i, 0xE0 << 56, 0x8001) + bytes([0]) for i in range(3))

    def owamp(next_seqno: int) -> bytes:
        stop = bytes([3, 1, 0]) + struct.pack("!I", next_seqno) + bytes([0])  # one description, Accept 0
        fetch = bytes([4, 1, 0, 1])  # a known SID, everything
        return bytes([0]) + _request_ops(False) + START + packets + stop + fetch

    _put("server_session", "owamp", owamp(10))
    _put("server_session", "owamp-huge-next-seqno", owamp(0xFFFFFFFF))
    tw_stop = bytes([3, 0, 0])
    _put("server_session", "twamp", bytes([1]) + _request_ops(True) + START + tw_stop)
    start_n = bytes([6, 0, 1, 0, 1, 0])  # one known SID, Start-N, ack OK
    stop_n = bytes([6, 0, 1, 0, 0, 0])
    _put("server_session", "twamp-isc", bytes([3]) + _request_ops(True) + START + start_n + stop_n + tw_stop)


def config() -> None:
    _put("config", "example", (HERE.parent.parent / "examples" / "xwamp.toml").read_bytes())
    _put("config", "small", b'[agent]\nlog_level = "debug"\n[server]\ntwamp_port = 1862\nowamp_port = 1861\n'
         b'[[peers]]\naddress = "192.0.2.1"\ninterval = 0.5\nmode = ["unauth"]\n')


def keyfile() -> None:
    _put("keyfile", "xwamp", b"\x00# comment\nalice pass phrase\nbob\tx\n")
    _put("keyfile", "pfs", b"\x01alice 736563726574\n")
    _put("keyfile", "stamp-hex", b"\x02" + b"0x" + b"ab" * 32 + b"\n")
    _put("keyfile", "ike-json", b"\x03" + json.dumps([{
        "spi_i": "0102030405060708", "spi_r": "1112131415161718", "prf": "hmac-sha256",
        "sk_d": "00" * 32, "children": [{"spi_a": "c0000001", "spi_b": "c0000002", "reqid": 1}]}]).encode())


def main() -> None:
    for f in (control_messages, test_packets, stamp_tlv, netlink_xfrm, server_stream, server_session, config, keyfile):
        d = CORPUS / f.__name__
        if d.is_dir():
            for p in d.glob("seed-*"):
                p.unlink()
        f()


if __name__ == "__main__":
    main()
