"""Fast, pure decoding of NETLINK_XFRM messages into netlink.records.

No sockets, no pyroute2: bytes in, records out, so recorded kernel bytes can
be decoded anywhere. This is the hot path of a dump (50k SAs), hence
precompiled ``struct.Struct`` layouts and caches of the parts SAs share
(addresses, selectors, lifetime configs, algorithm names). An SA's
algorithms (two Algorithm+Secret+key objects, a quarter of the work) are
checked here but decoded on first read of SA.crypt/auth/aead (_SAKeys): the
agent reads the keys of the few SAs it measures, not of the whole table.
The pyroute2 family in netlink.xfrm describes the same layouts for the
generic machinery.

Layouts are those of linux/include/uapi/linux/xfrm.h on LP64 targets
(x86_64, arm64: __u64 8-aligned), checked against sizeof()/offsetof():
xfrm_selector 56, xfrm_id 24, xfrm_usersa_info 224, xfrm_usersa_id 24,
xfrm_user_expire 232, xfrm_userpolicy_info 168, xfrm_userpolicy_id 64,
xfrm_user_polexpire 176, xfrm_user_tmpl 64, xfrm_encap_tmpl 24.
Every integer is host order except SPIs and ports (__be32/__be16).

Errors: anything malformed raises :class:`netlink.errors.XfrmDecodeError`
and nothing else.

SA.extra keys (present only when the kernel sent the attribute):
  comp (Algorithm, IPcomp), encap_oa (address), coaddr, srcaddr (addresses),
  lastused (unix seconds), sec_ctx (str), tfcpad, extra_flags, replay_thresh,
  etimer_thresh, mtimer_thresh, sa_dir, nat_keepalive_interval, pcpu (ints),
  set_mark ((value, mask)), offload ((ifindex, flags)), unknown_attrs (tuple of
  attribute types this decoder does not know).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netlink import constants as C
from netlink.errors import XfrmDecodeError
from netlink.events import EventKind, XfrmEvent
from netlink.records import (
    SA,
    Algorithm,
    Direction,
    IPAddress,
    LifetimeConfig,
    LifetimeCurrent,
    Mark,
    Mode,
    Policy,
    PolicyTemplate,
    Proto,
    ReplayState,
    Selector,
    Stats,
)
from netlink.secret import Secret

# --- layouts (xfrm.h) ---------------------------------------------------------
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # nla_len, nla_type
_SEL = "16s16sHHHHHBBB3xiI"  # xfrm_selector: 56
_SA_INFO = struct.Struct("=" + _SEL + "16sIB3x" + "16s" + "8Q" + "4Q" + "3I" + "IIHBBB7x")
_SA_ID = struct.Struct("=16sIHB1x")  # xfrm_usersa_id: 24
_POL_INFO = struct.Struct("=" + _SEL + "8Q4QIIBBBB4x")  # xfrm_userpolicy_info: 168
_POL_ID = struct.Struct("=" + _SEL + "IB3x")  # xfrm_userpolicy_id: 64
_TMPL = struct.Struct("=16sIB3xH2x16sIBBB1xIII")  # xfrm_user_tmpl: 64
_ALGO = struct.Struct("=64sI")  # xfrm_algo: 68 + key
_ALGO2 = struct.Struct("=64sII")  # xfrm_algo_auth / xfrm_algo_aead: 72 + key
_ENCAP = struct.Struct("=HHH2x16s")  # xfrm_encap_tmpl: 24
_MARK = struct.Struct("=II")
_U8 = struct.Struct("=B")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_U64 = struct.Struct("=Q")
_REPLAY = struct.Struct("=III")  # xfrm_replay_state
_REPLAY_ESN = struct.Struct("=IIIIII")  # xfrm_replay_state_esn without bmp[]
_OFFLOAD = struct.Struct("=iB3x")
_SEC_CTX = struct.Struct("=HHBBH")  # xfrm_user_sec_ctx: 8 + string
_SA_ID_SADDR = struct.Struct("=16sIB3x16s")  # xfrm_id + saddr, at offset 56
# The same for AF_INET, straight to ints: daddr, spi, saddr are all network order.
_SA_ID_SADDR4 = struct.Struct(">I12xIB3xI12x")
_SEL_ST = struct.Struct("=" + _SEL)
_LFT_CFG = struct.Struct("=8Q")  # at 96
_LFT_CUR = struct.Struct("=4Q")  # at 160
_STATS = struct.Struct("=3I")  # at 192
_SA_TAIL = struct.Struct("=IIHBBB")  # seq, reqid, family, mode, replay_window, flags at 204
assert _SA_INFO.size == 224 and _SA_ID.size == 24 and _POL_INFO.size == 168
assert _POL_ID.size == 64 and _TMPL.size == 64 and _ENCAP.size == 24

SA_INFO_SIZE = _SA_INFO.size
_EXPIRE_SIZE = 232  # xfrm_user_expire: usersa_info + __u8 hard, padded to 8
_POLEXPIRE_SIZE = 176  # xfrm_user_polexpire
_NLMSGERR_MIN = 4 + 16  # int error + the offending nlmsghdr
NLM_F_CAPPED = 0x100  # in NLMSG_ERROR: only the header of the request is echoed
NLM_F_ACK_TLVS = 0x200  # in NLMSG_ERROR: extended-ack attributes follow

_ntohl = socket.ntohl
_ntohs = socket.ntohs

_PROTOS = {int(p): p for p in Proto}
_MODES = {int(m): m for m in Mode}
_DIRS = {int(d): d for d in Direction}

# --- caches: SAs of one host share addresses, selectors and lifetime configs ---
# Bounded small: most keys of a big dump are unique (a cache of them only costs inserts
# and memory), while shared ones (the router's own address, tunnel-mode selectors,
# lifetime configs) are few and stay hot. 4096 measured faster than 65536 at 50k SAs.
_CACHE_MAX = 1 << 12
_addr_cache: dict[bytes, IPAddress] = {}
_sel_cache: dict[tuple[object, ...], Selector] = {}
_lft_cache: dict[tuple[int, ...], LifetimeConfig] = {}
_stats_cache: dict[tuple[int, int, int], Stats] = {}
_name_cache: dict[bytes, str] = {}
_sel_raw_cache: dict[tuple[bytes, int], Selector] = {}
_lft_raw_cache: dict[bytes, LifetimeConfig] = {}
_stats_raw_cache: dict[bytes, Stats] = {}
_ZERO4 = ipaddress.IPv4Address(0)


# ipaddress.IPv4Address(bytes) runs several Python-level checks per call; a dump
# makes two addresses per SA, mostly distinct. Fill the slots the constructor would
# (IPv4Address: _ip; IPv6Address: _ip, _scope_id) straight from the packed octets:
# the objects are the same (tests/test_netlink_decode.py compares them).
_new = object.__new__
_from_bytes = int.from_bytes
_set_ip4 = ipaddress.IPv4Address._ip.__set__  # type: ignore[attr-defined]
_set_ip6 = ipaddress.IPv6Address._ip.__set__  # type: ignore[attr-defined]
_set_scope6 = ipaddress.IPv6Address._scope_id.__set__  # type: ignore[attr-defined]
_V4, _V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


def _ip4(key: bytes) -> ipaddress.IPv4Address:
    a = _new(_V4)
    _set_ip4(a, _from_bytes(key, "big"))
    return a


def _ip6(key: bytes) -> ipaddress.IPv6Address:
    a = _new(_V6)
    _set_ip6(a, _from_bytes(key, "big"))
    _set_scope6(a, None)
    return a


_addr4_cache: dict[int, ipaddress.IPv4Address] = {}  # an SA's IPv4 addresses by value (filled in _sa)


def _addr(family: int, raw: bytes) -> IPAddress:
    """xfrm_address_t (16 octets, IPv4 in the first 4) for ``family``."""
    if family == C.AF_INET:
        key = raw[:4]
    elif family == C.AF_INET6:
        key = raw
    else:
        raise XfrmDecodeError(f"address family {family} is neither AF_INET nor AF_INET6")
    a = _addr_cache.get(key)
    if a is None:
        a = _ip4(key) if len(key) == 4 else _ip6(key)
        if len(_addr_cache) >= _CACHE_MAX:
            _addr_cache.clear()
        _addr_cache[key] = a
    return a


def _addr_fallback(family: int, raw: bytes, fallback: int) -> IPAddress:
    """Selectors and templates may say AF_UNSPEC: then use the owner's family."""
    if family in (C.AF_INET, C.AF_INET6):
        return _addr(family, raw)
    if fallback in (C.AF_INET, C.AF_INET6):
        return _addr(fallback, raw)
    if not any(raw):
        return _ZERO4
    raise XfrmDecodeError(f"address with unusable family {family}")


