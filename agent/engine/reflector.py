"""Sans-IO Session-Reflector for TWAMP (RFC 5357), TWAMP-Light and STAMP (RFC 8762/8972).

One :class:`ReflectorSession` holds a session's state: its own sequence counter
(per peer and SSID for a stateful STAMP reflector, RFC 8762 §4.3.1), the keys and
cached cipher/HMAC contexts, the Error Estimate, and counters of dropped packets.

``reflect(data, rx_ns, ttl, now_ns)`` returns the answer, or ``None`` (and counts
why) for short, malformed or unauthentic input; it never raises on packet content.

* T2 (Receive Timestamp) is ``rx_ns``: the kernel RX stamp where the adapter had one.
* T3 (Timestamp) is read from ``now_ns()`` as late as possible, after everything
  else is computed, just before the HMAC/encryption that must cover it. An adapter that
  writes T3 itself into the finished reply (agent.engine.followup.T3Patch) passes
  :data:`LATE_T3`: the field is then left 0 and no clock is read.
  T2 and T3 are never copied into one another.
* Sender TTL is ``ttl``, the real received TTL / Hop Limit (255 when unknown).
* The sender's Timestamp and Error Estimate go into the Sender Timestamp /
  Sender Error Estimate fields unchanged (never swapped with ours).
"""

from __future__ import annotations

import hmac as _hmac
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from agent.engine import tlv as _tlv
from agent.engine.clockerr import ErrSource, PackedErrorEstimate
from agent.engine.counters import Counters
from agent.engine.crypto import REFLECTOR_AUTH_SPAN, StampCrypto, TwampTestCrypto
from agent.engine.keys import TestKeys
from agent.engine.packets import (
    AUTH_REFLECTOR_BASE,
    AUTH_SENDER_BASE,
    S_REFL_AUTH,
    S_REFL_UNAUTH,
    S_SEQ,
    S_SENDER_AUTH,
    S_SENDER_UNAUTH,
    S_STAMP_REFL_UNAUTH,
    S_STAMP_SENDER_AUTH,
    S_STAMP_SENDER_UNAUTH,
    STAMP_AUTH_BASE,
    STAMP_BASE,
    TTL_UNKNOWN,
    TWAMP_REFLECTOR_BASE,
    TWAMP_SENDER_MIN,
    PacketError,
    Proto,
    Security,
    session_crypto,
)
from agent.engine.timefmt import NTP_UNIX_OFFSET, ntp_from_unix_ns, ptp_from_unix_ns
from agent.engine.txlag import widened_error
from netlink.secret import Secret

NowNs = Callable[[], int]
_compare = _hmac.compare_digest
_NS = 1_000_000_000
_M32 = 0xFFFFFFFF
_UNSET: Hashable = object()  # matches no peer (None is a valid one)


def LATE_T3() -> int:
    """``now_ns`` for an adapter that writes T3 into the built reply itself: the reflector
    leaves the Timestamp field 0 and reads no clock (agent.engine.followup.T3Patch)."""
    return 0


def _second_of(ns: int, ptp: bool) -> tuple[int, int]:
    """(Unix ns at the start of ``ns``'s second, the timestamp's seconds half shifted << 32):
    RFC 4656 §4.1.2 NTP seconds since 1900, or RFC 8186 truncated PTP seconds (Unix epoch).
    The fast paths keep one per session: T2 and T3 of a packet share their second, and the
    divmod and epoch shift are most of a conversion's cost; the fraction is then
    ``(rem << 32) // 10**9`` (NTP, 2**-32 s units, rounded down) or ``rem`` (PTP, ns)."""
    sec, rem = divmod(ns, _NS)
    return ns - rem, (((sec if ptp else sec + NTP_UNIX_OFFSET) & _M32) << 32)


# TWAMP authenticated reply (RFC 5357 §4.2.1) in one pack: block 0 as enciphered (16 octets),
# then S_REFL_AUTH's octets 16..95 (Timestamp, Error Estimate, MBZ, Receive Timestamp, MBZ,
# Sender Sequence Number, MBZ, Sender Timestamp, Sender Error Estimate, MBZ, Sender TTL, MBZ),
# then the HMAC at 96 (16 of SHA-1's 20 octets: "s" truncates).
_S_AUTH_REPLY = struct.Struct("!16sQHH4xQ8xI12xQH6xB15x16s")
_S_BLOCK0 = struct.Struct("!I12x")  # Sequence Number + 12 MBZ: the only enciphered block
_S_TS_ERR = struct.Struct("!QH")  # sender Timestamp + Error Estimate at 16 (authenticated)


