"""asyncio UDP adapters for the sans-IO test engine.

API for the control plane (agent/control, agent/commands/{ping,owping,server}.py)::

    # Session-Reflector side (TWAMP server): one UDP port, one or more sessions.
    ep = TwampReflectorEndpoint(("::", 0))              # or ("0.0.0.0", 862); port 0 = any
    await ep.start()
    port = ep.port                                      # put it in Accept-Session
    ep.add_session(sid, peer=("192.0.2.7", 50000), mode=MODE_AUTHENTICATED, keys=test_keys)
    ...                                                 # Start-Sessions .. Stop-Sessions
    counters = ep.remove_session(sid); ep.close()

    # STAMP / TWAMP-Light reflector: a default session answers every peer.
    ep = TwampReflectorEndpoint(("::", 862), default=ReflectorSession(Proto.STAMP))

    # OWAMP receiver (OWAMP server side): records arrivals for Fetch-Session.
    ep = OwampReceiverEndpoint(("::", 0)); await ep.start()
    rcv = ep.add_session(sid, peer=(addr, port), mode=MODE_ENCRYPTED, keys=k, expected=n)
    ... rcv.fetch_records(begin, end, next_seqno)

    # Session-Sender (twping / owping client side): returns one record per packet.
    records = await run_twamp_sender(local=("0.0.0.0", 0), remote=(addr, port),
                                     mode=MODE_UNAUTHENTICATED, keys=None, count=100,
                                     interval=0.1, schedule="poisson", padding=None,
                                     dscp=0, timeout=2.0)
    summary = agent.sessions.results.summarize(records)

Sockets are non-blocking and read in batches until EAGAIN (the reflector, once a wakeup finds a
queue, with recvmmsg/sendmmsg: agent.engine.mmsg); the kernel RX stamp
(SO_TIMESTAMPING via agent.engine.timestamping, hardware where the NIC stamps), the
received TTL / Hop Limit and (optionally) TOS come from recvmsg's ancillary data.
T3 must be in a reply before it is sent, so the reflector writes it as late as it can and
asks TX stamps of some replies only: every reply to a sender that asks for RFC 8972
Follow-Up Telemetry (the real T3, sent in the next reply) and one sample per ms otherwise
(the lag that widens the Error Estimate), requested per reply with an SO_TIMESTAMPING
control message. The sender asks for TX stamps of every packet and stores them as T1 kernel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
import errno
import logging
import socket
import struct
import time
from typing import Any, Callable, Hashable, Iterable

from agent.engine import mmsg as _mmsg
from agent.engine import timestamping as ts
from agent.engine import tlv as _tlv
from agent.engine.clock import STAMP_COUNTERS, StampCounters
from agent.engine.followup import ReplyTxStamps, T3Patch
from agent.engine.keys import TestKeys
from agent.engine.packets import (
    MODE_PTP_TIMESTAMPS,
    MODE_REFLECT_OCTETS,
    MODE_UNAUTHENTICATED,
    Proto,
    Security,
    reflect_offset,
    security_from_mode,
)
from agent.engine.receiver import OwampReceiver
from agent.engine.reflector import LATE_T3, ReflectorSession
from agent.engine.sender import PacketRecord, Schedule, TestSender
from netlink.secret import Secret

log = logging.getLogger(__name__)

DEFAULT_PORT = 862  # RFC 8545 (TWAMP test / STAMP); OWAMP-Test uses 861
RECV_BUF = 9216
IP_TOS = 1
IP_RECVTOS = 13
IPV6_RECVTCLASS = 66
IPV6_TCLASS = 67
_SOL_IP = socket.IPPROTO_IP
_SOL_IPV6 = socket.IPPROTO_IPV6
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_TS = ts.SCM_TIMESTAMPING
_TS3 = struct.Struct("=qq")
_INT = struct.Struct("=i")
_U32 = struct.Struct("=I")
TX_SAMPLE_NS = 1_000_000  # the reflector's TX stamps beyond Follow-Up askers: one reply per ms at most
_TX_BITS = ts.SOF_TIMESTAMPING_TX_HARDWARE | ts.SOF_TIMESTAMPING_TX_SOFTWARE
_REPLY_TX_COUNTERS = StampCounters()  # the reflector's reply TX stamps (agent.engine.followup), by source
_ERRQ_FLAGS = socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT
_TS64 = struct.Struct("=qqqqqq").unpack_from  # struct scm_timestamping, 64-bit ABI
_EXT_ERR = struct.Struct("=IBBBBII").unpack_from  # struct sock_extended_err
_RECVERR = ((_SOL_IP, ts.IP_RECVERR), (_SOL_IPV6, ts.IPV6_RECVERR))
_ENOMSG, _ORIGIN_TS, _TSTAMP_SND = errno.ENOMSG, ts.SO_EE_ORIGIN_TIMESTAMPING, ts.SCM_TSTAMP_SND
_SEQ_AT0 = struct.Struct("!I").unpack_from
_SSID_AT = struct.Struct("!H").unpack_from
REPLY_TX_COUNTERS = _REPLY_TX_COUNTERS  # exported as xwamp_timestamps_total{direction="reply"}
MMSG_BATCH = 64  # datagrams per recvmmsg
# Replies per sendmmsg, all with the T3 of one clock read: the n-th leaves after the n-1 before it
# went through the stack (~2-5 us each on loopback), so this bounds the T3 lag under load
# (bench/reflector.py, "T3 lag": ~330 us p99 at 64, see docs/timestamping.md).
MMSG_SEND = 16
_NO_PATCH = object()  # _flush: before the first reply's T3Patch
# A reply waiting in its send slot: (slot, T3Patch to write T3 at the flush or None, address,
# length, TX-stamp stream or None, the T3 it carries already (ns) or None).
_Pending = tuple[int, T3Patch | None, tuple, int, Hashable, int | None]
MAX_ADDR_CACHE = 4096  # raw sockaddr -> (peer key, address) entries kept (spoofed sources: cleared when full)
_SA_FAMILY = struct.Struct("=H").unpack_from  # sa_family_t at the start of every sockaddr
_T3_AT = struct.Struct("!Q")
# The batched path's control messages in the kernel's order (__sock_recv_timestamp, then
# ip_cmsg_recv / ip6_datagram_recv_ctl): SCM_TIMESTAMPING (64-bit struct scm_timestamping),
# IP_TTL / IPV6_HOPLIMIT (int), then IP_TOS (1 octet) / IPV6_TCLASS (int) when asked; LP64 layout.
_CM2_LEN = socket.CMSG_SPACE(48) + socket.CMSG_SPACE(4)
_CM3_LEN = _CM2_LEN + socket.CMSG_SPACE(4)
# Each cmsg is told by (cmsg_level, cmsg_type) read as one native u64; its length follows from
# its type (put_cmsg of a fixed-size value), and the total is checked against the expected one.
_CM_TS_TTL = struct.Struct("=8xQqq32x8xQi")  # (level, type), sec, nsec; (level, type), TTL
_CM_TS_TTL_TOS = struct.Struct("=8xQqq32x8xQi4x8xQB")  # ... then (level, type), TOS (its first octet)
_CM3_TOS_AT = _CM2_LEN + socket.CMSG_LEN(0)


def _cm_kind(level: int, ctype: int) -> int:
    """cmsg_level and cmsg_type as the one native u64 the batched path reads."""
    return struct.unpack("=Q", struct.pack("=ii", level, ctype))[0]


_K_TS = _cm_kind(_SOL_SOCKET, _SCM_TS)
_K_TTL, _K_HOPLIMIT = _cm_kind(_SOL_IP, 2), _cm_kind(_SOL_IPV6, 52)  # IP_TTL, IPV6_HOPLIMIT
_K_TOS, _K_TCLASS = _cm_kind(_SOL_IP, IP_TOS), _cm_kind(_SOL_IPV6, IPV6_TCLASS)  # 1 octet; an int
_CMSG_HDR = struct.Struct("=" + ("Q" if struct.calcsize("P") == 8 else "I") + "ii")
_CMSG_ALIGN = struct.calcsize("P") - 1


_MMSG_LOGGED: list[bool] = []


def _no_mmsg_once(e: BaseException | None = None) -> None:
    """One log line per process, however many endpoints fall back."""
    if not _MMSG_LOGGED:
        _MMSG_LOGGED.append(True)
        log.info("reflector: no recvmmsg/sendmmsg (%s): one recvmsg and sendto per packet",
                 e if e is not None else "not in libc")


def _cmsgs(buf: memoryview, off: int, length: int) -> list[tuple[int, int, bytes]]:
    """The control messages in ``buf[off:off+length]`` as socket.recvmsg lists them."""
    anc = []
    end, hl = off + length, _CMSG_HDR.size
    p = off
    while p + hl <= end:
        ln, level, ctype = _CMSG_HDR.unpack_from(buf, p)
        if ln < hl:
            break
        anc.append((level, ctype, bytes(buf[p + hl : min(p + ln, end)])))
        p += (ln + _CMSG_ALIGN) & ~_CMSG_ALIGN
    return anc


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def peer_key(addr: tuple) -> tuple[str, int]:
    """(host, port) with IPv4-mapped IPv6 addresses folded to plain IPv4."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