def _selector(v: tuple, fallback_family: int) -> Selector:
    # v = (daddr, saddr, dport, dport_mask, sport, sport_mask, family,
    #      prefixlen_d, prefixlen_s, proto, ifindex, user) as unpacked by _SEL.
    key = (fallback_family, *v)
    sel = _sel_cache.get(key)
    if sel is None:
        fam = v[6]
        sel = Selector(
            family=fam,
            saddr=_addr_fallback(fam, v[1], fallback_family),
            daddr=_addr_fallback(fam, v[0], fallback_family),
            prefixlen_s=v[8],
            prefixlen_d=v[7],
            sport=_ntohs(v[4]),
            sport_mask=_ntohs(v[5]),
            dport=_ntohs(v[2]),
            dport_mask=_ntohs(v[3]),
            proto=v[9],
            ifindex=v[10],
            user=v[11],
        )
        if len(_sel_cache) >= _CACHE_MAX:
            _sel_cache.clear()
        _sel_cache[key] = sel
    return sel


def _selector_raw(raw: bytes, fallback_family: int) -> Selector:
    sel = _sel_raw_cache.get((raw, fallback_family))
    if sel is None:
        sel = _selector(_SEL_ST.unpack(raw), fallback_family)
        if len(_sel_raw_cache) >= _CACHE_MAX:
            _sel_raw_cache.clear()
        _sel_raw_cache[(raw, fallback_family)] = sel
    return sel


def _lifetime_raw(raw: bytes) -> LifetimeConfig:
    lft = _lft_raw_cache.get(raw)
    if lft is None:
        lft = _lifetime(_LFT_CFG.unpack(raw))
        if len(_lft_raw_cache) >= _CACHE_MAX:
            _lft_raw_cache.clear()
        _lft_raw_cache[raw] = lft
    return lft


def _stats_raw(raw: bytes) -> Stats:
    st = _stats_raw_cache.get(raw)
    if st is None:
        st = _stats(_STATS.unpack(raw))
        if len(_stats_raw_cache) >= _CACHE_MAX:
            _stats_raw_cache.clear()
        _stats_raw_cache[raw] = st
    return st


_cur_raw_cache: dict[bytes, LifetimeCurrent] = {}


def _current_raw(raw: bytes) -> LifetimeCurrent:
    cur = LifetimeCurrent(*_LFT_CUR.unpack(raw))
    if len(_cur_raw_cache) >= _CACHE_MAX:
        _cur_raw_cache.clear()
    _cur_raw_cache[raw] = cur
    return cur