@dataclass(slots=True)
class ReflectorCounters(Counters):
    received: int = 0
    reflected: int = 0
    short: int = 0  # shorter than the mode's sender format
    bad_hmac: int = 0  # failed authentication (tampered or wrong key)
    malformed_tlv: int = 0  # STAMP TLV block that did not parse (reflected as padding)
    tlv_hmac_failed: int = 0  # RFC 8972 HMAC TLV present and wrong (I flag set)
    bad_error_estimate: int = 0  # TWAMP: sender Error Estimate Multiplier 0 (RFC 4656 §4.1.2)
    replayed: int = 0  # authenticated packet whose sequence number was seen already (or too old)
    tlv_over_cap: int = 0  # more than tlv.MAX_TLVS TLVs: reflected as padding, not parsed

    @property
    def dropped(self) -> int:
        return self.short + self.bad_hmac + self.replayed


class ReplayWindow:
    """Anti-replay for authenticated test packets: a sliding window over the sender's
    sequence numbers, as IPsec does (RFC 4303 §3.4.3). RFC 8762 §4.4 leaves replay
    protection of STAMP test packets to the implementation; an authenticated packet
    proves who made it, not that it is new, so a replayed copy would be answered again
    (row 10 of issue 11). A number at or below ``SIZE`` behind the highest seen is fresh
    once; older ones are dropped. Sequence numbers wrap at 2**32 (serial arithmetic)."""

    __slots__ = ("top", "bits")
    SIZE = 64
    _MASK = (1 << SIZE) - 1

    def __init__(self) -> None:
        self.top: int | None = None
        self.bits = 0

    def fresh(self, seq: int) -> bool:
        top = self.top
        if top is None:
            self.top, self.bits = seq, 1
            return True
        ahead = (seq - top) & 0xFFFFFFFF
        if ahead and ahead < 0x80000000:  # newer: slide
            self.bits = ((self.bits << ahead) | 1) & self._MASK if ahead < self.SIZE else 1
            self.top = seq
            return True
        behind = (top - seq) & 0xFFFFFFFF
        if behind >= self.SIZE:
            return False
        bit = 1 << behind
        if self.bits & bit:
            return False
        self.bits |= bit
        return True