TEST_TTL = 255


def set_test_ttl(s: socket.socket, fam: int) -> None:
    """TTL / Hop Limit 255 on every test packet. RFC 4656 §4.1.2: "The sender SHOULD set the
    TTL in IPv4 (or Hop Limit in IPv6) in the UDP packet to 255"; peers report hops as
    255 - TTL (RFC 5357's Sender TTL field carries what the reflector received; its text
    was not reachable here). A dual-stack socket sends v4-mapped traffic with IP_TTL."""
    opts = [(_SOL_IP, socket.IP_TTL)]
    if fam == socket.AF_INET6:
        opts.append((_SOL_IPV6, socket.IPV6_UNICAST_HOPS))
    for level, opt in opts:
        try:
            s.setsockopt(level, opt, TEST_TTL)
        except OSError:
            pass  # an IPv6-only socket has no IPv4 TTL


def open_udp_socket(local: tuple[str, int], *, family: int | None = None, dscp: int | None = None,
                    rcvbuf: int = 1 << 21, sndbuf: int = 1 << 21) -> socket.socket:
    """A non-blocking UDP socket bound to ``local`` (dual-stack when bound to '::')."""
    host = local[0] or "::"
    fam = family or _family_of(host)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET6:
            s.setsockopt(_SOL_IPV6, socket.IPV6_V6ONLY, 0 if host in ("::", "") else 1)
        # Bursts (and a busy shared CPU) must not overflow the queue: ask past rmem_max when
        # privileged (SO_*BUFFORCE), else as much as the sysctl allows.
        for force, opt, val in ((33, socket.SO_RCVBUF, rcvbuf), (32, socket.SO_SNDBUF, sndbuf)):
            try:
                s.setsockopt(_SOL_SOCKET, force, val)
            except OSError:
                try:
                    s.setsockopt(_SOL_SOCKET, opt, val)
                except OSError:
                    pass
        if dscp is not None:
            set_dscp(s, dscp)
        set_test_ttl(s, fam)
        s.bind((host, local[1]))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def set_dscp(sock: socket.socket, dscp: int, ecn: int = 0) -> None:
    tos = ((dscp & 0x3F) << 2) | (ecn & 3)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(_SOL_IPV6, IPV6_TCLASS, tos)
        try:  # v4-mapped peers on a dual-stack socket
            sock.setsockopt(_SOL_IP, IP_TOS, tos)
        except OSError:
            pass
    else:
        sock.setsockopt(_SOL_IP, IP_TOS, tos)