def _lifetime(v: tuple[int, ...]) -> LifetimeConfig:
    lft = _lft_cache.get(v)
    if lft is None:
        lft = LifetimeConfig(*v)
        if len(_lft_cache) >= _CACHE_MAX:
            _lft_cache.clear()
        _lft_cache[v] = lft
    return lft


def _stats(v: tuple[int, int, int]) -> Stats:
    st = _stats_cache.get(v)
    if st is None:
        st = Stats(*v)
        if len(_stats_cache) >= _CACHE_MAX:
            _stats_cache.clear()
        _stats_cache[v] = st
    return st


_replay_cache: dict[tuple[int, int, int, bool], ReplayState] = {}
_mark_cache: dict[tuple[int, int], Mark] = {}


def _replay(v: tuple[int, int, int, bool]) -> ReplayState:
    # Immutable and mostly (0, 0, window) in a dump of idle SAs: share them.
    r = _replay_cache.get(v)
    if r is None:
        r = ReplayState(*v)
        if len(_replay_cache) >= _CACHE_MAX:
            _replay_cache.clear()
        _replay_cache[v] = r
    return r


def _mark(v: tuple[int, int]) -> Mark:
    m = _mark_cache.get(v)
    if m is None:
        m = Mark(*v)
        if len(_mark_cache) >= _CACHE_MAX:
            _mark_cache.clear()
        _mark_cache[v] = m
    return m


def _cstr(raw: bytes) -> str:
    """A NUL-terminated kernel string (alg_name[64]); non-ASCII is replaced, not fatal."""
    s = _name_cache.get(raw)
    if s is None:
        s = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        if len(_name_cache) < 4096:
            _name_cache[raw] = s
    return s


def _algo(data: bytes, off: int, end: int, kind: int) -> Algorithm:
    """XFRMA_ALG_{CRYPT,AUTH,COMP} (xfrm_algo), ALG_AUTH_TRUNC (xfrm_algo_auth),
    ALG_AEAD (xfrm_algo_aead): name[64], key length in bits, [trunc/icv bits], key."""
    if kind == C.XFRMA_ALG_AUTH_TRUNC or kind == C.XFRMA_ALG_AEAD:
        if end - off < 72:
            raise XfrmDecodeError(f"algorithm attribute {kind} shorter than its header")
        name, bits, extra_bits = _ALGO2.unpack_from(data, off)
        kstart = off + 72
    else:
        if end - off < 68:
            raise XfrmDecodeError(f"algorithm attribute {kind} shorter than its header")
        name, bits = _ALGO.unpack_from(data, off)
        extra_bits = None
        kstart = off + 68
    kend = kstart + ((bits + 7) >> 3)
    if kend > end:
        # Never echo key material: say only how long things are.
        raise XfrmDecodeError(f"algorithm attribute {kind}: key of {bits} bits exceeds the attribute")
    sname = _name_cache.get(name)
    if sname is None:
        sname = _cstr(name)
    key = _new(Secret)
    _set_secret(key, data[kstart:kend])  # a bytes slice: what Secret.__init__ would store
    if kind == C.XFRMA_ALG_AUTH_TRUNC:
        return _build_alg(sname, key, bits, extra_bits, None)
    if kind == C.XFRMA_ALG_AEAD:
        return _build_alg(sname, key, bits, None, extra_bits)
    return _build_alg(sname, key, bits, None, None)


def _attrs(data: bytes, off: int, end: int) -> list[tuple[int, int, int]]:
    """The (type, start, end) of each netlink attribute in data[off:end]."""
    out: list[tuple[int, int, int]] = []
    unpack = _NLA.unpack_from
    while end - off >= 4:
        alen, atype = unpack(data, off)
        if alen < 4 or off + alen > end:
            raise XfrmDecodeError(f"attribute type {atype & C.NLA_TYPE_MASK}: length {alen} overruns its message")
        out.append((atype & C.NLA_TYPE_MASK, off + 4, off + alen))
        off += (alen + 3) & ~3
    return out


def _u32(data: bytes, s: int, e: int, what: int) -> int:
    if e - s < 4:
        raise XfrmDecodeError(f"attribute type {what} shorter than 4 octets")
    return _U32.unpack_from(data, s)[0]


# SA and Algorithm are built positionally: keyword construction of a
# 20-field frozen dataclass costs 2.5x more, and this runs 50k times per dump.
_SA_ORDER = (
    "family", "saddr", "daddr", "spi", "proto", "mode", "reqid", "flags", "replay_window",
    "selector", "lifetime", "current", "stats", "seq", "crypt", "auth", "aead", "mark",
    "if_id", "encap", "extra", "replay",
)
assert tuple(f.name for f in dataclasses.fields(SA))[: len(_SA_ORDER)] == _SA_ORDER, "records.SA changed order"