class ReflectorSession:
    """Reflector state of one test session (classic TWAMP) or one STAMP/TWAMP-Light listener."""

    def __init__(
        self,
        proto: Proto = Proto.TWAMP,
        security: Security = Security.UNAUTH,
        *,
        keys: TestKeys | None = None,
        stamp_key: Secret | None = None,
        stateful: bool = True,
        ptp: bool = False,
        error_estimate: ErrSource = None,
        reflector_auth_span: int = REFLECTOR_AUTH_SPAN,
        twamp_light_fallback: bool = True,
        dscp: int | None = None,
        reflect: tuple[int, int] | None = None,
    ) -> None:
        """``dscp``: DSCP for every reply (e.g. the Type-P Descriptor's); None keeps the socket's.
        A STAMP Class of Service TLV overrides it per packet (RFC 8972 §4.4).

        ``reflect``: RFC 6038 Reflect Octets, (offset in the sender packet where the padding
        to be reflected starts, Length of padding to reflect). Those octets open the reply's
        padding (right after Sender TTL / the HMAC); the reply keeps its RFC 5357 size, or
        grows to hold them when the sender's packet was shorter."""
        if proto is Proto.OWAMP:
            raise ValueError("OWAMP has no reflector; use agent.engine.receiver.OwampReceiver")
        self.proto = proto
        self.security = security
        self.stateful = stateful
        self.ptp = ptp
        self.counters = ReflectorCounters()
        self.dscp = dscp
        self.reply_dscp: int | None = dscp  # DSCP of the last reply (a CoS TLV may set it per packet)
        self.seq = 0
        self.last_rx_ns = 0  # receive time of the last packet, valid or not
        # RFC 8972 §4.7 Follow-Up Telemetry: (stream, ptp) -> 16-octet value, set by an adapter that
        # keeps the replies' kernel TX stamps (agent.engine.followup.ReplyTxStamps.follow_up).
        self.follow_up: Callable[[Hashable, bool], bytes] | None = None
        self._stream: Hashable = None
        if reflect is not None and (proto is not Proto.TWAMP or reflect[0] < 0 or not 0 <= reflect[1] <= 0xFFFF):
            raise ValueError("reflect octets: TWAMP only, (offset >= 0, length 0..65535)")
        self._reflect = reflect if reflect and reflect[1] else None
        # Stateful STAMP: (peer, SSID) -> [next Sequence Number], a cell so the fast path can
        # keep the last sender's cell and count without hashing (peer objects are reused by
        # the endpoint's address cache).
        self._seqs: dict[tuple[Hashable, int], list[int]] = {}
        self._window = ReplayWindow()  # authenticated TWAMP: one sender per session
        self._windows: dict[tuple[Hashable, int], ReplayWindow] = {}  # authenticated STAMP: per (peer, SSID)
        self._verified: StampCrypto | None = None  # set only while reflecting a packet already verified with it
        self.max_peers = 65536  # stateful STAMP: (peer, SSID) counters kept at most
        self._ts = ptp_from_unix_ns if ptp else ntp_from_unix_ns
        # RFC 4656 §4.1.2: the estimate covers T3's lag behind the real send too (agent.engine.txlag).
        self._err = PackedErrorEstimate(error_estimate if error_estimate is not None
                                        else widened_error("reflector", ptp), ptp)
        self._err.get(time.time_ns())  # first read loads libc/adjtimex: not on the first packet
        # STAMP listeners also answer TWAMP-Light senders that send fewer than 44 octets.
        self._light_fallback = twamp_light_fallback and proto is Proto.STAMP and security is Security.UNAUTH
        crypto = session_crypto(proto, security, keys, stamp_key, reflector_auth_span)
        self._tcrypto: TwampTestCrypto | None = crypto if isinstance(crypto, TwampTestCrypto) else None
        self._scrypto: StampCrypto | None = crypto if isinstance(crypto, StampCrypto) else None
        if self._tcrypto is not None:
            self._fast = self._tcrypto.fast_ops()
        if crypto is None and stamp_key is not None and proto is Proto.STAMP:
            self._scrypto = StampCrypto(stamp_key)  # unauthenticated base, HMAC TLV still checked
        # The per-packet functions are closures over what they need (no attribute lookups,
        # no per-packet allocations beyond the reply); the methods are the general paths.
        # Settings they bind (proto, security, ptp, stateful, keys, reflect) are fixed here.
        if proto is Proto.TWAMP and security is Security.UNAUTH:
            self.reflect = self._fast_twamp_unauth()  # type: ignore[method-assign]
        elif proto is Proto.TWAMP:
            tc = self._tcrypto
            fast = tc is not None and not tc.encrypted and tc.reflector_span == 16
            self.reflect = self._fast_twamp_auth() if fast else self._twamp_auth  # type: ignore[method-assign]
        elif security is Security.UNAUTH:
            self.reflect = self._fast_stamp_unauth()  # type: ignore[method-assign]
        else:
            self.reflect = self._fast_stamp_auth()  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<ReflectorSession {self.proto.value} {self.security.value} seq={self.seq}>"

    # The public entry point; bound per mode in __init__ to keep branches off the hot path.
    def reflect(
        self,
        data: bytes,
        rx_ns: int,
        ttl: int | None,
        now_ns: NowNs,
        tos: int | None = None,
        peer: Hashable = None,
        rx_source: str = "sw",
    ) -> bytes | None:  # pragma: no cover - replaced per instance
        """The reply to ``data`` received at ``rx_ns`` (Unix ns, T2) with IP TTL/Hop Limit ``ttl``.

        ``now_ns()`` is read once, as late as possible, for T3. ``tos``: the received TOS/Traffic
        Class (STAMP CoS TLV); ``peer``: a hashable sender identity (stateful STAMP counters);
        ``rx_source``: "hw"/"sw"/"user" (STAMP Timestamp Information TLV). ``None`` when the
        packet is dropped; ``self.counters`` says why.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ TWAMP

    def _fast_twamp_unauth(self) -> Callable[..., bytes | None]:
        """RFC 5357 §4.2.1 unauthenticated reply: Sequence Number, Timestamp (T3), Error Estimate,
        MBZ, Receive Timestamp (T2), the sender's Sequence Number, Timestamp and Error Estimate
        copied, MBZ, Sender TTL, then the padding (:meth:`_padding`)."""
        c = self.counters
        err_read = self._err.read  # once per second of receive time, with the T2/T3 second cache
        ptp = self.ptp
        pack = S_REFL_UNAUTH.pack
        unpack = S_SENDER_UNAUTH.unpack_from
        padding = self._padding
        plain = self._reflect is None  # no Reflect Octets: a 41-octet reply has no padding
        late = LATE_T3
        now0 = time.time_ns()
        start, hi = _second_of(now0, ptp)
        err = err_read(now0)

        def reflect(data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
                    peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
            nonlocal start, hi, err
            c.received += 1
            self.last_rx_ns = rx_ns  # REFWAIT (RFC 5357 §4.2) is the control plane's timer
            n = len(data)
            if n < TWAMP_SENDER_MIN:
                c.short += 1
                return None
            # RFC 4656 §4.1.2 (RFC 5357 reuses it): Multiplier (octet 13) 0 = corrupt, discard.
            if not data[13]:
                c.bad_error_estimate += 1
                return None
            sseq, sts, serr = unpack(data)
            seq = self.seq
            self.seq = (seq + 1) & _M32
            rem = rx_ns - start
            if not 0 <= rem < _NS:
                start, hi = _second_of(rx_ns, ptp)
                err = err_read(rx_ns)
                rem = rx_ns - start
            t2 = hi | (rem if ptp else (rem << 32) // _NS)
            if ttl is None:
                ttl = TTL_UNKNOWN
            if now_ns is late:
                t3 = 0
            else:
                now = now_ns()
                rem = now - start
                if 0 <= rem < _NS:
                    t3 = hi | (rem if ptp else (rem << 32) // _NS)
                else:  # another second than T2's: convert without moving the cache
                    t3 = ptp_from_unix_ns(now) if ptp else ntp_from_unix_ns(now)
            head = pack(seq, t3, err, 0, t2, sseq, sts, serr, ttl)
            c.reflected += 1
            if plain and n <= TWAMP_REFLECTOR_BASE:
                return head
            return head + padding(data, TWAMP_SENDER_MIN, TWAMP_REFLECTOR_BASE)

        return reflect

    def _fast_twamp_auth(self) -> Callable[..., bytes | None]:
        """RFC 5357 authenticated mode with the 16-octet reflector span (agent.engine.crypto): only
        block 0 (Sequence Number + MBZ) is enciphered and MACed, both ways. The reply's block 0
        depends on its Sequence Number only, so it is built alone and the rest packed after it
        in one go, HMAC included. Encrypted mode and the 96-octet span use :meth:`_twamp_auth`."""
        c = self.counters
        err_read = self._err.read  # once per second of receive time, with the T2/T3 second cache
        ptp = self.ptp
        enc, dec, mac = self._fast
        window = self._window
        wmask = ReplayWindow._MASK
        pack = _S_AUTH_REPLY.pack
        block0 = _S_BLOCK0.pack
        seq_of = S_SEQ.unpack_from
        ts_err = _S_TS_ERR.unpack_from
        padding = self._padding
        plain = self._reflect is None
        compare = _compare
        late = LATE_T3
        now0 = time.time_ns()
        start, hi = _second_of(now0, ptp)
        err = err_read(now0)

        def reflect(data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
                    peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
            nonlocal start, hi, err
            c.received += 1
            self.last_rx_ns = rx_ns  # REFWAIT (RFC 5357 §4.2) is the control plane's timer
            n = len(data)
            if n < AUTH_SENDER_BASE:
                c.short += 1
                return None
            p0 = dec(data[:16])
            h = mac()
            h.update(p0)
            if not compare(h.finalize()[:16], data[32:48]):
                c.bad_hmac += 1
                return None
            # RFC 4656 §4.1.2 (RFC 5357 reuses it): Multiplier (octet 25) 0 = corrupt, discard.
            if not data[25]:
                c.bad_error_estimate += 1
                return None
            sseq = seq_of(p0)[0]
            top = window.top
            if top is not None and (sseq - top) & _M32 == 1:  # the next one: ReplayWindow.fresh, inlined
                window.bits = ((window.bits << 1) | 1) & wmask
                window.top = sseq
            elif not window.fresh(sseq):
                c.replayed += 1
                return None
            sts, serr = ts_err(data, 16)
            seq = self.seq
            self.seq = (seq + 1) & _M32
            rem = rx_ns - start
            if not 0 <= rem < _NS:
                start, hi = _second_of(rx_ns, ptp)
                err = err_read(rx_ns)
                rem = rx_ns - start
            t2 = hi | (rem if ptp else (rem << 32) // _NS)
            if ttl is None:
                ttl = TTL_UNKNOWN
            b0 = block0(seq)
            h = mac()
            h.update(b0)
            ct0 = enc(b0)
            tag = h.finalize()
            pad = b"" if plain and n <= AUTH_REFLECTOR_BASE else padding(data, AUTH_SENDER_BASE, AUTH_REFLECTOR_BASE)
            if now_ns is late:
                t3 = 0
            else:
                now = now_ns()
                rem = now - start
                if 0 <= rem < _NS:
                    t3 = hi | (rem if ptp else (rem << 32) // _NS)
                else:  # another second than T2's: convert without moving the cache
                    t3 = ptp_from_unix_ns(now) if ptp else ntp_from_unix_ns(now)
            out = pack(ct0, t3, err, 0, t2, sseq, sts, serr, ttl, tag)
            c.reflected += 1
            return out + pad if pad else out

        return reflect

    def _twamp_auth(self, data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
                    peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
        c = self.counters
        c.received += 1
        self.last_rx_ns = rx_ns  # REFWAIT (RFC 5357 §4.2) is the control plane's timer
        n = len(data)
        if n < AUTH_SENDER_BASE:
            c.short += 1
            return None
        cr = self._tcrypto
        assert cr is not None
        enc, dec, mac = self._fast
        if cr.encrypted:
            plain = cr.decrypt(data, 32)
            h = mac()
            h.update(plain)
        else:
            # Authenticated: only block 0 (Seq + MBZ) is enciphered and MACed (see agent.engine.crypto).
            plain = dec(data[:16]) + data[16:32]
            h = mac()
            h.update(plain[:16])
        if not _compare(h.finalize()[:16], data[32:48]):
            c.bad_hmac += 1
            return None
        sseq, sts, serr = S_SENDER_AUTH.unpack_from(plain)
        if not serr & 0xFF:  # RFC 4656 §4.1.2 (RFC 5357 reuses it): Multiplier 0 = corrupt, discard
            c.bad_error_estimate += 1
            return None
        if not self._window.fresh(sseq):
            c.replayed += 1
            return None
        seq = self.seq
        self.seq = (seq + 1) & 0xFFFFFFFF
        err = self._err.get(rx_ns)
        ts = self._ts
        t2 = ts(rx_ns)
        if ttl is None:
            ttl = TTL_UNKNOWN
        pad = self._padding(data, AUTH_SENDER_BASE, AUTH_REFLECTOR_BASE)
        t3 = 0 if now_ns is LATE_T3 else ts(now_ns())
        body = S_REFL_AUTH.pack(seq, t3, err, 0, t2, sseq, sts, serr, ttl)
        h = mac()
        c.reflected += 1
        if cr.encrypted:
            h.update(body)
            return cr.encrypt(body, 96) + h.finalize()[:16] + pad
        span = cr.reflector_span
        h.update(body[:span])
        return enc(body[:16]) + body[16:] + h.finalize()[:16] + pad

    def _padding(self, data: bytes, sender_base: int, reflector_base: int) -> bytes:
        """The reply's padding. RFC 5357 §4.2.1: answer at the sender's size by re-using its
        padding minus the highest-numbered octets the larger reflector header needs (27
        unauthenticated, 64 authenticated: errata 5045). RFC 6038 §4.2 Reflect Octets: the
        padding to be reflected comes first, the rest keeps that size."""
        n = len(data)
        pad = data[sender_base : n - (reflector_base - sender_base)] if n > reflector_base else b""
        r = self._reflect
        if r is None:
            return pad
        octets = data[r[0] : r[0] + r[1]]
        return octets + pad[len(octets):]

    # ------------------------------------------------------------------ STAMP

    def _seq_cell(self, key: tuple[Hashable, int]) -> list[int]:
        """The counter cell of (sender, SSID), made on first use; bounded state: a new one
        forgets the oldest sender, whose cell is marked -1 (a fast path may still hold it)."""
        seqs = self._seqs
        cell = seqs.get(key)
        if cell is None:
            if len(seqs) >= self.max_peers:
                seqs.pop(next(iter(seqs)))[0] = -1  # -1: a dropped cell, never reused
            cell = seqs[key] = [0]
        return cell

    def _next_seq(self, sseq: int, peer: Hashable, ssid: int) -> int:
        if not self.stateful:
            return sseq  # RFC 8762 §4.3.1 stateless: copy the sender's sequence number
        cell = self._seq_cell((peer, ssid))
        seq = cell[0]
        cell[0] = (seq + 1) & _M32
        return seq

    def _stamp_window(self, peer: Hashable, ssid: int) -> ReplayWindow:
        key = (peer, ssid)
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= self.max_peers:  # bounded state: forget the oldest sender
                del self._windows[next(iter(self._windows))]
            w = self._windows[key] = ReplayWindow()
        return w

    def _stamp(self, data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
               peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
        c = self.counters
        c.received += 1
        self.last_rx_ns = rx_ns  # REFWAIT (RFC 5357 §4.2) is the control plane's timer
        n = len(data)
        auth = self.security is Security.AUTH
        base = STAMP_AUTH_BASE if auth else STAMP_BASE
        if n < base:
            # TWAMP-Light on the STAMP port: answered only when the request is at least as
            # large as the 41-octet reply (RFC 5357 §4.1.2 asks senders to pad so), so a
            # spoofed source gets no amplification from this connectionless port.
            if self._light_fallback and n >= TWAMP_REFLECTOR_BASE:
                return self._light(data, rx_ns, ttl, now_ns, peer)
            c.short += 1
            return None
        if auth:
            sc = self._scrypto
            assert sc is not None
            # agent.engine.keyed_reflector found the key by checking this very packet's HMAC.
            if sc is not self._verified and not sc.verify(data[96:112], data[:96]):
                c.bad_hmac += 1
                return None
            sseq, sts, serr, ssid = S_STAMP_SENDER_AUTH.unpack_from(data)
            if not self._stamp_window(peer, ssid).fresh(sseq):
                c.replayed += 1
                return None
        else:
            sseq, sts, serr, ssid = S_STAMP_SENDER_UNAUTH.unpack_from(data)
        seq = self._next_seq(sseq, peer, ssid)
        err = self._err.get(rx_ns)
        ts = self._ts
        t2 = ts(rx_ns)
        if ttl is None:
            ttl = TTL_UNKNOWN
        extra = data[base:]
        self.reply_dscp = self.dscp
        if extra and extra.count(0) != len(extra):
            self._stream = (peer, ssid)
            extra = self._stamp_tlvs(extra, data, seq, rx_source, tos, err)
        t3 = 0 if now_ns is LATE_T3 else ts(now_ns())
        c.reflected += 1
        if auth:
            body = S_REFL_AUTH.pack(seq, t3, err, ssid, t2, sseq, sts, serr, ttl)
            sc = self._scrypto
            assert sc is not None
            return body + sc.mac(body) + extra
        return S_STAMP_REFL_UNAUTH.pack(seq, t3, err, ssid, t2, sseq, sts, serr, ttl) + extra

    def _fast_stamp_unauth(self) -> Callable[..., bytes | None]:
        """RFC 8762 §4.3.1 unauthenticated STAMP reply (44 octets), then the sender's TLVs answered
        (RFC 8972, :meth:`_stamp_tlvs`) or its zero padding reflected. Shorter requests take the
        general path (:meth:`_stamp`: TWAMP-Light fallback or ``short``)."""
        c = self.counters
        err_read = self._err.read  # once per second of receive time, with the T2/T3 second cache
        ptp = self.ptp
        pack = S_STAMP_REFL_UNAUTH.pack
        unpack = S_STAMP_SENDER_UNAUTH.unpack_from
        general = self._stamp
        stateful = self.stateful
        seqs, seq_cell = self._seqs, self._seq_cell
        tlvs = self._stamp_tlvs
        late = LATE_T3
        now0 = time.time_ns()
        start, hi = _second_of(now0, ptp)
        err = err_read(now0)
        last_peer: Hashable = _UNSET  # the last sender's counter cell, found by identity
        last_ssid, last_cell = -1, [0]
        tlvs_seen = False  # the last packet's TLVs may have set reply_dscp (RFC 8972 §4.4 CoS)

        def reflect(data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
                    peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
            nonlocal start, hi, err, last_peer, last_ssid, last_cell, tlvs_seen
            n = len(data)
            if n < STAMP_BASE:
                return general(data, rx_ns, ttl, now_ns, tos, peer, rx_source)
            c.received += 1
            self.last_rx_ns = rx_ns  # REFWAIT (RFC 5357 §4.2) is the control plane's timer
            sseq, sts, serr, ssid = unpack(data)
            if stateful:  # RFC 8762 §4.3.1: own counter per (sender, SSID); bounded state
                if peer is last_peer and ssid == last_ssid and last_cell[0] >= 0:
                    cell = last_cell
                else:
                    key = (peer, ssid)
                    cell = seqs.get(key) or seq_cell(key)  # (a cell, [n], is never falsy)
                    last_peer, last_ssid, last_cell = peer, ssid, cell
                seq = cell[0]
                cell[0] = (seq + 1) & _M32
            else:  # stateless: copy the sender's sequence number
                seq = sseq
            rem = rx_ns - start
            if not 0 <= rem < _NS:
                start, hi = _second_of(rx_ns, ptp)
                err = err_read(rx_ns)
                rem = rx_ns - start
            t2 = hi | (rem if ptp else (rem << 32) // _NS)
            if ttl is None:
                ttl = TTL_UNKNOWN
            if n > STAMP_BASE:
                extra = data[STAMP_BASE:]
                self.reply_dscp = self.dscp
                if extra.count(0) != len(extra):
                    self._stream = (peer, ssid)
                    extra = tlvs(extra, data, seq, rx_source, tos, err)
                    tlvs_seen = True
            else:  # no TLVs: nothing to append, and only a CoS TLV (a packet with TLVs) changes reply_dscp
                extra = b""
                if tlvs_seen:
                    self.reply_dscp, tlvs_seen = self.dscp, False
            if now_ns is late:
                t3 = 0
            else:
                now = now_ns()
                rem = now - start
                if 0 <= rem < _NS:
                    t3 = hi | (rem if ptp else (rem << 32) // _NS)
                else:  # another second than T2's: convert without moving the cache
                    t3 = ptp_from_unix_ns(now) if ptp else ntp_from_unix_ns(now)
            c.reflected += 1
            return pack(seq, t3, err, ssid, t2, sseq, sts, serr, ttl) + extra

        return reflect

    def _fast_stamp_auth(self) -> Callable[..., bytes | None]:
        """RFC 8762 §4.2.2 / §4.3.2 authenticated STAMP without TLVs (112 octets, or zero padding
        after them): HMAC-SHA-256/16 over octets 0..95 checked (unless agent.engine.keyed_reflector
        just did, with the key it set), the replay window and counter of (sender, SSID), then the
        96-octet reply in one pack and its HMAC. T3 is read before the HMAC, which covers it.
        Shorter requests and requests with TLVs take the general path (:meth:`_stamp`)."""
        c = self.counters
        err_read = self._err.read  # once per second of receive time, with the T2/T3 second cache
        ptp = self.ptp
        pack = S_REFL_AUTH.pack
        unpack = S_STAMP_SENDER_AUTH.unpack_from
        general = self._stamp
        stateful = self.stateful
        windows, stamp_window = self._windows, self._stamp_window
        seqs, seq_cell = self._seqs, self._seq_cell
        compare = _compare
        base = STAMP_AUTH_BASE
        late = LATE_T3
        now0 = time.time_ns()
        start, hi = _second_of(now0, ptp)
        err = err_read(now0)
        last_crypto: StampCrypto | None = None  # the keyed reflector may set another key per packet
        new_mac: Callable[[], Any] = None  # type: ignore[assignment]

        def reflect(data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
                    peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
            nonlocal start, hi, err, last_crypto, new_mac
            n = len(data)
            if n != base and (n < base or data.count(0, base) != n - base):
                return general(data, rx_ns, ttl, now_ns, tos, peer, rx_source)
            c.received += 1
            self.last_rx_ns = rx_ns  # REFWAIT (RFC 5357 §4.2) is the control plane's timer
            sc = self._scrypto
            if sc is not last_crypto:
                last_crypto, new_mac = sc, sc.fast_mac()  # type: ignore[union-attr]
            if sc is not self._verified:
                h = new_mac()
                h.update(data[:96])
                if not compare(h.finalize()[:16], data[96:112]):
                    c.bad_hmac += 1
                    return None
            sseq, sts, serr, ssid = unpack(data)
            key = (peer, ssid)
            # Per (sender, SSID), made on first use with bounded state (_stamp_window, _seq_cell).
            if not (windows.get(key) or stamp_window(peer, ssid)).fresh(sseq):
                c.replayed += 1
                return None
            if stateful:  # RFC 8762 §4.3.1: own counter per (sender, SSID)
                cell = seqs.get(key) or seq_cell(key)
                seq = cell[0]
                cell[0] = (seq + 1) & _M32
            else:
                seq = sseq
            rem = rx_ns - start
            if not 0 <= rem < _NS:
                start, hi = _second_of(rx_ns, ptp)
                err = err_read(rx_ns)
                rem = rx_ns - start
            t2 = hi | (rem if ptp else (rem << 32) // _NS)
            if ttl is None:
                ttl = TTL_UNKNOWN
            if self.reply_dscp is not self.dscp:  # a CoS TLV (general path) set it for its reply only
                self.reply_dscp = self.dscp
            if now_ns is late:
                t3 = 0
            else:
                now = now_ns()
                rem = now - start
                if 0 <= rem < _NS:
                    t3 = hi | (rem if ptp else (rem << 32) // _NS)
                else:  # another second than T2's: convert without moving the cache
                    t3 = ptp_from_unix_ns(now) if ptp else ntp_from_unix_ns(now)
            body = pack(seq, t3, err, ssid, t2, sseq, sts, serr, ttl)
            h = new_mac()
            h.update(body)
            c.reflected += 1
            out = body + h.finalize()[:16]
            return out + data[base:] if n > base else out

        return reflect

    def _stamp_tlvs(self, extra: bytes, data: bytes, seq: int, rx_source: str, tos: int | None, err: int) -> bytes:
        sync = _tlv.SYNC_NTP if err & 0x8000 else _tlv.SYNC_FREE_RUNNING
        if err & 0x4000 and err & 0x8000:
            sync = _tlv.SYNC_PTP
        method_in = _tlv.METHOD_HW if rx_source == "hw" else _tlv.METHOD_SW
        try:
            r = _tlv.reflect_tlvs(
                extra,
                rx_seq_bytes=data[:4],
                reply_seq_bytes=seq.to_bytes(4, "big"),
                crypto=self._scrypto,
                ts_info=(sync, method_in, sync, _tlv.METHOD_SW),
                rx_tos=tos,
                counters=(self.counters.received, self.counters.reflected + 1),
                follow_up=self.follow_up(self._stream, self.ptp) if self.follow_up is not None else None,
            )
        except _tlv.TooManyTlvs:
            self.counters.tlv_over_cap += 1
            return extra  # reflected as padding: parsing hundreds of TLVs would cost 35x the CPU
        except PacketError:
            self.counters.malformed_tlv += 1
            return extra  # not TLVs after all: TWAMP-Light style padding, reflected as is
        if r.hmac_ok is False:
            self.counters.tlv_hmac_failed += 1
        if r.reply_dscp is not None:
            self.reply_dscp = r.reply_dscp
        return r.data

    def _light(self, data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, peer: Hashable) -> bytes:
        """A TWAMP-Light sender (41..43 octets) talking to our STAMP port: answer in TWAMP format."""
        sseq, sts, serr = S_SENDER_UNAUTH.unpack_from(data)
        seq = self._next_seq(sseq, peer, -1)
        err = self._err.get(rx_ns)
        ts = self._ts
        t2 = ts(rx_ns)
        t3 = 0 if now_ns is LATE_T3 else ts(now_ns())
        head = S_REFL_UNAUTH.pack(seq, t3, err, 0, t2, sseq, sts, serr, TTL_UNKNOWN if ttl is None else ttl)
        self.counters.reflected += 1
        return head + self._padding(data, TWAMP_SENDER_MIN, TWAMP_REFLECTOR_BASE)

    def forget_peer(self, peer: Hashable) -> None:
        """Drop a stateful STAMP peer's counters (SSID state, RFC 8762 §4.3.1)."""
        for k in [k for k in self._seqs if k[0] == peer]:
            self._seqs.pop(k)[0] = -1  # -1: a dropped cell, never reused (the fast path may hold it)

    @property
    def peers(self) -> int:
        return len(self._seqs)


__all__ = ["ReflectorSession", "ReflectorCounters", "NowNs", "LATE_T3"]