def enable_recv_tos(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(_SOL_IPV6, IPV6_RECVTCLASS, 1)
        try:
            sock.setsockopt(_SOL_IP, IP_RECVTOS, 1)
        except OSError:
            pass
    else:
        sock.setsockopt(_SOL_IP, IP_RECVTOS, 1)


def decode_ancillary(anc: list, hw_config: ts.TimestampingConfig | None) -> tuple[int | None, str, int | None, int | None]:
    """(RX ns or None, source, TTL, TOS) of one recvmsg.

    The software-only case is decoded inline (one pass, no allocation beyond the
    tuples); with hardware stamps configured, agent.engine.timestamping.rx_stamp converts
    the PHC time.
    """
    rx = ttl = tos = None
    src = "sw"
    for level, ctype, data in anc:
        if level == _SOL_SOCKET:
            if ctype == _SCM_TS and len(data) >= 16 and rx is None:
                sec, nsec = _TS3.unpack_from(data)
                if sec > 0 and 0 <= nsec < 1_000_000_000:
                    rx = sec * 1_000_000_000 + nsec
        elif level == _SOL_IP:
            if ctype == 2 and data:  # IP_TTL
                ttl = _INT.unpack_from(data)[0] if len(data) >= 4 else data[0]
            elif ctype == IP_TOS and data:
                tos = data[0]
        elif level == _SOL_IPV6:
            if ctype == 52 and len(data) >= 4:  # IPV6_HOPLIMIT
                ttl = _INT.unpack_from(data)[0]
            elif ctype == IPV6_TCLASS and len(data) >= 4:
                tos = _INT.unpack_from(data)[0] & 0xFF
    if hw_config is not None and hw_config.raw_hardware:
        st = ts.rx_stamp(anc, config=hw_config)
        if st is not None:
            return st.ns, st.source.value, ttl, tos
    return rx, src, ttl, tos


class _RateLimitedLog:
    """Logs counter deltas of dropped packets at most every ``interval`` seconds."""

    def __init__(self, name: str, interval: float = 10.0) -> None:
        self.name = name
        self.interval = interval
        self._last = 0.0
        self._prev: dict[str, int] = {}

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def maybe(self, counters: dict[str, int], what: Iterable[str]) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        # .get: an endpoint with no session (or none of that kind) lacks e.g. "bad_hmac"
        delta = {k: d for k in what if (d := counters.get(k, 0) - self._prev.get(k, 0))}
        if delta:
            log.warning("%s: dropped test packets in the last %.0f s: %s", self.name, now - self._last if self._last else 0, delta)
            self._prev = dict(counters)
            self._last = now


class _DatagramEndpoint:
    """Shared socket handling: batch reads until EAGAIN, ancillary decoding, session lookup."""

    def __init__(self, local_addr: tuple[str, int], *, iface: str | None = None, hardware: bool = True,
                 recv_tos: bool = False, batch: int = 512, log_interval: float = 10.0) -> None:
        self.local_addr = local_addr
        self.iface = iface
        self.hardware = hardware
        self.recv_tos = recv_tos
        self.batch = batch
        self.sock: socket.socket | None = None
        self.ts_config: ts.TimestampingConfig | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_peer: dict[tuple[str, int], Hashable] = {}
        self._by_host: dict[str, list[Hashable]] = {}
        self._sessions: dict[Hashable, Any] = {}
        self.unknown_peer = 0
        self.send_errors = 0
        self.want_tx = False  # keep TX stamps on (the reflector's replies: agent.engine.followup)
        self._rl = _RateLimitedLog(type(self).__name__, log_interval)

    @property
    def port(self) -> int:
        assert self.sock is not None
        return self.sock.getsockname()[1]

    def _configure(self, sock: socket.socket) -> None:
        try:
            cfg = ts.enable_timestamping(sock, self.iface, self.hardware)
            # RX only unless asked: a reflector keeping its replies' TX stamps (Follow-Up Telemetry,
            # lag of T3) reads them back from the error queue; anyone else would only fill it.
            sock.setsockopt(_SOL_SOCKET, ts.SO_TIMESTAMPING, cfg.flags if self.want_tx else cfg.flags & ~_TX_BITS)
            self.ts_config = cfg
        except (OSError, ts.UnsupportedArchitecture) as e:
            log.info("no kernel timestamps on the test socket (%s): user-space stamps", e)
        try:
            ts.enable_recv_ttl(sock)
        except OSError as e:
            log.info("no received TTL (%s)", e)
        if self.recv_tos:
            try:
                enable_recv_tos(sock)
            except OSError as e:
                log.info("no received TOS (%s)", e)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = open_udp_socket(self.local_addr)
        self._configure(self.sock)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def __aenter__(self) -> "_DatagramEndpoint":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _register(self, sid: Hashable, peer: tuple[str, int] | None, handler: Any) -> None:
        self._sessions[sid] = handler
        if peer is not None:
            key = peer_key(peer)
            if key[1]:
                self._by_peer[key] = sid
            self._by_host.setdefault(key[0], []).append(sid)

    def _unregister(self, sid: Hashable) -> Any:
        h = self._sessions.pop(sid, None)
        for k in [k for k, v in self._by_peer.items() if v == sid]:
            del self._by_peer[k]
        for host, sids in list(self._by_host.items()):
            if sid in sids:
                sids.remove(sid)
                if not sids:
                    del self._by_host[host]
        return h

    def _lookup(self, key: tuple[str, int]) -> Any:
        sid = self._by_peer.get(key)
        if sid is None:
            sids = self._by_host.get(key[0])
            if sids and len(sids) == 1:  # the sender port was 0/unknown in the request
                sid = sids[0]
                self._by_peer[key] = sid
        return self._sessions.get(sid) if sid is not None else None

    def _on_readable(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class TwampReflectorEndpoint(_DatagramEndpoint):
    """Session-Reflector on one UDP port: per-peer TWAMP sessions and/or a default (STAMP/Light) session."""

    def __init__(self, local_addr: tuple[str, int] = ("::", DEFAULT_PORT), *, default: ReflectorSession | None = None,
                 iface: str | None = None, hardware: bool = True, recv_tos: bool | None = None, batch: int = 512,
                 log_interval: float = 10.0, now_ns: Callable[[], int] = time.time_ns, tx_stamps: bool = True,
                 late_t3: bool = True, tx_sample_ns: int = TX_SAMPLE_NS, mmsg: bool = True) -> None:
        """``tx_stamps``: keep replies' kernel TX stamps (Follow-Up Telemetry for STAMP senders
        that ask, RFC 8972 §4.7; the T3 lag histogram). ``late_t3``: build each reply completely,
        then read the clock and write only T3, where no HMAC/cipher covers it (docs/timestamping.md);
        False reads the clock inside the reflector, before the last steps (the old path).

        ``tx_sample_ns``: which replies are stamped. Every reply of a session whose sender asked
        for Follow-Up Telemetry, and one other reply per ``tx_sample_ns`` of receive time (the lag
        histogram and the Error Estimate's lag bound need a sample, not every reply); each stamp
        costs a recvmsg on the error queue, about as much as answering. 0: every reply.

        ``mmsg``: under load (more than one packet queued at a wakeup) receive with recvmmsg(2)
        and answer with sendmmsg(2) (agent.engine.mmsg); False keeps recvmsg/sendto per packet."""
        if recv_tos is None:
            recv_tos = default is not None and default.proto is Proto.STAMP  # CoS TLV needs it
        super().__init__(local_addr, iface=iface, hardware=hardware, recv_tos=recv_tos, batch=batch,
                         log_interval=log_interval)
        self.default = default
        self.now_ns = now_ns
        self.want_tx = tx_stamps
        self.tx: ReplyTxStamps | None = ReplyTxStamps() if tx_stamps else None
        self.late_t3 = late_t3
        self._patches: dict[int, tuple[ReflectorSession, T3Patch]] = {}
        self.tx_sample_ns = tx_sample_ns
        self._tx_anc: list[tuple[int, int, bytes]] | None = None  # per-reply TX stamp request (cmsg)
        self._tx_at = -(1 << 62)  # receive time of the last packet whose reply was stamped
        self.mmsg = mmsg and _mmsg.available()
        if mmsg and not self.mmsg:
            _no_mmsg_once()
        self._mb: _mmsg.MmsgBuffers | None = None  # allocated at the first wakeup with a queue
        self._addrs: dict[bytes, tuple[tuple, tuple]] = {}  # raw sockaddr -> (peer key, address)
        self.truncated = 0  # longer than RECV_BUF (MSG_TRUNC): dropped
        self.ctrunc = 0  # control messages cut short (MSG_CTRUNC): answered with what arrived
        self.bad_address = 0  # a source that is not AF_INET / AF_INET6 (batched path)
        self.batched = 0  # replies sent by sendmmsg
        self._queued = False  # the last wakeup found more than one packet: recvmmsg first
        self._tx_ok = False  # a per-packet TX stamp request went through (_send_stamped)
        self.mmsg_send = MMSG_SEND

    def _configure(self, sock: socket.socket) -> None:
        super()._configure(sock)
        self._configure_tx(sock)

    def _configure_tx(self, sock: socket.socket) -> None:
        cfg = self.ts_config
        if self.tx is None or cfg is None or not self.tx_sample_ns or not cfg.flags & _TX_BITS:
            return
        # TX stamps asked per reply: SO_TIMESTAMPING as a sendmsg control message overrides the TX
        # recording flags for that one write, "to sample timestamps for each write" (kernel commit
        # c14ac945, Linux 4.7; Documentation/networking/timestamping §1.3.4); reporting flags and
        # OPT_ID stay on the socket, and OPT_ID keys then count the stamped packets only. So while
        # _tx_anc is set nothing may put TX bits back on this socket: ReplyTxStamps.sent() is called
        # for the stamped replies only, and every later key would name the wrong reply.
        try:
            sock.setsockopt(_SOL_SOCKET, ts.SO_TIMESTAMPING, cfg.flags & ~_TX_BITS)
        except OSError:
            return  # keep the socket-wide TX stamps: every reply
        self._tx_anc = [(_SOL_SOCKET, ts.SO_TIMESTAMPING, _U32.pack(cfg.flags & _TX_BITS))]

    def _send_stamped(self, sock: socket.socket, out: bytes | bytearray, addr: tuple, dscp: int | None) -> None:
        anc = self._tx_anc
        if anc is not None:
            try:
                sock.sendmsg([out], anc if dscp is None else anc + [self._dscp_cmsg(sock, addr, dscp)], 0, addr)
                self._tx_ok = True  # the kernel takes per-packet requests: sendmmsg may carry them too
                return
            except OSError as e:
                if e.errno != errno.EINVAL or self.ts_config is None:
                    raise
                # A kernel without per-packet requests: TX stamps on the socket, for every reply.
                log.info("no per-packet TX stamp requests (%s): every reply is stamped", e)
                sock.setsockopt(_SOL_SOCKET, ts.SO_TIMESTAMPING, self.ts_config.flags)
                self._tx_anc = None
        if dscp is None:
            sock.sendto(out, addr)
        else:
            self._send_with_dscp(sock, out, addr, dscp)

    def add_session(self, sid: Hashable, peer: tuple[str, int] | None, mode: int = MODE_UNAUTHENTICATED,
                    keys: TestKeys | None = None, *, proto: Proto = Proto.TWAMP, ptp: bool = False,
                    error_estimate=None, reflector_auth_span: int = 16, dscp: int | None = None,
                    padding: int | None = None, stamp_key: Secret | None = None,
                    stateful: bool = True, reflect_length: int = 0) -> ReflectorSession:
        """A TWAMP session from Request-TW-Session: ``mode`` is the negotiated Modes word
        (RFC 5618 mixed → unauthenticated test packets); ``peer`` the sender's (address, port),
        port 0 when unknown; ``dscp`` the Type-P Descriptor's DSCP for the replies.
        ``padding`` needs nothing here: the reflector answers at the sender's size.
        ``reflect_length``: RFC 6038 Length of padding to reflect (``mode`` must hold bit 32)."""
        del padding
        reflect = reflect_offset(mode, proto) if reflect_length and mode & MODE_REFLECT_OCTETS else None
        # RFC 8186: a negotiated PTPv2 mode bit means PTP timestamps (and Z = 1) in every reply.
        ptp = ptp or (proto is Proto.TWAMP and bool(mode & MODE_PTP_TIMESTAMPS))
        sess = ReflectorSession(proto, security_from_mode(mode), keys=keys, stamp_key=stamp_key, stateful=stateful,
                                ptp=ptp, error_estimate=error_estimate, reflector_auth_span=reflector_auth_span,
                                dscp=dscp, reflect=None if reflect is None else (reflect, reflect_length))
        self._register(sid, peer, sess)
        return sess

    def remove_session(self, sid: Hashable) -> dict[str, int] | None:
        sess = self._unregister(sid)
        self._patches.pop(id(sess), None)
        return sess.counters.as_dict() if isinstance(sess, ReflectorSession) else None

    def _patch_for(self, sess: ReflectorSession) -> T3Patch:
        got = self._patches.get(id(sess))
        if got is None or got[0] is not sess:
            tc = getattr(sess, "_tcrypto", None)
            p = T3Patch.for_session(sess.proto, sess.security, sess.ptp, getattr(tc, "reflector_span", 16))
            if not self.late_t3:
                p.offset = None
            got = (sess, p)
            self._patches[id(sess)] = got
            if self.tx is not None and sess.proto is Proto.STAMP:
                sess.follow_up = self.tx.follow_up  # RFC 8972 §4.7 answers from our kept TX stamps
        return got[1]

    def _drain_tx(self) -> None:
        """The kernel's TX stamps of our replies (error queue), before the next replies are built."""
        tx, sock = self.tx, self.sock
        if tx is None or sock is None or self.ts_config is None:
            return
        # Own counters: xwamp_timestamps_total{direction="tx"} stays the stamps of test packets' T1.
        cfg = self.ts_config
        on_stamp = tx.on_stamp
        if cfg.hardware_tx or not ts._LP64:  # PHC conversion and fallback counting: the general decoder
            for key, stamp in ts.drain_tx_stamps(sock, config=cfg, counters=_REPLY_TX_COUNTERS):
                on_stamp(key, stamp.ns, stamp.source.value)
            return
        # Software TX stamps, one per reply: a recvmsg each, so the decode is inlined for the
        # common message (SCM_TIMESTAMPING with only the software slot set, and the
        # IP(V6)_RECVERR sock_extended_err whose ee_data is the OPT_ID key); anything else
        # goes to timestamping.decode_tx_message, which decides.
        recvmsg = sock.recvmsg
        counters = _REPLY_TX_COUNTERS
        for _ in range(4096):
            try:
                _data, anc, _flags, _addr = recvmsg(64, ts.ANCILLARY_BUFSIZE, _ERRQ_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            key = sw = None
            for level, ctype, cdata in anc:
                if level == _SOL_SOCKET and ctype == _SCM_TS and len(cdata) >= 48:
                    s0, n0, _s1, _n1, s2, n2 = _TS64(cdata)
                    if s2 or n2 or s0 <= 0 or not 0 <= n0 < 1_000_000_000:
                        break
                    sw = s0 * 1_000_000_000 + n0
                elif (level, ctype) in _RECVERR and len(cdata) >= 16:
                    ee_errno, origin, _t, _c, _p, info, ee_data = _EXT_ERR(cdata)
                    if ee_errno != _ENOMSG or origin != _ORIGIN_TS or info != _TSTAMP_SND:
                        break
                    key = ee_data
                else:
                    break
            else:
                if key is not None and sw is not None:
                    counters.tx_sw += 1
                    on_stamp(key, sw, "sw")
                    continue
            got = ts.decode_tx_message(anc, config=cfg, counters=counters)
            if got is not None:
                on_stamp(got[0], got[1].ns, got[1].source.value)

    def session(self, sid: Hashable) -> ReflectorSession | None:
        s = self._sessions.get(sid)
        return s if isinstance(s, ReflectorSession) else None

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {"unknown_peer": self.unknown_peer, "send_errors": self.send_errors}
        for k in ("truncated", "ctrunc", "bad_address"):  # only once seen: hostile or broken input
            if getattr(self, k, 0):
                total[k] = getattr(self, k)
        sessions = list(self._sessions.values()) + ([self.default] if self.default else [])
        for s in sessions:
            if isinstance(s, ReflectorSession):
                for k, v in s.counters.as_dict().items():
                    total[k] = total.get(k, 0) + v
        return total

    def _on_readable(self) -> None:
        # Batching pays only when packets queue up (bench/reflector.py: one packet per wakeup costs
        # ~0.7 us more through ctypes). So: per packet until a wakeup finds a second packet, then
        # recvmmsg/sendmmsg for the rest of it and for every later wakeup that still finds more
        # than one; buffers are allocated at the first queue (idle endpoints never hold them).
        if self._queued:
            mb = self._mb
            if mb is not None:
                self._queued = self._on_readable_batch(mb) > 1
                return
        if not self.mmsg:
            self._on_readable_single(self.batch)
        elif self._on_readable_single(2) == 2:
            mb = self._mb
            if mb is None:
                mb = self._mb = self._batch_buffers()
            if mb is not None:
                self._queued = True
                self._on_readable_batch(mb)
            else:
                self._on_readable_single(self.batch)

    def _on_readable_single(self, limit: int) -> int:
        """recvmsg and sendto per packet, up to ``limit`` packets; the packets received."""
        sock = self.sock
        if sock is None:
            return 0
        recvmsg, sendto = sock.recvmsg, sock.sendto
        cfg = self.ts_config
        hw = cfg if (cfg is not None and cfg.raw_hardware) else None
        now = self.now_ns
        default = self.default
        by_peer = self._by_peer
        sessions = self._sessions
        v6 = sock.family == socket.AF_INET6
        n_sw = n_user = 0
        tx = self.tx
        asking = tx.asking if tx is not None else {}
        if tx is not None:
            self._drain_tx()
        tx_anc, tx_at, every = self._tx_anc, self._tx_at, self.tx_sample_ns
        patches = self._patches
        last_sess: ReflectorSession | None = None
        # Set with last_sess: its T3Patch, its reflect function, whether T3 is written at send time.
        patch: T3Patch = None  # type: ignore[assignment]
        reflect: Callable[..., bytes | None] = None  # type: ignore[assignment]
        late_t3, late = False, LATE_T3
        for _ in range(limit):
            try:
                data, anc, _flags, addr = recvmsg(RECV_BUF, ts.ANCILLARY_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ECONNREFUSED from an ICMP error: keep reading
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                continue
            if _flags:
                if _flags & _mmsg.MSG_TRUNC:  # longer than any test packet we answer: dropped
                    self.truncated += 1
                    continue
                if _flags & _mmsg.MSG_CTRUNC:
                    self.ctrunc += 1
            # Inline of decode_ancillary() for the common software-stamp case (hot path).
            rx = ttl = tos = None
            src = "sw"
            for level, ctype, cdata in anc:
                if level == _SOL_SOCKET:
                    if ctype == _SCM_TS and len(cdata) >= 16 and rx is None:
                        sec, nsec = _TS3.unpack_from(cdata)
                        if sec > 0 and 0 <= nsec < 1_000_000_000:
                            rx = sec * 1_000_000_000 + nsec
                elif level == _SOL_IP:
                    if ctype == 2 and cdata:
                        ttl = _INT.unpack_from(cdata)[0] if len(cdata) >= 4 else cdata[0]
                    elif ctype == IP_TOS and cdata:
                        tos = cdata[0]
                elif len(cdata) >= 4:  # IPv6
                    if ctype == 52:
                        ttl = _INT.unpack_from(cdata)[0]
                    elif ctype == IPV6_TCLASS:
                        tos = _INT.unpack_from(cdata)[0] & 0xFF
            if hw is not None:
                st = ts.rx_stamp(anc, config=hw)
                if st is not None:
                    rx, src = st.ns, st.source.value
            if rx is None:
                rx, src = now(), "user"
                n_user += 1
            else:
                n_sw += 1
            key = peer_key(addr) if v6 else addr
            sess = sessions.get(by_peer.get(key)) if by_peer else None
            if sess is None:
                sess = self._lookup(key) if sessions else None
                if sess is None:
                    sess = default
                    if sess is None:
                        self.unknown_peer += 1
                        continue
            if sess is not last_sess:  # a batch is mostly one session's packets
                pe = patches.get(id(sess))
                patch = pe[1] if pe is not None and pe[0] is sess else self._patch_for(sess)
                last_sess, reflect, late_t3 = sess, sess.reflect, patch.offset is not None
            if not late_t3:
                out = reflect(data, rx, ttl, now, tos, key, src)
                if out is None:
                    continue
                t3 = patch.read_ns(out) if tx is not None else None
            else:
                # Everything first, the clock last: only T3 is written after the read (followup.T3Patch).
                out = reflect(data, rx, ttl, late, tos, key, src)
                if out is None:
                    continue
                out = bytearray(out)
                t3 = now()
                patch.patch(out, t3)
            dscp = sess.reply_dscp
            stamped = False
            # Socket-wide stamps (tx_anc None): every reply; else Follow-Up askers and a sample.
            if tx is not None and t3 is not None and (tx_anc is None or not 0 <= rx - tx_at < every or asking):
                a = patch.ssid_at  # T3Patch.ssid, inlined
                stream = (key, _SSID_AT(out, a)[0] if a is not None else 0)
                stamped = tx_anc is None or not 0 <= rx - tx_at < every or stream in asking
            try:
                if stamped:
                    self._send_stamped(sock, out, addr, dscp)
                    tx_anc, tx_at = self._tx_anc, rx
                elif dscp is None:
                    sendto(out, addr)
                else:
                    self._send_with_dscp(sock, out, addr, dscp)
            except OSError:
                self.send_errors += 1
            else:
                if stamped:  # the reply's Sequence Number, for the Follow-Up answer
                    tx.sent(stream, _SEQ_AT0(out)[0], t3)  # type: ignore[union-attr]
        self._tx_at = tx_at
        if n_sw and hw is None:  # with hardware stamps, agent.engine.timestamping.rx_stamp counted them
            STAMP_COUNTERS.add("rx", "sw", n_sw)
        if n_user:
            STAMP_COUNTERS.add("rx", "user", n_user)
        if tx is not None:
            self._drain_tx()  # the stamps of this batch's replies, if the kernel has them already
        if self._rl.due():
            self._log_drops()
        return n_sw + n_user

    def _log_drops(self) -> None:
        c = self.counters()
        if (c.get("bad_hmac") or c.get("short") or c.get("unknown_peer") or c.get("replayed") or c.get("tlv_over_cap")
                or c.get("truncated") or c.get("bad_address")):
            self._rl.maybe(c, ("bad_hmac", "short", "unknown_peer", "malformed_tlv", "replayed", "tlv_over_cap",
                               "truncated", "bad_address"))

   # ------------------------------------------------------------------ batched path (recvmmsg/sendmmsg)

    def _batch_buffers(self, ctl: int = ts.ANCILLARY_BUFSIZE) -> _mmsg.MmsgBuffers | None:
        sock = self.sock
        if sock is None:
            return None
        try:
            mb = _mmsg.MmsgBuffers(sock.fileno(), MMSG_BATCH, RECV_BUF, ctl, 28 if sock.family == socket.AF_INET6 else 16)
            if self._tx_anc is not None:  # the per-reply TX stamp request, for the stamped slots
                mb.set_send_cmsg(*self._tx_anc[0])
            return mb
        except (OSError, MemoryError, ValueError) as e:
            self._no_mmsg(e)
            return None

    def _no_mmsg(self, e: BaseException) -> None:
        self.mmsg = False
        self._mb = None
        self._queued = False
        _no_mmsg_once(e)

    def _addr_of(self, name: bytes) -> tuple[tuple, tuple] | None:
        """(peer key, address tuple as socket.recvmsg gives it) of a raw sockaddr; None for
        another family or a short one. Cached by the raw octets (bounded: spoofed sources)."""
        fam = _SA_FAMILY(name)[0] if len(name) >= 2 else -1
        if fam == socket.AF_INET and len(name) >= 8:
            addr: tuple = (socket.inet_ntop(socket.AF_INET, name[4:8]), _SSID_AT(name, 2)[0])
            key: tuple = addr
        elif fam == socket.AF_INET6 and len(name) >= 28:
            addr = (socket.inet_ntop(socket.AF_INET6, name[8:24]), _SSID_AT(name, 2)[0], _SEQ_AT0(name, 4)[0],
                    _U32.unpack_from(name, 24)[0])
            key = peer_key(addr)
        else:
            return None
        addrs = self._addrs
        if len(addrs) >= MAX_ADDR_CACHE:
            addrs.clear()
        got = addrs[name] = (key, addr)
        return got

    def _flush(self, mb: _mmsg.MmsgBuffers, pend: list[_Pending]) -> None:
        """Write one late T3 into every pending reply (_Pending: slot, T3Patch or None when T3 is
        in it already, address, length, TX-stamp stream or None, the T3 already in it or None),
        then sendmmsg them in runs of adjacent slots. A message the kernel refuses (ENOBUFS,
        EAGAIN, EPERM...) is counted in send_errors and the rest retried after it, as
        sendmmsg(2) asks; ENOSYS sends the rest one by one and falls back for good.

        A reply with a stream carries the per-packet SO_TIMESTAMPING request (its slot's cmsg);
        the kernel numbers the stamped datagrams it sends, in order (OPT_ID), so ReplyTxStamps.sent
        is called for those sent, in slot order, with the T3 they carry, as the per-packet path does."""
        t3 = self.now_ns()
        out, size, pack, last, v = mb.out, mb.size, _T3_AT.pack_into, _NO_PATCH, None
        sinfo, ctl_at, ctl_len, hdr = mb.sinfo, _mmsg.CTL_LEN_AT, _mmsg.CTL_LEN.pack_into, _mmsg.HDR
        stamped = 0
        for i, p, _a, _n, stream, _t in pend:
            if p is not last:
                v, last = p.value(t3) if p is not None else None, p
            if v is not None:  # (None: a reply whose T3 its HMAC covers, written already)
                pack(out, i * size + p.offset, v)  # type: ignore[operator, union-attr]
            if stream is not None:
                ctl_len(sinfo, i * hdr + ctl_at, _mmsg.SEND_CTL)
                stamped += 1
        send = mb.send
        failed: list[int] = []
        k, n = 0, len(pend)
        adjacent = pend[-1][0] - pend[0][0] == n - 1  # nothing dropped in between: one run
        while k < n:
            start = pend[k][0]
            if adjacent and not k:
                run = n
            else:
                run = 1
                while k + run < n and pend[k + run][0] == start + run:
                    run += 1
            first = k
            k += run
            while run:
                sent, err = send(start, run)
                if sent:
                    self.batched += sent
                    start += sent
                    run -= sent
                elif err == errno.ENOSYS:
                    self._no_mmsg(OSError(err, "sendmmsg"))
                    rest = pend[first + (start - pend[first][0]):]
                    failed.extend(e[0] for e in rest)
                    self._send_each(mb, rest)
                    k = n
                    break
                elif err != errno.EINTR:  # that reply is lost, counted; the kernel may take the next
                    self.send_errors += 1
                    failed.append(start)
                    start += 1
                    run -= 1
        if stamped:
            tx = self.tx
            for i, _p, _a, _n, stream, own in pend:
                if stream is not None:
                    ctl_len(sinfo, i * hdr + ctl_at, 0)
                    if tx is not None and i not in failed:  # the reply's Sequence Number, for Follow-Up
                        tx.sent(stream, _SEQ_AT0(out, i * size)[0], t3 if own is None else own)
        pend.clear()

    def _send_each(self, mb: _mmsg.MmsgBuffers, pend: list[_Pending]) -> None:
        """After sendmmsg's ENOSYS: the rest without TX stamp requests (their stamps are not kept)."""
        sock, out, size = self.sock, mb.out, mb.size
        for i, _p, addr, n, _s, _t in pend:
            try:
                if sock is None:
                    raise OSError(errno.EBADF, "closed")
                sock.sendto(out[i * size : i * size + n], addr)
            except OSError:
                self.send_errors += 1

    def _on_readable_batch(self, mb: _mmsg.MmsgBuffers) -> int:
        """The per-packet path's logic over recvmmsg batches. Replies whose T3 can be written last
        (T3Patch.offset), with no DSCP of their own and no TX stamp asked, are copied into send
        slots and go out in one sendmmsg after one clock read; the others flush what is pending
        (order kept) and take the per-packet send, TX-stamp bookkeeping unchanged."""
        sock = self.sock
        if sock is None:
            return 0
        cfg = self.ts_config
        hw = cfg if (cfg is not None and cfg.raw_hardware) else None
        fast = hw is None and ts._LP64
        # No TX stamp can come (no kernel stamps, or none on transmit): every reply may be batched.
        no_tx = self.tx is None or cfg is None or not cfg.flags & _TX_BITS
        now = self.now_ns
        default = self.default
        by_peer = self._by_peer
        sessions = self._sessions
        n_sw = n_user = 0
        tx = self.tx
        asking = tx.asking if tx is not None else {}
        if tx is not None:
            self._drain_tx()
        tx_anc, tx_at, every = self._tx_anc, self._tx_at, self.tx_sample_ns
        patches = self._patches
        last_sess: ReflectorSession | None = None
        # Set with last_sess: its T3Patch, its reflect function, whether T3 is written at send time.
        patch: T3Patch = None  # type: ignore[assignment]
        reflect: Callable[..., bytes | None] = None  # type: ignore[assignment]
        late_t3, late = False, LATE_T3
        info, dmv, cmv, nmv, omv, siov = mb.info, mb.data, mb.ctl, mb.names, mb.out, mb.siov
        unpack_info, size, csz, vlen, slots = _mmsg.INFO.unpack_from, mb.size, mb.ctl_size, mb.n, mb.slots
        iov_len = _mmsg.IOV_LEN.pack_into
        cm2, cm3 = _CM_TS_TTL.unpack_from, _CM_TS_TTL_TOS.unpack_from
        # Locals for the per-message checks (no global lookups in the loop); -1: never the fast decode.
        len2, len3 = (_CM2_LEN, _CM3_LEN) if fast else (-1, -1)
        k_ts, k_ttl, k_hop, k_tos, k_tclass = _K_TS, _K_TTL, _K_HOPLIMIT, _K_TOS, _K_TCLASS
        addrs = self._addrs
        send_max = max(1, self.mmsg_send)
        # Replies with T3 in already wait for the rest of their batch to be built (~4 µs each):
        # half the batch keeps their T3 lag near the late-T3 replies' (bench/reflector.py "T3 lag").
        send_early = max(1, send_max // 2)
        pend: list[_Pending] = []  # replies in send slots, in arrival order
        total = 0
        while total < self.batch:
            try:
                got = mb.recv()
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    self._no_mmsg(e)
                    break
                if e.errno == errno.EINTR:
                    continue
                total += 1  # e.g. ECONNREFUSED from an ICMP error: keep reading, bounded
                continue
            if not got:
                break
            total += got
            for i, h0, d0, c0, s0, v0 in (slots if got == vlen else slots[:got]):
                namelen, clen, flags, mlen = unpack_info(info, h0)
                if flags:
                    if flags & _mmsg.MSG_TRUNC:  # longer than any test packet we answer: dropped
                        self.truncated += 1
                        continue
                    if flags & _mmsg.MSG_CTRUNC:
                        self.ctrunc += 1
                data = dmv[d0 : d0 + mlen].tobytes()  # half the cost of bytes(view)
                # The common control messages in the kernel's order (SCM_TIMESTAMPING, then TTL /
                # Hop Limit, then TOS / Traffic Class) in one unpack; anything else: the general decode.
                if clen == len2:
                    k0, sec, nsec, k1, ttl = cm2(cmv, c0)
                    ok = k0 == k_ts and (k1 == k_ttl or k1 == k_hop)
                    tos = None
                elif clen == len3:
                    k0, sec, nsec, k1, ttl, k2, tos = cm3(cmv, c0)
                    ok = k0 == k_ts and (k1 == k_ttl or k1 == k_hop) and (k2 == k_tos or k2 == k_tclass)
                    if ok and k2 == k_tclass:
                        tos = _INT.unpack_from(cmv, c0 + _CM3_TOS_AT)[0] & 0xFF
                else:
                    ok = False
                if ok:
                    src = "sw"
                    rx = sec * 1_000_000_000 + nsec if sec > 0 and 0 <= nsec < 1_000_000_000 else None
                else:
                    rx, src, ttl, tos = decode_ancillary(_cmsgs(cmv, c0, min(clen, csz)), hw)
                if rx is None:
                    rx, src = now(), "user"
                    n_user += 1
                else:
                    n_sw += 1
                name = nmv[s0 : s0 + namelen].tobytes()
                ka = addrs.get(name)
                if ka is None:
                    ka = self._addr_of(name)
                    if ka is None:
                        self.bad_address += 1
                        continue
                key, addr = ka
                sess = sessions.get(by_peer.get(key)) if by_peer else None
                if sess is None:
                    sess = self._lookup(key) if sessions else None
                    if sess is None:
                        sess = default
                        if sess is None:
                            self.unknown_peer += 1
                            continue
                if sess is not last_sess:  # a batch is mostly one session's packets
                    pe = patches.get(id(sess))
                    patch = pe[1] if pe is not None and pe[0] is sess else self._patch_for(sess)
                    last_sess, reflect, late_t3 = sess, sess.reflect, patch.offset is not None
                # T3 written at the flush (late_t3), or read inside reflect where an HMAC or the
                # cipher covers it (authenticated STAMP, TWAMP's wider spans): then the reply waits
                # for the flush with its T3 already in, a lag the sampled TX stamps measure too.
                out = reflect(data, rx, ttl, late if late_t3 else now, tos, key, src)
                if out is None:
                    continue
                dscp = sess.reply_dscp
                # With the socket's DSCP: into the batch. A TX stamp (the per-packet path's test: a
                # sample, or a Follow-Up asker) rides on the slot's cmsg once the kernel has taken a
                # per-packet request (_tx_ok), matched with the T3 the reply carries; socket-wide
                # TX stamps (tx_anc None) would number every datagram: those go one by one.
                stream = None
                if dscp is not None or len(out) > size:
                    batch = False
                # (A sample is due once `every` has passed, or at once if receive time went back:
                # a clock stepped back, or a user-space time among kernel stamps, must not stop them.)
                elif no_tx or (0 <= rx - tx_at < every and not asking and tx_anc is not None):
                    batch = True  # the common case: no TX stamp due
                elif tx_anc is None:
                    batch = False
                else:
                    if not 0 <= rx - tx_at < every:
                        a = patch.ssid_at
                        stream = (key, _SSID_AT(out, a)[0] if a is not None else 0)
                    elif asking:
                        a = patch.ssid_at
                        stream = (key, _SSID_AT(out, a)[0] if a is not None else 0)
                        if stream not in asking:
                            stream = None
                    batch = stream is None or self._tx_ok
                    if batch and stream is not None:
                        tx_at = rx
                if batch:
                    own = None  # the T3 a reply carries already (not late_t3), for its TX stamp
                    if stream is not None and not late_t3:
                        own = patch.read_ns(out)
                        if own is None:  # enciphered: no T3 to match a stamp with
                            stream = None
                    n = len(out)
                    omv[d0 : d0 + n] = out
                    iov_len(siov, v0, n)
                    pend.append((i, patch if late_t3 else None, addr, n, stream, own))
                    if len(pend) >= (send_max if late_t3 else send_early):
                        self._flush(mb, pend)
                    continue
                if late_t3:
                    out = bytearray(out)
                    t3 = None  # read below, after the flush
                else:
                    t3 = patch.read_ns(out) if tx is not None else None
                if pend:
                    self._flush(mb, pend)  # replies leave in the order their requests came
                if late_t3:
                    t3 = now()
                    patch.patch(out, t3)  # type: ignore[arg-type]
                dscp = sess.reply_dscp
                stamped = False
                if tx is not None and t3 is not None and (tx_anc is None or not 0 <= rx - tx_at < every or asking):
                    a = patch.ssid_at  # T3Patch.ssid, inlined
                    stream = (key, _SSID_AT(out, a)[0] if a is not None else 0)
                    stamped = tx_anc is None or not 0 <= rx - tx_at < every or stream in asking
                try:
                    if stamped:
                        self._send_stamped(sock, out, addr, dscp)
                        tx_anc, tx_at = self._tx_anc, rx
                    elif dscp is None:
                        sock.sendto(out, addr)
                    else:
                        self._send_with_dscp(sock, out, addr, dscp)
                except OSError:
                    self.send_errors += 1
                else:
                    if stamped:  # the reply's Sequence Number, for the Follow-Up answer
                        tx.sent(stream, _SEQ_AT0(out)[0], t3)  # type: ignore[union-attr]
            if pend:
                self._flush(mb, pend)
            if got < vlen:  # the queue is empty (level-triggered: a later packet wakes us again)
                break
        self._tx_at = tx_at
        if n_sw and hw is None:
            STAMP_COUNTERS.add("rx", "sw", n_sw)
        if n_user:
            STAMP_COUNTERS.add("rx", "user", n_user)
        if tx is not None:
            self._drain_tx()
        if self._rl.due():
            self._log_drops()
        if not self.mmsg:  # ENOSYS: what is still queued goes the per-packet way
            self._on_readable_single(self.batch)
        return total

    @staticmethod
    def _dscp_cmsg(sock: socket.socket, addr: tuple, dscp: int) -> tuple[int, int, bytes]:
        tos = (dscp & 0x3F) << 2
        if sock.family == socket.AF_INET6 and not addr[0].startswith("::ffff:"):
            return (_SOL_IPV6, IPV6_TCLASS, _INT.pack(tos))
        return (_SOL_IP, IP_TOS, bytes((tos,)))

    @classmethod
    def _send_with_dscp(cls, sock: socket.socket, data: bytes | bytearray, addr: tuple, dscp: int) -> None:
        """RFC 8972 §4.4: the reflected packet carries the DSCP1 the sender asked for."""
        sock.sendmsg([data], [cls._dscp_cmsg(sock, addr, dscp)], 0, addr)


class OwampReceiverEndpoint(_DatagramEndpoint):
    """OWAMP-Test receiver on one UDP port; one :class:`OwampReceiver` per session."""

    def __init__(self, local_addr: tuple[str, int] = ("::", 0), *, iface: str | None = None, hardware: bool = True,
                 batch: int = 512, log_interval: float = 10.0, now_ns: Callable[[], int] = time.time_ns) -> None:
        super().__init__(local_addr, iface=iface, hardware=hardware, batch=batch, log_interval=log_interval)
        self.now_ns = now_ns

    def add_session(self, sid: Hashable, peer: tuple[str, int] | None, mode: int = MODE_UNAUTHENTICATED,
                    keys: TestKeys | None = None, *, expected: int | None = None, ptp: bool = False,
                    error_estimate=None, timeout_s: float | None = None, schedule: Schedule | None = None,
                    start_ns: int | None = None) -> OwampReceiver:
        """``timeout_s``, ``schedule``, ``start_ns``: the Request-Session's Timeout, §5 schedule
        and Start Time, for the RFC 4656 §4.2 validity tests (see :class:`OwampReceiver`)."""
        rcv = OwampReceiver(security_from_mode(mode), keys=keys, ptp=ptp, error_estimate=error_estimate,
                            expected=expected, timeout_s=timeout_s, schedule=schedule, start_ns=start_ns)
        self._register(sid, peer, rcv)
        return rcv

    def remove_session(self, sid: Hashable) -> OwampReceiver | None:
        r = self._unregister(sid)
        return r if isinstance(r, OwampReceiver) else None

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        cfg = self.ts_config
        hw = cfg if (cfg is not None and cfg.raw_hardware) else None
        n_sw = n_user = 0
        for _ in range(self.batch):
            try:
                data, anc, _flags, addr = sock.recvmsg(RECV_BUF, ts.ANCILLARY_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            rx, src, ttl, _tos = decode_ancillary(anc, hw)
            if rx is None:
                rx, src = self.now_ns(), "user"
                n_user += 1
            elif src == "sw":
                n_sw += 1
            rcv = self._lookup(peer_key(addr))
            if rcv is None:
                self.unknown_peer += 1
                continue
            rcv.on_packet(data, rx, ttl, src)
        if n_sw and hw is None:  # as the reflector: hardware-configured stamps were counted by rx_stamp
            STAMP_COUNTERS.add("rx", "sw", n_sw)
        if n_user:
            STAMP_COUNTERS.add("rx", "user", n_user)


# --------------------------------------------------------------------------- sender


class _SenderSocket:
    """Reader side of a Session-Sender socket: replies (RX stamps) and TX stamps from the error queue."""

    def __init__(self, sock: socket.socket, sender: TestSender, cfg: ts.TimestampingConfig | None,
                 tx_keys: dict[int, int], done: asyncio.Event, expect_replies: bool) -> None:
        self.sock, self.sender, self.cfg, self.tx_keys = sock, sender, cfg, tx_keys
        self.done, self.expect = done, expect_replies
        self.on_record: Callable[[PacketRecord], None] | None = None
        # Failed sends that may have used up an OPT_ID key anyway (kernels before 6.8 did on
        # EAGAIN, commit 488b6d91): the kernel's key is then ours + 0..key_slack.
        self.key_slack = 0

    def on_readable(self) -> None:
        sock, sender = self.sock, self.sender
        hw = self.cfg if (self.cfg is not None and self.cfg.raw_hardware) else None
        n_sw = n_user = 0
        while True:
            try:
                data, anc, _f, _addr = sock.recvmsg(RECV_BUF, ts.ANCILLARY_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP unreachable etc.: the packet is simply lost
                continue
            rx, src, ttl, _tos = decode_ancillary(anc, hw)
            if rx is None:
                rx, src = time.time_ns(), "user"
                n_user += 1
            elif src == "sw":
                n_sw += 1
            if not self.expect:
                continue
            rec = sender.on_reply(data, rx, ttl, src)
            if rec is not None and self.on_record is not None and not rec.duplicates:
                self.on_record(rec)
            if sender.counters.replies >= sender.count:
                self.done.set()
        # T4 sources in the process-wide counters too (the reflector counts its T2s the same way);
        # with hardware RX configured, timestamping.rx_stamp already counted hw/sw.
        if n_sw and hw is None:
            STAMP_COUNTERS.add("rx", "sw", n_sw)
        if n_user:
            STAMP_COUNTERS.add("rx", "user", n_user)
        if self.cfg is not None:
            self.drain_tx()

    def drain_tx(self) -> None:
        sender, keys = self.sender, self.tx_keys
        for key, stamp in ts.drain_tx_stamps(self.sock, config=self.cfg):
            if self.key_slack:
                # The stamp is of our key - d, d in 0..slack: take the latest of those packets
                # handed over before the stamp (an earlier stamp cannot be a later packet's).
                for k in range(key, max(key - self.key_slack, 0) - 1, -1):
                    t1 = sender.t1_user_ns(keys.get(k, -1))
                    if t1 is not None and t1 <= stamp.ns:
                        key = k
                        break
            seq = keys.pop(key, None)
            if seq is not None:
                sender.on_tx_stamp(seq, stamp.ns, stamp.source.value)


async def _sleep_until_ns(t_ns: int, spin_ns: int = 0) -> None:
    """Sleep until ``t_ns`` (Unix ns). The event loop wakes with ~1 ms granularity (epoll);
    ``spin_ns`` > 0 sleeps until that much before and busy-waits the rest, for
    sub-millisecond send times at the cost of CPU."""
    now = time.time_ns()
    delay = t_ns - now - spin_ns
    if delay > 0:
        await asyncio.sleep(delay / 1e9)
    if spin_ns:
        while time.time_ns() < t_ns:
            pass


async def _stop_set_before_ns(stop: asyncio.Event, t_ns: int) -> bool:
    """Wait until ``t_ns`` (Unix ns) or until ``stop`` is set, whichever comes first."""
    if stop.is_set():
        return True
    delay = (t_ns - time.time_ns()) / 1e9
    if delay <= 0:
        return False
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        return False
    return True


@dataclass
class SendProgress:
    """Packets a running sender has handed to the kernel so far (read while it runs)."""

    sent: int = 0


async def run_twamp_sender(
    local: tuple[str, int],
    remote: tuple[str, int],
    mode: int = MODE_UNAUTHENTICATED,
    keys: TestKeys | None = None,
    count: int = 10,
    interval: float = 1.0,
    schedule: str | Schedule = "fixed",
    padding: int | None = None,
    dscp: int | None = None,
    *,
    proto: Proto = Proto.TWAMP,
    stamp_key=None,
    ssid: int = 0,
    tlvs: Iterable[_tlv.Tlv] = (),
    timeout: float = 2.0,
    start_ns: int | None = None,
    iface: str | None = None,
    hardware: bool = True,
    ptp: bool = False,
    error_estimate=None,
    reflector_auth_span: int = 16,
    seed: int | None = None,
    on_record: Callable[[PacketRecord], None] | None = None,
    sock: socket.socket | None = None,
    spin_ns: int = 0,
    reflect: tuple[int, int] | None = None,
    server_octets: int = 0,
    stop: asyncio.Event | None = None,
    progress: SendProgress | None = None,
    keep_records: bool = True,
) -> list[PacketRecord]:
    """Send ``count`` test packets on an absolute schedule and collect the replies.

    ``mode`` is the negotiated Modes word (or use ``proto=Proto.STAMP`` with ``stamp_key``
    for STAMP authenticated mode). For ``proto=Proto.OWAMP`` nothing comes back: the
    records carry T1 (user and kernel) only. ``start_ns`` (Unix ns) is the session's
    Start Time; default: now. Waits ``timeout`` seconds after the last send.
    ``sock``: an already bound UDP socket to use (it is not closed). ``spin_ns``: busy-wait
    that long before each send time for sub-millisecond precision (default: event-loop
    sleeps, ~1 ms granularity; the absolute schedule never drifts either way).
    ``reflect``, ``server_octets``: RFC 6038 Reflect Octets (see :class:`TestSender`).
    ``stop``: once set, no further packet is sent and no late reply awaited; the records
    of the packets sent so far are returned (cancelling the task would lose them).
    ``progress``: counts the packets sent as they go. ``keep_records=False``: no record is
    kept (returns []): memory stays flat however many packets a peer asked for (issue 11
    row 3: the server's OWAMP sender needs only the count, RFC 4656 §3.8 Next Seqno).
    """
    sched = schedule if isinstance(schedule, Schedule) else Schedule(schedule, interval, seed)
    if proto is Proto.STAMP:
        security = Security.AUTH if stamp_key is not None and mode & 2 else Security.UNAUTH
    else:
        security = security_from_mode(mode)
        # RFC 8186 mode bit: our timestamps go out in PTP format too (the Z bit says so).
        ptp = ptp or (proto is Proto.TWAMP and bool(mode & MODE_PTP_TIMESTAMPS))
    sender = TestSender(proto, security, keys=keys, stamp_key=stamp_key, padding=padding, ssid=ssid, count=count,
                        schedule=sched, ptp=ptp, error_estimate=error_estimate, tlvs=tlvs,
                        reflector_auth_span=reflector_auth_span, reflect=reflect, server_octets=server_octets)
    own = sock is None
    if sock is None:
        fam = _family_of(remote[0])
        host = local[0]
        if not host or host in ("0.0.0.0", "::"):  # a wildcard follows the remote's family
            host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
        sock = open_udp_socket((host, local[1]), family=fam, dscp=dscp)
    elif dscp is not None:
        set_dscp(sock, dscp)
    cfg: ts.TimestampingConfig | None = None
    try:
        if keep_records:  # without records there is nothing to put a TX stamp on
            cfg = ts.enable_timestamping(sock, iface, hardware)
    except (OSError, ts.UnsupportedArchitecture) as e:
        log.info("no kernel timestamps (%s)", e)
    try:
        ts.enable_recv_ttl(sock)
    except OSError:
        pass
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    tx_keys: dict[int, int] = {}
    reader = _SenderSocket(sock, sender, cfg, tx_keys, done, proto is not Proto.OWAMP)
    reader.on_record = on_record
    fd = sock.fileno()  # kept: a caller may close the socket while we are being cancelled
    loop.add_reader(fd, reader.on_readable)
    next_key = 0
    start = start_ns if start_ns is not None else time.time_ns()
    stopped = False
    try:
        for n in range(count):
            t_ns = sender.send_time_ns(n, start)
            if stop is not None and await _stop_set_before_ns(stop, t_ns - spin_ns):
                stopped = True
                break
            await _sleep_until_ns(t_ns, spin_ns)
            data = sender.build(n, time.time_ns())
            for _attempt in range(3):
                try:
                    sock.sendto(data, remote)
                    if progress is not None:
                        progress.sent += 1
                    if not keep_records:
                        sender.forget(n)
                    elif cfg is not None:
                        tx_keys[next_key] = n  # SOF_TIMESTAMPING_OPT_ID numbers successful sends
                        next_key += 1
                    break
                except BlockingIOError:  # send queue full: let the loop run, then retry
                    reader.key_slack += 1
                    await asyncio.sleep(0.0005)
                except OSError as e:  # unreachable etc.: recorded as lost
                    reader.key_slack += 1
                    log.debug("send seq %d: %s", n, e)
                    break
        if stopped:
            pass  # what already arrived is read below; no waiting for the rest
        elif proto is Proto.OWAMP or count == 0:
            await asyncio.sleep(min(timeout, 0.05))
        else:
            waits = [asyncio.ensure_future(done.wait())]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        reader.on_readable()
        if cfg is not None:
            reader.drain_tx()
    finally:
        loop.remove_reader(fd)
        if own:
            sock.close()
    records = sender.records()
    # Packets whose kernel TX stamp never came keep T1 = the user stamp written in them: count those.
    n_user = sum(1 for r in records if r.t1_kernel_ns is None)
    if n_user:
        STAMP_COUNTERS.add("tx", "user", n_user)
    return records