def _builder(cls: type, order: tuple[str, ...], lazy: tuple[str, ...] = ()) -> Callable[..., Any]:
    """cls(*values) at a third of the cost, for a frozen slots dataclass without
    __post_init__ (SA, Algorithm): the values go into a twin class with the same
    slots but no frozen __setattr__, where ``o.name = value`` is a plain slot store,
    and the object then becomes a ``cls`` by __class__ assignment (CPython allows
    it only between identical layouts, and checks). The result is the object
    ``cls(...)`` makes (tests/test_netlink_decode.py checks type, ``==`` and repr
    against SA(...)). Fields in ``lazy`` stay unfilled (the class's __getattr__
    fills them on first read); fields added to ``cls`` after ``order`` get their
    declared defaults."""
    fields = dataclasses.fields(cls)
    rest = [f for f in fields if f.name not in order and f.name not in lazy]
    for f in rest:
        if f.default is dataclasses.MISSING:  # no default, or a factory (would be shared)
            assert not lazy, f"{cls.__name__}.{f.name}: no default; update netlink.decode"
            return lambda *values: cls(*values)
    twin = type(f"_{cls.__name__}Fill", cls.__bases__, {"__slots__": cls.__slots__})
    ns: dict[str, Any] = {"_twin": twin, "_cls": cls}
    ns.update({f"_dflt_{f.name}": f.default for f in rest})
    body = "".join(f"    o.{n} = {n}\n" for n in order)
    body += "".join(f"    o.{f.name} = _dflt_{f.name}\n" for f in rest)
    exec(f"def build({', '.join(order)}):\n    o = _twin()\n{body}    o.__class__ = _cls\n    return o\n", ns)  # noqa: S102
    return ns["build"]


# What _sa fills: crypt/auth/aead are decoded from the _lazy slot on first read, and
# extra is set only when not empty (records.SA.__getattr__ does the rest).
_SA_LAZY = ("crypt", "auth", "aead", "extra")
_SA_EAGER = (*(n for n in _SA_ORDER if n not in _SA_LAZY), "_lazy")
_build_sa = _builder(SA, _SA_EAGER, _SA_LAZY)
_set_sa_extra = SA.__dict__["extra"].__set__
_ALG_ORDER = ("name", "key", "key_bits", "trunc_bits", "icv_bits")
assert tuple(f.name for f in dataclasses.fields(Algorithm))[:5] == _ALG_ORDER, "records.Algorithm changed order"
_build_alg = _builder(Algorithm, _ALG_ORDER)
_set_secret = Secret.__dict__["_b"].__set__  # Secret(b) stores bytes(b) in _b; a slice already is bytes


class _SAKeys(Secret):
    """An SA's algorithm attributes, raw (key bytes included, hence a Secret), until
    the first read of SA.crypt/auth/aead decodes them (records.SA.__getattr__).

    _sa has checked them already with the same rules as :func:`_algo`, so decoding
    later cannot fail; most SAs of a big dump never have their keys read."""

    __slots__ = ()

    def decode(self) -> tuple[Algorithm | None, Algorithm | None, Algorithm | None]:
        data = self._b
        crypt = auth = aead = None
        auth_kind = 0
        off, end = 0, len(data)
        unpack_nla = _NLA.unpack_from
        while end - off >= 4:  # the choices _sa would have made, made again
            alen, atype = unpack_nla(data, off)
            atype &= C.NLA_TYPE_MASK
            if atype == C.XFRMA_ALG_CRYPT:
                crypt = off
            elif atype == C.XFRMA_ALG_AUTH_TRUNC:
                auth, auth_kind = off, atype
            elif atype == C.XFRMA_ALG_AUTH:
                if auth_kind != C.XFRMA_ALG_AUTH_TRUNC:
                    auth, auth_kind = off, atype
            elif atype == C.XFRMA_ALG_AEAD:
                aead = off
            off += (alen + 3) & ~3
        return (
            None if crypt is None else _algo(data, crypt + 4, crypt + _U16.unpack_from(data, crypt)[0], C.XFRMA_ALG_CRYPT),
            None if auth is None else _algo(data, auth + 4, auth + _U16.unpack_from(data, auth)[0], auth_kind),
            None if aead is None else _algo(data, aead + 4, aead + _U16.unpack_from(data, aead)[0], C.XFRMA_ALG_AEAD),
        )


_NO_KEYS = _new(_SAKeys)
_set_secret(_NO_KEYS, b"")  # shared by SAs without algorithms (IPcomp): decodes to three None


# Algorithm attributes kept for _SAKeys, and their fixed part (xfrm_algo: name[64] and
# key length in bits; xfrm_algo_auth/xfrm_algo_aead: and the trunc/ICV length).
_ALGO_HDR = {C.XFRMA_ALG_CRYPT: 68, C.XFRMA_ALG_AUTH: 68, C.XFRMA_ALG_AUTH_TRUNC: 72, C.XFRMA_ALG_AEAD: 72}


