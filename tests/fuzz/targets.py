"""Fuzz targets: one function per decoder, each taking arbitrary bytes.

A target returns normally for every input. The decoder's documented refusal (ProtocolError,
PacketError, XfrmDecodeError, ConfigError, KeyFileError, ...) is caught here; any other
exception, a hang or unbounded memory is a finding. Each target also checks what must hold
for input the decoder accepted (re-encoding round trips, sizes, bounded output).

The control-server targets drive only the public sans-IO API (ControlServer.receive_data,
data_to_send, accept_session, start_ack, send_stop_sessions, send_fetch_response, ...), so
they survive rewrites of its internals. ``server_session`` builds valid framing with
arbitrary field values (unauthenticated mode: no crypto stands between the fuzzer and the
fields) and plays whole OWAMP/TWAMP conversations: Request, Start, Stop, Fetch.

Used by tools/fuzz (atheris when installed, else a plain mutation loop) and by
tests/fuzz/test_fuzz_short.py.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Callable

from netlink.secret import Secret

LO = ipaddress.IPv4Address("127.0.0.1")


class Reader:
    """Consumes a fuzz input as typed values; zeros once it runs out (so every input is usable)."""

    __slots__ = ("data", "off")

    def __init__(self, data: bytes) -> None:
        self.data, self.off = data, 0

    def take(self, n: int) -> bytes:
        b = self.data[self.off:self.off + n]
        self.off += n
        return b.ljust(n, b"\0")

    def left(self) -> int:
        return max(0, len(self.data) - self.off)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def rest(self) -> bytes:
        b = self.data[self.off:]
        self.off = len(self.data)
        return b


# --------------------------------------------------------------------------- control messages


def control_messages(data: bytes) -> None:
    """Every O/TWAMP-Control message decoder (RFC 4656 §3, RFC 5357 §3, RFC 5938 §3):
    ProtocolError is the only refusal; what decodes re-encodes and decodes to the same."""
    from agent.control import messages as m

    if not data:
        return
    which, body = data[0], data[1:]
    fixed = (m.ServerGreeting, m.SetUpResponse, m.ServerStart, m.RequestTWSession, m.RequestSession,
             m.AcceptSession, m.StartSessions, m.StartAck, m.FetchSession, m.FetchAck,
             m.StartNSessions, m.StartNAck, m.StopNSessions, m.StopNAck)
    counted = (m.FetchSkipRanges, m.FetchRecords)
    k = which % (len(fixed) + len(counted) + 3)
    try:
        if k < len(fixed):
            cls = fixed[k]
            msg = cls.unpack(body)
            again = cls.unpack(msg.pack())
        elif k < len(fixed) + len(counted):
            cls = counted[k - len(fixed)]
            n = body[0] if body else 0
            msg = cls.unpack(body[1:], n)
            again = cls.unpack(msg.pack(), n)
        elif k == len(fixed) + len(counted):
            msg = m.StopSessions.unpack(body, owamp=bool(which & 0x80))
            again = m.StopSessions.unpack(msg.pack(), owamp=bool(which & 0x80))
        elif k == len(fixed) + len(counted) + 1:
            msg = m.DataRecord.unpack(body)
            again = m.DataRecord.unpack(msg.pack())
        else:
            msg = m.Slot.unpack(body)
            again = m.Slot.unpack(msg.pack())
    except m.ProtocolError:
        return
    assert again == msg, (msg, again)


# --------------------------------------------------------------------------- test packets

_KEYS = None


def _test_keys():
    global _KEYS
    if _KEYS is None:
        from agent.engine.keys import TestKeys

        _KEYS = TestKeys(Secret(bytes(range(16))), Secret(bytes(range(32, 64))))
    return _KEYS


_REFLECTORS: dict = {}


def test_packets(data: bytes) -> None:
    """Test-packet decoders in every mode (RFC 4656 §4.1.2, RFC 5357 §4.1.2/§4.2.1, RFC 8762
    §4.2/§4.3): sender and reflector packets, TWAMP/OWAMP/STAMP, unauthenticated,
    authenticated, encrypted. PacketError is the only refusal; unauthenticated packets
    re-encode to the same octets. Also the STAMP/TWAMP reflectors' whole receive path."""
    from agent.engine import packets as pk
    from agent.engine.crypto import StampCrypto

    if not data:
        return
    sel, body = data[0], data[1:]
    protos = (pk.Proto.TWAMP, pk.Proto.OWAMP, pk.Proto.STAMP)
    secs = (pk.Security.UNAUTH, pk.Security.AUTH, pk.Security.ENCRYPTED)
    proto, sec = protos[sel % 3], secs[(sel // 3) % 3]
    if proto is pk.Proto.STAMP and sec is pk.Security.ENCRYPTED:
        sec = pk.Security.AUTH  # STAMP has no encrypted mode (RFC 8762 §4.4)
    crypto = None
    if sec is not pk.Security.UNAUTH:
        crypto = (StampCrypto(Secret(b"k" * 32)) if proto is pk.Proto.STAMP
                  else pk.session_crypto(proto, sec, _test_keys()))
    if sel & 0x40:  # the reflector's receive path: decode, TLVs, state, encode
        if proto is pk.Proto.OWAMP:
            proto = pk.Proto.TWAMP
        key = (proto, sec, bool(sel & 0x80))
        rs = _REFLECTORS.get(key)
        if rs is None:
            from agent.engine.reflector import ReflectorSession

            rs = _REFLECTORS[key] = ReflectorSession(
                proto, sec, keys=_test_keys() if proto is pk.Proto.TWAMP and sec is not pk.Security.UNAUTH else None,
                stamp_key=Secret(b"k" * 32) if proto is pk.Proto.STAMP and (sec is pk.Security.AUTH or sel & 0x80) else None,
                stateful=bool(sel & 0x80))
        out = rs.reflect(body, 1_700_000_000_000_000_000, 64, lambda: 1_700_000_000_000_001_000,
                         tos=body[0] if body else None, peer=("192.0.2.1", 1000))
        assert out is None or len(out) <= max(len(body), 112) + 65535 + 8, len(out)
        return
    if sel & 0x80:
        if proto is pk.Proto.OWAMP:
            return  # OWAMP has no reflector packets
        try:
            r = pk.decode_reflector(body, proto, sec, crypto)
        except pk.PacketError:
            return
        if sec is pk.Security.UNAUTH:  # MBZ octets are not kept: compare decoded values
            assert pk.decode_reflector(pk.encode_reflector(r, proto, sec), proto, sec) == r
        return
    try:
        s = pk.decode_sender(body, proto, sec, crypto)
    except pk.PacketError:
        return
    if sec is pk.Security.UNAUTH and proto is not pk.Proto.STAMP:
        assert pk.encode_sender(s, proto, sec) == body
    elif sec is not pk.Security.UNAUTH:
        assert len(s.extra) == len(body) - pk.sender_base_len(proto, sec)


# --------------------------------------------------------------------------- STAMP TLVs


def stamp_tlv(data: bytes) -> None:
    """RFC 8972 TLV parsing and the reflector's TLV processing: PacketError is the only
    refusal of parse_tlvs; reflect_tlvs of what parsed keeps the TLV count and framing."""
    from agent.engine import tlv
    from agent.engine.crypto import StampCrypto
    from agent.engine.packets import PacketError

    if not data:
        return
    sel, body = data[0], data[1:]
    try:
        tlvs = tlv.parse_tlvs(body)
    except PacketError:
        return
    assert tlv.encode_tlvs(tlvs) == body
    crypto = StampCrypto(Secret(b"k" * 32)) if sel & 1 else None
    out = tlv.reflect_tlvs(body, rx_seq_bytes=b"\0\0\0\1", reply_seq_bytes=b"\0\0\0\2", crypto=crypto,
                           ts_info=(1, 2, 1, 2), rx_tos=sel if sel & 2 else None,
                           counters=(sel, sel + 1) if sel & 4 else None)
    again = tlv.parse_tlvs(out.data)
    assert len(again) == len(tlvs) or (tlvs and tlvs[-1].type == tlv.T_HMAC and crypto is not None
                                       and len(again) == len(tlvs)), (tlvs, again)
    assert out.reply_dscp is None or 0 <= out.reply_dscp < 64


# --------------------------------------------------------------------------- netlink XFRM


def netlink_xfrm(data: bytes) -> None:
    """XFRM netlink messages (netlink/decode.py): datagrams, dump parts, bare SA and policy
    bodies. XfrmDecodeError is the only refusal."""
    from netlink import constants as C
    from netlink.decode import DumpResult, decode_messages, decode_policy, decode_sa, feed_dump
    from netlink.errors import XfrmDecodeError

    if not data:
        return
    sel, body = data[0] % 4, data[1:]
    try:
        if sel == 0:
            out = [m.event for m in decode_messages(body) if m.event is not None]
        elif sel == 1:
            result = DumpResult()
            feed_dump(body, 77, C.XFRM_MSG_NEWSA if data[0] & 4 else C.XFRM_MSG_NEWPOLICY, result)
            out = list(result.items)
        elif sel == 2:
            out = [decode_sa(body)]
        else:
            out = [decode_policy(body)]
    except XfrmDecodeError:
        return
    for rec in out:  # repr reads every field: SA.crypt/auth/aead are decoded on first read
        repr(rec)


# --------------------------------------------------------------------------- control server


def _server(twamp: bool, isc: bool = False):
    from agent.control.modes import Mode
    from agent.control.server import ControlServer, ServerConfig

    modes = int(Mode.UNAUTHENTICATED | Mode.REFLECT_OCTETS | Mode.SYMMETRICAL_SIZE
                | (Mode.INDIVIDUAL_SESSION_CONTROL if isc else 0))
    cfg = ServerConfig(modes=modes, count=1024, max_sessions=4, max_packets=4096)
    return ControlServer(twamp, cfg, None, local=(LO, 862 if twamp else 861), peer=(LO, 40000),
                         now_ntp=lambda: 0xE000_0000 << 32)


class _App:
    """The application side of a fuzzed server: answers every event the way the real
    handlers (agent.sessions.session) do, with OWAMP receivers for Fetch-Session."""

    def __init__(self, srv, r: Reader | None) -> None:
        self.srv, self.r = srv, r
        self.receivers: dict[bytes, tuple] = {}  # sid -> (OwampReceiver, request)
        self.next_seqno: dict[bytes, int] = {}
        self.out = 0

    def pick(self, n: int) -> int:
        return self.r.u8() % n if self.r is not None else 0

    def feed(self, chunk: bytes) -> None:
        from agent.control import events as ev

        evs = self.srv.receive_data(chunk)
        while evs:  # answered: input that waited for the answer is processed now
            for e in evs:
                assert isinstance(e, ev.Event), e
                self.on_event(e)
            if self.srv.awaiting is not None or self.srv.closed:
                break
            evs = self.srv.resume()
        self.drain()

    def drain(self) -> None:
        out = self.srv.data_to_send()
        self.out += len(out)
        assert self.out < 1 << 24, "server output unbounded"

    def on_event(self, e) -> None:
        from agent.control import events as ev
        from agent.control import messages as m
        from agent.engine.packets import Security
        from agent.engine.receiver import OwampReceiver
        from agent.sessions.session import fetch_records

        srv = self.srv
        if isinstance(e, ev.SessionRequested):
            accept = (0, 0, 0, 1, 4, 5)[self.pick(6)]
            s = srv.accept_session(accept, 5000 + self.pick(100), e.sid)
            if s is not None and isinstance(e.request, m.RequestSession) and e.request.conf_receiver:
                self.receivers[e.sid] = (OwampReceiver(Security.UNAUTH, expected=e.request.num_packets), e.request)
        elif isinstance(e, ev.StartRequested):
            srv.start_ack((0, 0, 1, 2)[self.pick(4)])
        elif isinstance(e, ev.StopRequested):
            for d in e.stop.descriptions:
                if d.sid in self.receivers:
                    self.next_seqno[d.sid] = d.next_seqno
            if srv.awaiting == "stop":
                srv.send_stop_sessions(m.ACCEPT_OK, ())
        elif isinstance(e, ev.FetchRequested):
            got = self.receivers.get(e.fetch.sid)
            if got is None:
                srv.reject_fetch(m.ACCEPT_FAILURE)
                return
            rcv, req = got
            nxt = self.next_seqno.get(e.fetch.sid)
            recs = fetch_records(rcv, e.fetch.begin_seq, e.fetch.end_seq, nxt)
            # Bounded by what arrived plus what the session was asked to send (RFC 4656 §3.8).
            assert len(recs) <= len(rcv.records) + req.num_packets, len(recs)
            srv.send_fetch_response(m.FetchAck(m.ACCEPT_OK, nxt is not None, nxt if nxt is not None else
                                               req.num_packets, 0, len(recs)), req, (), recs)
        elif isinstance(e, ev.StartNRequested):
            srv.start_n_ack((0, 1)[self.pick(2)], e.msg.sids)
        elif isinstance(e, ev.StopNRequested):
            srv.stop_n_ack((0, 1)[self.pick(2)], e.msg.sids)


def _setup(twamp: bool, isc: bool, r: Reader | None):
    from agent.control import messages as m
    from agent.control.modes import Mode

    srv = _server(twamp, isc)
    app = _App(srv, r)
    app.drain()  # the greeting
    mode = int(Mode.UNAUTHENTICATED | (Mode.INDIVIDUAL_SESSION_CONTROL if isc else 0))
    app.feed(m.SetUpResponse(mode).pack())
    return srv, app


def server_stream(data: bytes) -> None:
    """The control server fed arbitrary byte streams, before and after a valid set-up: it
    never raises, answers only what it was asked, and closes on garbage."""
    if not data:
        return
    sel, body = data[0], data[1:]
    twamp, isc = bool(sel & 1), bool(sel & 2)
    if sel & 4:
        srv, app = _setup(twamp, isc, None)
    else:
        srv = _server(twamp, isc)
        app = _App(srv, None)
        app.drain()
    step = (1, 3, 16, 61, 500, 1 << 16)[(sel >> 3) % 6]  # TCP cuts the stream anywhere
    for i in range(0, len(body), step):
        if srv.closed:
            break
        app.feed(body[i:i + step])


_PREAMBLE = struct.Struct("!BBBBIIHH16s16s16sIQQI8s16s")  # RFC 4656 §3.5: 112 octets


def _request(r: Reader, twamp: bool, sids: list[bytes]) -> bytes:
    """A Request-(TW-)Session with valid framing and arbitrary field values."""
    flags = r.u8()
    ipvn = r.u8() if flags & 3 == 3 else (4, 6, 4)[flags & 3]  # mostly valid IPVN, sometimes anything
    addr = lambda: r.take(16) if flags & 8 else (bytes(16) if flags & 16 else LO.packed + bytes(12))  # noqa: E731
    nslots = 0 if twamp else 1 + r.u8() % 3
    cs = r.u8() % 3 if flags & 32 else (1 if flags & 64 else 0)
    cr = (1 - cs) if cs < 2 and not flags & 128 else r.u8() % 3
    sid = sids[r.u8() % len(sids)] if sids and flags & 4 else r.take(16)
    mbz = r.take(8)
    pre = _PREAMBLE.pack(5 if twamp else 1, ipvn, 0 if twamp else cs, 0 if twamp else cr, nslots,
                         0 if twamp else r.u32(), r.u16(), r.u16(), addr(), addr(), sid,
                         r.u32() % 20000 if r.u8() & 1 else r.u32(), r.u64() if r.u8() & 1 else 0,
                         r.u64(), r.u32() if r.u8() & 1 else (r.u8() % 64) << 24, mbz, bytes(16))
    slots = b"".join(struct.pack("!B7sQ", r.u8() % 3, bytes(7), r.u64()) for _ in range(nslots))
    return pre + slots + (bytes(16) if nslots else b"")


def server_session(data: bytes) -> None:
    """Whole conversations with arbitrary field values: Request-Session / Request-TW-Session,
    Start-Sessions, test packets into the OWAMP receiver, Stop-Sessions (with any Next
    Seqno), Fetch-Session (any range), Start-N/Stop-N (RFC 5938), garbage in between."""
    from agent.control import messages as m
    from agent.engine import packets as pk

    if not data:
        return
    r = Reader(data)
    sel = r.u8()
    twamp, isc = bool(sel & 1), bool(sel & 2)
    srv, app = _setup(twamp, isc, r)
    sids: list[bytes] = []
    for _ in range(64):
        if srv.closed or not r.left():
            break
        op = r.u8() % 8
        sids = list(srv.sessions) + list(app.receivers)
        if op in (0, 1):
            app.feed(_request(r, twamp, sids))
        elif op == 2:
            app.feed(struct.pack("!B15s16s", 2, r.take(15) if r.u8() & 1 else bytes(15), bytes(16)))
        elif op == 3:
            if twamp:
                app.feed(struct.pack("!BBHI8s16s", 3, r.u8() % 7, 0, r.u32() if r.u8() & 1 else len(sids),
                                     bytes(8), bytes(16)))
            else:
                n = r.u8() % 4
                # SID, Next Seqno, no skip ranges, padded to a 16-octet block (RFC 4656 §3.8)
                descs = b"".join(struct.pack("!16sII8s", sids[r.u8() % len(sids)] if sids else r.take(16),
                                             r.u32(), 0, bytes(8)) for _ in range(n))
                app.feed(struct.pack("!BBHI8s", 3, r.u8() % 7, 0, n, bytes(8)) + descs + bytes(16))
        elif op == 4:
            sid = sids[r.u8() % len(sids)] if sids and r.u8() & 1 else r.take(16)
            begin, end = (0, 0xFFFFFFFF) if r.u8() & 1 else (r.u32(), r.u32())
            app.feed(struct.pack("!B7sII16s16s", 4, bytes(7), begin, end, sid, bytes(16)))
        elif op == 5 and app.receivers:
            rcv, req = list(app.receivers.values())[r.u8() % len(app.receivers)]
            for _ in range(r.u8() % 8):
                pkt = pk.encode_sender(pk.SenderPacket(r.u32() % (req.num_packets + 2), r.u64(), r.u16()),
                                       pk.Proto.OWAMP, pk.Security.UNAUTH)
                rcv.on_packet(pkt + r.take(r.u8() % 16), 1_700_000_000_000_000_000, 64)
        elif op == 6 and isc:
            n = 1 + r.u8() % 3
            chosen = tuple(sids[r.u8() % len(sids)] if sids and r.u8() & 1 else r.take(16) for _ in range(n))
            cls = m.StartNSessions if r.u8() & 1 else m.StopNSessions
            app.feed(cls(chosen).pack())
        else:
            app.feed(r.take(r.u8() % 48))


# --------------------------------------------------------------------------- config and key files


def config(data: bytes) -> None:
    """The agent's TOML configuration (agent/daemon/config.py): ConfigError is the only
    refusal, in one line."""
    from agent.daemon import config as cfg

    try:
        cfg.loads(data, "fuzz.toml")
    except cfg.ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 400, str(e)


def keyfile(data: bytes) -> None:
    """Key file parsers: passphrase files (xwamp and perfSONAR .pfs), the STAMP key file,
    the IKE key file's JSON entries. Their refusals only, naming no secret."""
    import json

    from agent.binder.keysource import KeySourceError, parse_entries
    from agent.control.keyring import KeyFileError, parse_hmac_key, parse_passphrases

    if not data:
        return
    sel, body = data[0] % 4, data[1:]
    try:
        if sel < 2:
            entries = parse_passphrases(body, "k", "pfs" if sel else "xwamp")
            assert all(len(k.encode()) <= 80 for k in entries)
        elif sel == 2:
            assert parse_hmac_key(body, "k")
        else:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                return
            parse_entries(doc)
    except (KeyFileError, KeySourceError) as e:
        assert "\n" not in str(e)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "control_messages": control_messages,
    "test_packets": test_packets,
    "stamp_tlv": stamp_tlv,
    "netlink_xfrm": netlink_xfrm,
    "server_stream": server_stream,
    "server_session": server_session,
    "config": config,
    "keyfile": keyfile,
}

# What each target's code lives in: atheris instruments these for coverage.
INSTRUMENT = ("agent.control", "agent.engine", "agent.daemon.config", "agent.commands.reflect",
              "agent.binder.keysource", "agent.sessions.session", "netlink", "tomllib")
