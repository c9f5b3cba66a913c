"""Typed, immutable records of the kernel's XFRM state (SAs and policies).

These are the contract between netlink/ (which decodes them from NETLINK_XFRM
messages) and the rest of xwamp (binder, agent, exporter). Key bytes are
always :class:`netlink.secret.Secret`.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from netlink.secret import Secret

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Proto(enum.IntEnum):
    ESP = 50
    AH = 51
    COMP = 108  # IPcomp SAs show up in dumps; xwamp never binds to them


class Mode(enum.IntEnum):
    TRANSPORT = 0
    TUNNEL = 1
    ROUTEOPTIMIZATION = 2
    IN_TRIGGER = 3
    BEET = 4


class Direction(enum.IntEnum):
    IN = 0
    OUT = 1
    FWD = 2


@dataclass(frozen=True, slots=True)
class Selector:
    family: int
    saddr: IPAddress
    daddr: IPAddress
    prefixlen_s: int
    prefixlen_d: int
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    proto: int = 0
    ifindex: int = 0
    user: int = 0


@dataclass(frozen=True, slots=True)
class Algorithm:
    """One of XFRMA_ALG_CRYPT / ALG_AUTH / ALG_AUTH_TRUNC / ALG_AEAD."""

    name: str  # kernel crypto name, e.g. "cbc(aes)", "hmac(sha256)", "rfc4106(gcm(aes))"
    key: Secret
    key_bits: int
    trunc_bits: int | None = None  # ALG_AUTH_TRUNC only
    icv_bits: int | None = None  # ALG_AEAD only


@dataclass(frozen=True, slots=True)
class LifetimeConfig:
    soft_byte_limit: int
    hard_byte_limit: int
    soft_packet_limit: int
    hard_packet_limit: int
    soft_add_expires_seconds: int
    hard_add_expires_seconds: int
    soft_use_expires_seconds: int
    hard_use_expires_seconds: int


@dataclass(frozen=True, slots=True)
class LifetimeCurrent:
    bytes: int
    packets: int
    add_time: int  # unix seconds
    use_time: int  # unix seconds, 0 if never used


@dataclass(frozen=True, slots=True)
class Stats:
    replay_window: int
    replay: int
    integrity_failed: int


@dataclass(frozen=True, slots=True)
class ReplayState:
    """Anti-replay state: XFRMA_REPLAY_VAL, or XFRMA_REPLAY_ESN_VAL (64-bit counters)."""

    oseq: int  # last sequence number sent
    seq: int  # highest sequence number received
    window: int  # replay window in packets
    esn: bool = False  # from XFRMA_REPLAY_ESN_VAL: oseq/seq include the high 32 bits


@dataclass(frozen=True, slots=True)
class Mark:
    value: int
    mask: int


class _LazyFields:
    """SA's one slot that is not a field: how to decode the fields netlink.decode left
    unfilled (see SA.__getattr__). Not a field, so not in repr, ==, hash or SA(...)."""

    __slots__ = ("_lazy",)


_LAZY_ALGS = frozenset(("crypt", "auth", "aead"))


@dataclass(frozen=True, slots=True)
class SA(_LazyFields):
    """One XFRM state (struct xfrm_usersa_info plus its attributes).

    netlink.decode leaves some fields unfilled until first read, which
    ``__getattr__`` then decodes: ``crypt``/``auth``/``aead`` (most SAs of a
    50k-SA dump never have their keys read; ``_lazy`` holds the algorithm
    attributes, inside a :class:`Secret`, validated at decode time) and an
    empty ``extra``. Records made with ``SA(...)`` have every field filled.
    """

    family: int
    saddr: IPAddress
    daddr: IPAddress
    spi: int  # host order
    proto: Proto | int
    mode: Mode | int
    reqid: int
    flags: int
    replay_window: int
    selector: Selector
    lifetime: LifetimeConfig
    current: LifetimeCurrent
    stats: Stats
    seq: int = 0
    crypt: Algorithm | None = None
    auth: Algorithm | None = None  # ALG_AUTH or ALG_AUTH_TRUNC (trunc_bits set)
    aead: Algorithm | None = None
    mark: Mark | None = None
    if_id: int | None = None
    encap: tuple[int, int, int] | None = None  # (type, sport, dport) for UDP encapsulation
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    replay: ReplayState | None = None  # anti-replay counters (sequence numbers)

    def __getattr__(self, name: str) -> Any:
        # Python calls this only when normal lookup fails: here, an unfilled slot.
        if name in _LAZY_ALGS:
            try:
                lazy = _get_lazy(self)
            except AttributeError:  # made by SA(...): every field is filled
                lazy = None
            if lazy is not None:
                crypt, auth, aead = lazy.decode()
                # frozen: fill the slots through their descriptors, as netlink.decode does
                _set_crypt(self, crypt)
                _set_auth(self, auth)
                _set_aead(self, aead)
                _set_lazy(self, None)  # after the fields: a racing reader sees one or the other
            return object.__getattribute__(self, name)
        if name == "extra":
            # No rare attributes: the dict is made on first read, not per SA of a dump.
            # (Two threads racing here may each get a fresh empty dict; nothing writes to it.)
            extra: dict[str, object] = {}
            _set_extra(self, extra)
            return extra
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def key_id(self) -> tuple[int, int, IPAddress]:
        """(spi, proto, daddr): how the kernel itself identifies an SA."""
        return (self.spi, int(self.proto), self.daddr)

    @property
    def keys_redacted(self) -> bool:
        """True when the kernel zeroed every key (lockdown=confidentiality)."""
        algs = [a for a in (self.crypt, self.auth, self.aead) if a is not None and len(a.key)]
        return bool(algs) and all(a.key.is_zero for a in algs)


_get_lazy = _LazyFields._lazy.__get__  # type: ignore[attr-defined]
_set_lazy = _LazyFields._lazy.__set__  # type: ignore[attr-defined]
_set_crypt = SA.__dict__["crypt"].__set__
_set_auth = SA.__dict__["auth"].__set__
_set_aead = SA.__dict__["aead"].__set__
_set_extra = SA.__dict__["extra"].__set__


@dataclass(frozen=True, slots=True)
class PolicyTemplate:
    family: int
    saddr: IPAddress
    daddr: IPAddress
    spi: int
    proto: int
    mode: int
    reqid: int
    optional: bool = False  # "level use": the policy also matches without this SA


@dataclass(frozen=True, slots=True)
class Policy:
    selector: Selector
    direction: Direction | int
    index: int
    priority: int
    action: int  # 0 allow, 1 block
    templates: tuple[PolicyTemplate, ...] = ()
    mark: Mark | None = None
    if_id: int | None = None
    flags: int = 0  # XFRM_POLICY_LOCALOK | XFRM_POLICY_ICMP
    policy_type: int = 0  # XFRM_POLICY_TYPE_MAIN (0) or _SUB (1), from XFRMA_POLICY_TYPE