def _sa(data: bytes, info_off: int, a_off: int, a_end: int) -> SA:
    """An SA from an xfrm_usersa_info at ``info_off`` plus the attributes in
    data[a_off:a_end] (an XFRMA_SA among them, as in DELSA, is skipped)."""
    if len(data) - info_off < SA_INFO_SIZE:
        raise XfrmDecodeError("xfrm_usersa_info truncated")
    # Unpack only what differs per SA; the selector, lifetime config and
    # stats are looked up by their raw bytes (cheaper than building 20 ints,
    # several of them 2**64-1, only to find the same record again).
    seq_, reqid, family, mode, rwin, flags = _SA_TAIL.unpack_from(data, info_off + 204)
    mark = if_id = encap = replay = None
    algs_lo = algs_hi = 0  # the span of the algorithm attributes, kept raw for later
    extra: dict[str, object] | None = None
    unpack_nla = _NLA.unpack_from
    off = a_off
    while a_end - off >= 4:
        alen, atype = unpack_nla(data, off)
        e = off + alen
        if alen < 4 or e > a_end:
            raise XfrmDecodeError(f"attribute type {atype & C.NLA_TYPE_MASK}: length {alen} overruns its message")
        atype &= C.NLA_TYPE_MASK
        s = off + 4
        if atype in _ALGO_HDR:
            # Algorithms: checked now as _algo would (every one, also an ALG_AUTH that
            # its ALG_AUTH_TRUNC twin outranks), kept raw, decoded on first read (_SAKeys).
            hdr = _ALGO_HDR[atype]
            if e - s < hdr:
                raise XfrmDecodeError(f"algorithm attribute {atype} shorter than its header")
            bits = _U32.unpack_from(data, s + 64)[0]
            if s + hdr + ((bits + 7) >> 3) > e:
                raise XfrmDecodeError(f"algorithm attribute {atype}: key of {bits} bits exceeds the attribute")
            if not algs_hi:
                algs_lo = off
            algs_hi = e
        elif atype == C.XFRMA_REPLAY_VAL:
            if e - s < _REPLAY.size:
                raise XfrmDecodeError("XFRMA_REPLAY_VAL truncated")
            if replay is None or not replay.esn:  # an ESN state is the authoritative one
                oseq, seq, _bitmap = _REPLAY.unpack_from(data, s)
                key = (oseq, seq, rwin, False)
                replay = _replay_cache.get(key) or _replay(key)
        elif atype == C.XFRMA_REPLAY_ESN_VAL:
            if e - s < _REPLAY_ESN.size:
                raise XfrmDecodeError("XFRMA_REPLAY_ESN_VAL truncated")
            bmp_len, oseq, seq, oseq_hi, seq_hi, window = _REPLAY_ESN.unpack_from(data, s)
            if _REPLAY_ESN.size + 4 * bmp_len > e - s:
                raise XfrmDecodeError("XFRMA_REPLAY_ESN_VAL bitmap overruns the attribute")
            replay = _replay(((oseq_hi << 32) | oseq, (seq_hi << 32) | seq, window, True))
        elif atype == C.XFRMA_MARK:
            if e - s < 8:
                raise XfrmDecodeError("XFRMA_MARK truncated")
            mark = _mark(_MARK.unpack_from(data, s))
        elif atype == C.XFRMA_IF_ID:
            if_id = _u32(data, s, e, atype)
        elif atype == C.XFRMA_ENCAP:
            if e - s < _ENCAP.size:
                raise XfrmDecodeError("XFRMA_ENCAP truncated")
            etype, sport, dport, oa = _ENCAP.unpack_from(data, s)
            encap = (etype, _ntohs(sport), _ntohs(dport))
            if any(oa):
                if extra is None:
                    extra = {}
                extra["encap_oa"] = _addr(family, oa)
        elif atype == C.XFRMA_LASTUSED:
            if e - s < 8:
                raise XfrmDecodeError("XFRMA_LASTUSED truncated")
            if extra is None:
                extra = {}
            extra["lastused"] = _U64.unpack_from(data, s)[0]
        elif atype != C.XFRMA_SA:
            if extra is None:
                extra = {}
            _sa_extra(data, atype, s, e, family, extra)
        off += (alen + 3) & ~3
    if algs_hi:
        keys = _new(_SAKeys)
        _set_secret(keys, data[algs_lo:algs_hi])
    else:
        keys = _NO_KEYS
    # Cache lookups inlined (this runs once per SA of a dump); misses take the slow path.
    if family == C.AF_INET:
        d4, spi, proto, s4 = _SA_ID_SADDR4.unpack_from(data, info_off + 56)
        a_src = _addr4_cache.get(s4)
        if a_src is None:  # _addr4, inlined
            a_src = _new(_V4)
            a_src._ip = s4
            if len(_addr4_cache) >= _CACHE_MAX:
                _addr4_cache.clear()
            _addr4_cache[s4] = a_src
        a_dst = _addr4_cache.get(d4)
        if a_dst is None:
            a_dst = _new(_V4)
            a_dst._ip = d4
            if len(_addr4_cache) >= _CACHE_MAX:
                _addr4_cache.clear()
            _addr4_cache[d4] = a_dst
    else:
        daddr, spi, proto, saddr = _SA_ID_SADDR.unpack_from(data, info_off + 56)
        spi = _ntohl(spi)
        a_src, a_dst = _addr(family, saddr), _addr(family, daddr)
    raw = data[info_off : info_off + 56]
    sel = _sel_raw_cache.get((raw, family)) or _selector_raw(raw, family)
    raw = data[info_off + 96 : info_off + 160]
    lft = _lft_raw_cache.get(raw) or _lifetime_raw(raw)
    raw = data[info_off + 192 : info_off + 204]
    stats = _stats_raw_cache.get(raw) or _stats_raw(raw)
    # Idle SAs installed together share their lifetime_cur (same add_time, no traffic).
    raw = data[info_off + 160 : info_off + 192]
    cur = _cur_raw_cache.get(raw) or _current_raw(raw)
    sa = _build_sa(
        family,
        a_src,
        a_dst,
        spi,
        _PROTOS.get(proto, proto),
        _MODES.get(mode, mode),
        reqid,
        flags,
        rwin,
        sel,
        lft,
        cur,
        stats,
        seq_,
        mark,
        if_id,
        encap,
        replay,
        keys,
    )
    if extra:
        _set_sa_extra(sa, extra)
    return sa


_U32_EXTRAS = {
    C.XFRMA_TFCPAD: "tfcpad",
    C.XFRMA_SA_EXTRA_FLAGS: "extra_flags",
    C.XFRMA_REPLAY_THRESH: "replay_thresh",
    C.XFRMA_ETIMER_THRESH: "etimer_thresh",
    C.XFRMA_MTIMER_THRESH: "mtimer_thresh",
    C.XFRMA_NAT_KEEPALIVE_INTERVAL: "nat_keepalive_interval",
    C.XFRMA_SA_PCPU: "pcpu",
}


def _sa_extra(data: bytes, atype: int, s: int, e: int, family: int, extra: dict[str, object]) -> None:
    """The less common SA attributes, into SA.extra (keys listed in the module doc)."""
    if atype in _U32_EXTRAS:
        extra[_U32_EXTRAS[atype]] = _u32(data, s, e, atype)
    elif atype == C.XFRMA_ALG_COMP:
        extra["comp"] = _algo(data, s, e, atype)
    elif atype in (C.XFRMA_COADDR, C.XFRMA_SRCADDR):
        if e - s < 16:
            raise XfrmDecodeError(f"attribute type {atype}: address truncated")
        extra["coaddr" if atype == C.XFRMA_COADDR else "srcaddr"] = _addr(family, data[s : s + 16])
    elif atype == C.XFRMA_SET_MARK:
        mask = extra.get("set_mark", (0, 0xFFFFFFFF))[1]  # type: ignore[index]
        extra["set_mark"] = (_u32(data, s, e, atype), mask)
    elif atype == C.XFRMA_SET_MARK_MASK:
        value = extra.get("set_mark", (0, 0))[0]  # type: ignore[index]
        extra["set_mark"] = (value, _u32(data, s, e, atype))
    elif atype == C.XFRMA_SA_DIR:
        if e - s < 1:
            raise XfrmDecodeError("XFRMA_SA_DIR truncated")
        extra["sa_dir"] = data[s]
    elif atype == C.XFRMA_OFFLOAD_DEV:
        if e - s < _OFFLOAD.size:
            raise XfrmDecodeError("XFRMA_OFFLOAD_DEV truncated")
        extra["offload"] = _OFFLOAD.unpack_from(data, s)
    elif atype == C.XFRMA_SEC_CTX:
        extra["sec_ctx"] = _sec_ctx(data, s, e)
    elif atype in (C.XFRMA_PAD, C.XFRMA_LTIME_VAL):
        pass  # padding; LTIME_VAL duplicates curlft (it appears in aevents)
    else:
        unknown = extra.get("unknown_attrs", ())
        extra["unknown_attrs"] = (*unknown, atype)  # type: ignore[misc]


def _sec_ctx(data: bytes, s: int, e: int) -> str:
    if e - s < _SEC_CTX.size:
        raise XfrmDecodeError("XFRMA_SEC_CTX truncated")
    _len, _exttype, _alg, _doi, ctx_len = _SEC_CTX.unpack_from(data, s)
    if _SEC_CTX.size + ctx_len > e - s:
        raise XfrmDecodeError("XFRMA_SEC_CTX string overruns the attribute")
    start = s + _SEC_CTX.size
    return data[start : start + ctx_len].split(b"\0", 1)[0].decode("utf-8", "replace")


def _sa_id(data: bytes, off: int, end: int) -> tuple[int, int, IPAddress]:
    if end - off < _SA_ID.size:
        raise XfrmDecodeError("xfrm_usersa_id truncated")
    daddr, spi, family, proto = _SA_ID.unpack_from(data, off)
    return (_ntohl(spi), proto, _addr(family, daddr))


def _templates(data: bytes, s: int, e: int, fallback_family: int) -> tuple[PolicyTemplate, ...]:
    if (e - s) % _TMPL.size:
        raise XfrmDecodeError("XFRMA_TMPL is not a whole number of xfrm_user_tmpl")
    out = []
    for off in range(s, e, _TMPL.size):
        daddr, spi, proto, family, saddr, reqid, mode, _share, optional, _a, _e, _c = _TMPL.unpack_from(data, off)
        out.append(
            PolicyTemplate(
                family=family,
                saddr=_addr_fallback(family, saddr, fallback_family),
                daddr=_addr_fallback(family, daddr, fallback_family),
                spi=_ntohl(spi),
                proto=_PROTOS.get(proto, proto),
                mode=_MODES.get(mode, mode),
                reqid=reqid,
                optional=bool(optional),
            )
        )
    return tuple(out)


def _policy(data: bytes, info_off: int, info_end: int, attrs: list[tuple[int, int, int]]) -> Policy:
    """A Policy from an xfrm_userpolicy_info plus attributes."""
    if info_end - info_off < _POL_INFO.size:
        raise XfrmDecodeError("xfrm_userpolicy_info truncated")
    v = _POL_INFO.unpack_from(data, info_off)
    # v[0:12] selector, v[12:20] lft, v[20:24] curlft, v[24] priority, v[25] index,
    # v[26] dir, v[27] action, v[28] flags, v[29] share
    sel = _selector(v[0:12], v[6])
    return _policy_with(sel, v[26], v[25], v[24], v[27], v[28], data, attrs)


def _policy_with(
    sel: Selector, direction: int, index: int, priority: int, action: int, flags: int,
    data: bytes, attrs: list[tuple[int, int, int]],
) -> Policy:
    templates: tuple[PolicyTemplate, ...] = ()
    mark = if_id = None
    ptype = 0
    for atype, s, e in attrs:
        if atype == C.XFRMA_TMPL:
            templates = _templates(data, s, e, sel.family)
        elif atype == C.XFRMA_MARK:
            if e - s < 8:
                raise XfrmDecodeError("XFRMA_MARK truncated")
            mark = Mark(*_MARK.unpack_from(data, s))
        elif atype == C.XFRMA_IF_ID:
            if_id = _u32(data, s, e, atype)
        elif atype == C.XFRMA_POLICY_TYPE:
            if e - s < 1:
                raise XfrmDecodeError("XFRMA_POLICY_TYPE truncated")
            ptype = data[s]
    return Policy(
        selector=sel,
        direction=_DIRS.get(direction, direction),
        index=index,
        priority=priority,
        action=action,
        templates=templates,
        mark=mark,
        if_id=if_id,
        flags=flags,
        policy_type=ptype,
    )


# --- messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message: its header and what it says.

    ``event`` for XFRM SA/policy messages (dump replies are NEW_SA/NEW_POLICY),
    ``error`` for NLMSG_ERROR (0 = ACK, else a positive errno) and for a
    NLMSG_DONE that reports a failed dump; ``error_msg`` is the extended ack.
    Messages of other types carry neither.
    """

    type: int
    flags: int
    seq: int
    pid: int
    event: XfrmEvent | None = None
    error: int | None = None
    error_msg: str | None = None


_SA_KINDS = {C.XFRM_MSG_NEWSA: EventKind.NEW_SA, C.XFRM_MSG_UPDSA: EventKind.UPD_SA}
_POLICY_KINDS = {C.XFRM_MSG_NEWPOLICY: EventKind.NEW_POLICY, C.XFRM_MSG_UPDPOLICY: EventKind.UPD_POLICY}


def _event(mtype: int, data: bytes, off: int, end: int) -> XfrmEvent | None:
    """Decode the body data[off:end] of an XFRM message of type ``mtype``."""
    if mtype in _SA_KINDS:
        if end - off < SA_INFO_SIZE:
            raise XfrmDecodeError("SA message shorter than xfrm_usersa_info")
        return XfrmEvent(_SA_KINDS[mtype], sa=_sa(data, off, off + SA_INFO_SIZE, end))
    if mtype == C.XFRM_MSG_DELSA:
        # xfrm_usersa_id, then (for kernel-reported deletions) the full state in
        # XFRMA_SA and its other attributes next to it (xfrm_user.c xfrm_notify_sa).
        sa_id = _sa_id(data, off, end)
        a_off = off + _SA_ID.size
        sa = None
        for atype, s, e in _attrs(data, a_off, end):
            if atype == C.XFRMA_SA:
                if e - s < SA_INFO_SIZE:
                    raise XfrmDecodeError("XFRMA_SA shorter than xfrm_usersa_info")
                sa = _sa(data, s, a_off, end)
        return XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=sa_id)
    if mtype == C.XFRM_MSG_EXPIRE:
        if end - off < SA_INFO_SIZE + 1:
            raise XfrmDecodeError("expire message shorter than xfrm_user_expire")
        hard = bool(data[off + SA_INFO_SIZE])
        sa = _sa(data, off, off + min(_EXPIRE_SIZE, end - off), end)
        return XfrmEvent(EventKind.EXPIRE, sa=sa, sa_id=sa.key_id, hard=hard)
    if mtype in _POLICY_KINDS:
        attrs = _attrs(data, off + _POL_INFO.size, end) if end - off >= _POL_INFO.size else []
        return XfrmEvent(_POLICY_KINDS[mtype], policy=_policy(data, off, end, attrs))
    if mtype == C.XFRM_MSG_DELPOLICY:
        if end - off < _POL_ID.size:
            raise XfrmDecodeError("xfrm_userpolicy_id truncated")
        v = _POL_ID.unpack_from(data, off)
        attrs = _attrs(data, off + _POL_ID.size, end)
        for atype, s, e in attrs:
            if atype == C.XFRMA_POLICY:  # full policy attached (xfrm_notify_policy)
                rest = [a for a in attrs if a[0] != C.XFRMA_POLICY]
                return XfrmEvent(EventKind.DEL_POLICY, policy=_policy(data, s, e, rest))
        sel = _selector(v[0:12], v[6])
        return XfrmEvent(EventKind.DEL_POLICY, policy=_policy_with(sel, v[13], v[12], 0, 0, 0, data, attrs))
    if mtype == C.XFRM_MSG_POLEXPIRE:
        if end - off < _POL_INFO.size + 1:
            raise XfrmDecodeError("policy expire message truncated")
        hard = bool(data[off + _POL_INFO.size])
        attrs = _attrs(data, off + min(_POLEXPIRE_SIZE, end - off), end)
        return XfrmEvent(EventKind.POLICY_EXPIRE, policy=_policy(data, off, end, attrs), hard=hard)
    if mtype == C.XFRM_MSG_FLUSHSA:
        if end - off < 1:
            raise XfrmDecodeError("flush message truncated")
        return XfrmEvent(EventKind.FLUSH_SA, proto=data[off])
    if mtype == C.XFRM_MSG_FLUSHPOLICY:
        return XfrmEvent(EventKind.FLUSH_POLICY)
    return None  # ACQUIRE, aevents, REPORT, MIGRATE, MAPPING...: not ours


def _error(data: bytes, off: int, end: int, flags: int) -> tuple[int, str | None]:
    """struct nlmsgerr: int error, the request's nlmsghdr (+ body unless
    NLM_F_CAPPED), then extended-ack TLVs if NLM_F_ACK_TLVS."""
    if end - off < 4:
        raise XfrmDecodeError("NLMSG_ERROR truncated")
    code = -_I32.unpack_from(data, off)[0]
    msg = None
    if flags & NLM_F_ACK_TLVS and end - off >= _NLMSGERR_MIN:
        inner_len = _NLMSGHDR.unpack_from(data, off + 4)[0]
        tlv = off + 4 + (16 if flags & NLM_F_CAPPED else ((inner_len + 3) & ~3))
        if tlv <= end:
            for atype, s, e in _attrs(data, tlv, end):
                if atype == C.NLMSGERR_ATTR_MSG:
                    msg = data[s:e].split(b"\0", 1)[0].decode("utf-8", "replace")
    return code, msg


def iter_raw(data: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """Split a datagram into (type, flags, seq, pid, body_start, body_end)."""
    out = []
    off = 0
    n = len(data)
    unpack = _NLMSGHDR.unpack_from
    while n - off >= 16:
        mlen, mtype, mflags, seq, pid = unpack(data, off)
        if mlen < 16 or off + mlen > n:
            raise XfrmDecodeError(f"netlink message length {mlen} does not fit the buffer")
        out.append((mtype, mflags, seq, pid, off + 16, off + mlen))
        off += (mlen + 3) & ~3
    if off < n and any(data[off:]):
        raise XfrmDecodeError("trailing bytes after the last netlink message")
    return out


def decode_messages(buf: bytes | bytearray | memoryview) -> list[Message]:
    """Decode every netlink message in ``buf`` (one or more datagrams' worth).

    Raises XfrmDecodeError, and only that, on malformed input.
    """
    data = bytes(buf)
    try:
        out = []
        for mtype, mflags, seq, pid, s, e in iter_raw(data):
            if mtype == C.NLMSG_ERROR:
                code, text = _error(data, s, e, mflags)
                out.append(Message(mtype, mflags, seq, pid, error=code, error_msg=text))
            elif mtype == C.NLMSG_DONE:
                code = -_I32.unpack_from(data, s)[0] if e - s >= 4 else 0
                out.append(Message(mtype, mflags, seq, pid, error=code or None))
            else:
                out.append(Message(mtype, mflags, seq, pid, event=_event(mtype, data, s, e)))
        return out
    except XfrmDecodeError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError) as exc:
        # Belt and braces: the checks above should make this unreachable.
        raise XfrmDecodeError(f"malformed XFRM message ({type(exc).__name__})") from None


def decode_sa(raw: bytes | bytearray | memoryview) -> SA:
    """An SA from the body of an XFRM_MSG_NEWSA/UPDSA message (xfrm_usersa_info
    followed by attributes) or from an XFRMA_SA payload (just the info).

    Raises XfrmDecodeError, and only that, on malformed input.
    """
    data = bytes(raw)
    try:
        if len(data) < SA_INFO_SIZE:
            raise XfrmDecodeError(f"xfrm_usersa_info needs {SA_INFO_SIZE} octets, got {len(data)}")
        return _sa(data, 0, SA_INFO_SIZE, len(data))
    except XfrmDecodeError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError) as exc:
        raise XfrmDecodeError(f"malformed xfrm_usersa_info ({type(exc).__name__})") from None


def decode_policy(raw: bytes | bytearray | memoryview) -> Policy:
    """A Policy from the body of an XFRM_MSG_NEWPOLICY message."""
    data = bytes(raw)
    try:
        if len(data) < _POL_INFO.size:
            raise XfrmDecodeError("xfrm_userpolicy_info truncated")
        return _policy(data, 0, len(data), _attrs(data, _POL_INFO.size, len(data)))
    except XfrmDecodeError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError) as exc:
        raise XfrmDecodeError(f"malformed xfrm_userpolicy_info ({type(exc).__name__})") from None


class DumpResult:
    """Accumulates one dump's replies (see :func:`feed_dump`)."""

    __slots__ = ("items", "done", "interrupted", "error", "error_msg")

    def __init__(self) -> None:
        self.items: list[SA] | list[Policy] = []
        self.done = False
        self.interrupted = False  # NLM_F_DUMP_INTR seen: the dump is inconsistent
        self.error: int | None = None
        self.error_msg: str | None = None


def feed_dump(data: bytes, seq: int, want_type: int, result: DumpResult) -> None:
    """Hot path of a dump: decode one received datagram straight into ``result``,
    skipping messages of other sequence numbers (stray replies, notifications).
    """
    if type(data) is not bytes:  # key slices must be immutable bytes (Secret's contract)
        data = bytes(data)
    try:
        items = result.items
        attrs = _attrs
        unpack_hdr = _NLMSGHDR.unpack_from
        n = len(data)
        off = 0
        while n - off >= 16:  # iter_raw, inlined: this loop runs once per SA
            mlen, mtype, mflags, mseq, _pid = unpack_hdr(data, off)
            if mlen < 16 or off + mlen > n:
                raise XfrmDecodeError(f"netlink message length {mlen} does not fit the buffer")
            s, e = off + 16, off + mlen
            off += (mlen + 3) & ~3
            if mseq != seq:
                continue
            if mflags & C.NLM_F_DUMP_INTR:
                result.interrupted = True
            if mtype == want_type:
                if want_type == C.XFRM_MSG_NEWSA:
                    if e - s < SA_INFO_SIZE:
                        raise XfrmDecodeError("SA message shorter than xfrm_usersa_info")
                    items.append(_sa(data, s, s + SA_INFO_SIZE, e))  # type: ignore[arg-type]
                else:
                    pattrs = attrs(data, s + _POL_INFO.size, e) if e - s >= _POL_INFO.size else []
                    items.append(_policy(data, s, e, pattrs))  # type: ignore[arg-type]
            elif mtype == C.NLMSG_DONE:
                code = -_I32.unpack_from(data, s)[0] if e - s >= 4 else 0
                if code:
                    result.error = code
                result.done = True
            elif mtype == C.NLMSG_ERROR:
                code, text = _error(data, s, e, mflags)
                if code:
                    result.error, result.error_msg = code, text
                result.done = True
    except XfrmDecodeError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError) as exc:
        raise XfrmDecodeError(f"malformed dump reply ({type(exc).__name__})") from None
