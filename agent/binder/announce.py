"""The key binder: ties an O/TWAMP control connection to the IPsec SA pair its
tests ride in, and keys the IPsec-bound modes from it (docs/wire-format.md).

API
---
Modes and wire format
    :class:`Modes` (IPSEC_BOUND / IPSEC_ALT1 / IPSEC_ALT2 bits), :func:`rfc7717_bit`,
    :class:`Announcement` (the Server-Greeting's 12 Unused octets: ``pack``/``unpack``),
    :func:`register_modes` (registers the bits with ``agent.control.modes``).

:class:`Binder` (one per agent, over the live :class:`netlink.table.SATable`)
    ``announce(server, client) -> Binding``   server side: pick the SA pair, build the announcement
    ``accept(unused, client, server) -> Binding``  client side: validate it against our own table
    ``check_mode(mode, protocol)``            reject mode combinations of wire-format §1.2
    ``refusals``                              Counter of refusal reasons (exporter metric)
    Both raise :class:`agent.binder.keys.BinderRefusal` (``.reason`` machine-readable).

:class:`Binding` (one per control connection)
    ``token_key(mode)``, ``control_keys(mode)``, ``make_token(mode, challenge)``,
    ``token_ok(mode, challenge, token)``,
    ``test_keys(mode, sid)``: the keys of each mode; ``describe()`` for logs (SPIs, reqid,
    root fingerprint only).

:class:`BinderKeySource` — the adapter for ``agent.control.keyring``'s key seam
    (``greeting_extra``, ``token_key``, ``make_token``, ``open_token``, ``test_keys``);
    chain it before passphrase sources with ``agent.control.keyring.ChainedKeySource``.
    The control plane calls ``forget(ctx)`` when a connection closes, and must
    offer bits 29-31 only when ``greeting_extra`` returned an announcement.

:class:`RekeyTracker` — given table events, tells bound sessions
    :class:`Rebind` (new SA pair, same tunnel) or :class:`Stop` (deleted, no successor).

Logging: SPI, reqid, protocol and ``Secret.fingerprint()`` only; never keys.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from agent.binder import keys as ik
from agent.binder.ikev2 import DEFAULT_PRF, PRF
from agent.binder.keys import BinderRefusal, ControlKeys, Reason
from agent.binder.keysource import IKEKeySource, IKEMaterial
from agent.engine.keys import TestKeys
from netlink.events import EventKind, XfrmEvent
from netlink.records import SA, IPAddress, Proto
from netlink.secret import Secret
from netlink.table import SATable

if TYPE_CHECKING:  # agent.control.keyring imports the control plane; keep the binder importable without it
    from agent.control.keyring import HandshakeContext

log = logging.getLogger("xwamp.binder")


class Modes(enum.IntFlag):
    """xwamp's private Modes bits (wire-format §1.1): the three highest, unassigned in
    both IANA registries, which have no private range (see the spec for why)."""

    IPSEC_BOUND = 1 << 31  # draft §4.1
    IPSEC_ALT1 = 1 << 30  # draft §4.2.1
    IPSEC_ALT2 = 1 << 29  # draft §4.2.2


IPSEC_BITS = int(Modes.IPSEC_BOUND | Modes.IPSEC_ALT1 | Modes.IPSEC_ALT2)
RFC7717_TWAMP = 0x80  # IANA TWAMP-Modes bit 7
RFC7717_OWAMP = 0x10  # IANA OWAMP-Modes bit 4
UNAUTHENTICATED = 1
KEYED_SECURITY = 2 | 4 | 8  # authenticated, encrypted, mixed (RFC 4656, RFC 5618)


def rfc7717_bit(protocol: str) -> int:
    return RFC7717_TWAMP if protocol == "twamp" else RFC7717_OWAMP


def register_modes() -> None:
    """Register bits 29-31 as key modes with the control plane (IPSEC_BOUND may go with unauth)."""
    from agent.control import modes as md

    for bit, name, unauth in ((Modes.IPSEC_BOUND, "ipsec-bound", True), (Modes.IPSEC_ALT1, "ipsec-alt1", False),
                              (Modes.IPSEC_ALT2, "ipsec-alt2", False)):
        md.register_key_mode(md.KeyMode(int(bit), name, with_unauth=unauth))


class Root(enum.IntEnum):
    KEYMAT = 0
    SKEYSEED = 1


FLAG_SID_BOUND = 0x01
_MIN_SPI = 256  # RFC 4303 §2.1 / RFC 4302 §2.4: 0 never sent, 1-255 reserved


@dataclass(frozen=True, slots=True)
class Announcement:
    """The Binding Announcement in the Server-Greeting's Unused octets (wire-format §2.1)."""

    spi_c2s: int
    proto: int
    root: Root = Root.KEYMAT
    prf: PRF = DEFAULT_PRF
    flags: int = 0
    spi_s2c: int = 0

    SIZE = 12

    @property
    def sid_bound(self) -> bool:
        return bool(self.flags & FLAG_SID_BOUND)

    def pack(self) -> bytes:
        return (self.spi_c2s.to_bytes(4, "big") + bytes((int(self.proto), int(self.root), int(self.prf), self.flags))
                + self.spi_s2c.to_bytes(4, "big"))

    @classmethod
    def unpack(cls, data: bytes) -> "Announcement":
        """Parse and validate (rule 1 of wire-format §2.1); BinderRefusal(bad_announcement) otherwise."""
        if len(data) != cls.SIZE:
            raise BinderRefusal(Reason.BAD_ANNOUNCEMENT, f"length {len(data)}")
        spi_c2s = int.from_bytes(data[0:4], "big")
        proto, root, prf, flags = data[4], data[5], data[6], data[7]
        spi_s2c = int.from_bytes(data[8:12], "big")
        if proto not in (Proto.ESP, Proto.AH):
            raise BinderRefusal(Reason.BAD_ANNOUNCEMENT, f"protocol {proto}")
        if spi_c2s < _MIN_SPI or spi_s2c < _MIN_SPI:
            raise BinderRefusal(Reason.BAD_ANNOUNCEMENT, f"reserved SPI 0x{spi_c2s:08x}/0x{spi_s2c:08x}")
        if root not in (0, 1):
            raise BinderRefusal(Reason.BAD_ANNOUNCEMENT, f"root {root}")
        if prf not in {p.value for p in PRF}:
            raise BinderRefusal(Reason.BAD_ANNOUNCEMENT, f"prf id {prf}")
        if flags & ~FLAG_SID_BOUND:
            raise BinderRefusal(Reason.BAD_ANNOUNCEMENT, f"flags 0x{flags:02x}")
        return cls(spi_c2s, proto, Root(root), PRF(prf), flags, spi_s2c)


@dataclass(frozen=True, slots=True)
class BinderConfig:
    root: Root = Root.KEYMAT
    prf: PRF = DEFAULT_PRF
    sid_bound: bool = False  # announce Flags bit 0 (IPSEC_BOUND test keys = PRF{root, SID})
    accept_prfs: frozenset[PRF] = frozenset(PRF)  # client: PRFs it agrees to use
    allow_alt2: bool = False  # key reuse with ESP (wire-format §4.3): off by default


@dataclass(frozen=True, eq=False)
class Binding:
    """One control connection bound to one SA pair. Keys are derived on demand."""

    role: Literal["client", "server"]
    announcement: Announcement
    c2s: SA
    s2c: SA
    ike: IKEMaterial | None = field(default=None, repr=False)
    config: BinderConfig = field(default_factory=BinderConfig, repr=False)

    @property
    def reqid(self) -> int:
        return self.c2s.reqid

    @property
    def prf(self) -> PRF:
        return self.announcement.prf

    def root(self) -> Secret:
        if self.announcement.root == Root.SKEYSEED:
            if self.ike is None or self.ike.skeyseed is None:
                raise BinderRefusal(Reason.NO_IKE_SOURCE, self._ids())
            return self.ike.skeyseed
        return ik.rebuild_keymat(self.c2s, self.s2c)

    def _ids(self) -> str:
        return f"spi_c2s=0x{self.c2s.spi:08x} spi_s2c=0x{self.s2c.spi:08x} proto={int(self.c2s.proto)} reqid={self.reqid}"

    def describe(self) -> str:
        """Log line: SPIs, reqid, protocol, root kind and its fingerprint; no key bytes."""
        try:
            fp = self.root().fingerprint()
        except BinderRefusal as e:
            fp = f"unavailable({e.reason.value})"
        return f"{self.role} {self._ids()} root={self.announcement.root.name} prf={self.prf.name} root_fp={fp}"

    def __repr__(self) -> str:
        return f"<Binding {self.role} {self._ids()}>"

    # --- keys per mode (wire-format §4) --------------------------------------

    def token_key(self, mode: int, protocol: str = "twamp") -> Secret | None:
        """The 16-octet RFC 4656 Token key (replaces PBKDF2) for IPSEC_BOUND. (RFC 7717 is
        its own key mode, keyed from the IKE SA alone: agent.binder.rfc7717.)"""
        if mode & Modes.IPSEC_BOUND:
            return ik.token_key16(self.root(), self.prf)
        return None

    def control_keys(self, mode: int) -> ControlKeys | None:
        """Derived control session keys (Alternatives 1 and 2); None for the other modes."""
        if mode & Modes.IPSEC_ALT1:
            return ik.alt1_keys(self.root(), self.prf)
        if mode & Modes.IPSEC_ALT2:
            if not self.config.allow_alt2:
                raise BinderRefusal(Reason.BAD_MODE, "IPSEC_ALT2 disabled")
            return ik.alt2_keys(self.c2s, self.prf)
        return None

    def make_token(self, mode: int, challenge: bytes) -> tuple[bytes, ControlKeys] | None:
        """Client: (Token, control keys) for ALT1/ALT2, None for modes using the RFC 4656 Token."""
        keys = self.control_keys(mode)
        if keys is None:
            return None
        if mode & Modes.IPSEC_ALT1:
            return ik.alt1_token(self.root(), challenge, self.prf), keys
        return ik.ALT2_TOKEN, keys

    def token_ok(self, mode: int, challenge: bytes, token: bytes) -> bool:
        """Server: does the ALT1/ALT2 Token prove the client holds the same keys (wire-format §4.2/4.3)?"""
        if mode & Modes.IPSEC_ALT1:
            return ik.alt1_token_ok(self.root(), challenge, token, self.prf)
        if mode & Modes.IPSEC_ALT2:
            return len(token) == 64 and not any(token)
        return False

    def test_keys(self, mode: int, sid: bytes) -> TestKeys | None:
        """Test-session keys once Accept-Session delivered ``sid``; None = RFC 4656 §4.1.1 derivation."""
        keys = self.control_keys(mode)
        if keys is not None:
            return keys.as_test_keys()  # draft §4.2: one pair for Control and Test
        if mode & Modes.IPSEC_BOUND and self.announcement.sid_bound:
            return ik.sid_test_keys(self.root(), sid, self.prf)
        return None


def _addr(a: IPAddress) -> IPAddress:
    """Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; the kernel's SAs use the IPv4 form."""
    mapped = getattr(a, "ipv4_mapped", None)
    return mapped if mapped is not None else a


def _newest(sas: Iterable[SA]) -> SA | None:
    best: SA | None = None
    for sa in sas:  # insertion order: a later SA with the same add_time wins
        if best is None or sa.current.add_time >= best.current.add_time:
            best = sa
    return best


class Binder:
    """Server and client halves of the binding (wire-format §2.1). O(1) table lookups:
    ``pair``/``get`` by key, plus a scan of one reqid's handful of SAs."""

    def __init__(self, table: SATable, config: BinderConfig | None = None, ike: IKEKeySource | None = None) -> None:
        self.table = table
        self.config = config or BinderConfig()
        self.ike = ike
        self.refusals: collections.Counter[str] = collections.Counter()

    def _refuse(self, reason: Reason, detail: str, count: bool = True) -> BinderRefusal:
        refusal = BinderRefusal(reason, detail)
        return self.count(refusal) if count else refusal

    def count(self, refusal: BinderRefusal) -> BinderRefusal:
        """Count and log a refusal raised elsewhere (e.g. by a Binding's key derivation)."""
        self.refusals[refusal.reason.value] += 1
        log.info("binder refused: reason=%s %s", refusal.reason.value, refusal.detail)
        return refusal

    def _ike_for(self, c2s: SA, s2c: SA) -> IKEMaterial | None:
        if self.ike is None:
            return None
        return self.ike.by_child_spis(c2s.spi, s2c.spi) or self.ike.by_reqid(c2s.reqid)

    def _finish(self, role: Literal["client", "server"], ann: Announcement, c2s: SA, s2c: SA,
                count: bool = True) -> Binding:
        for sa in (c2s, s2c):
            try:
                ik.check_usable(sa)
            except BinderRefusal as e:
                raise self._refuse(e.reason, e.detail, count) from None
        ike = self._ike_for(c2s, s2c)
        if ann.root == Root.SKEYSEED and (ike is None or ike.skeyseed is None):
            raise self._refuse(Reason.NO_IKE_SOURCE, f"spi=0x{c2s.spi:08x} reqid={c2s.reqid}", count)
        b = Binding(role, ann, c2s, s2c, ike, self.config)
        log.debug("bound %s", b.describe())
        return b

    # --- server -------------------------------------------------------------

    def announce(self, server: IPAddress, client: IPAddress, *, count: bool = True) -> Binding:
        """Find the SA pair of this control connection and the announcement naming it.

        ``count=False``: a probe (the Server-Greeting deciding whether to offer the IPsec
        modes); finding no SA then is not a refusal, and is neither counted nor logged."""
        server, client = _addr(server), _addr(client)
        # Inbound candidates (client->server), best first: ESP before AH (an AH+ESP bundle
        # keys from ESP), newest first; the pair is the first whose CHILD_SA (same reqid)
        # also has an outbound SA. A handful of SAs per host pair: effectively O(1).
        inbound = [sa for sa in self.table.between(client, server) if int(sa.proto) in (Proto.ESP, Proto.AH)]
        if not inbound:
            raise self._refuse(Reason.NO_SA, f"no SA {client}->{server}", count)
        inbound.sort(key=lambda sa: (int(sa.proto) == Proto.ESP, sa.current.add_time), reverse=True)
        c2s = s2c = None
        for cand in inbound:
            s2c = _newest(sa for sa in self.table.by_reqid(cand.reqid)
                          if sa.saddr == server and sa.daddr == client and int(sa.proto) == int(cand.proto))
            if s2c is not None:
                c2s = cand
                break
        if c2s is None or s2c is None:
            best = inbound[0]
            raise self._refuse(Reason.NO_REVERSE_SA, f"spi=0x{best.spi:08x} reqid={best.reqid}", count)
        ann = Announcement(c2s.spi, int(c2s.proto), self.config.root, self.config.prf,
                           FLAG_SID_BOUND if self.config.sid_bound else 0, s2c.spi)
        return self._finish("server", ann, c2s, s2c, count)

    def offerable(self, binding: Binding, protocol: str = "twamp") -> int:
        """The IPsec bits a server may offer with this binding (wire-format §1)."""
        bits = int(Modes.IPSEC_BOUND | Modes.IPSEC_ALT1)
        if self.config.allow_alt2:
            try:
                ik.alt2_keys(binding.c2s, binding.prf)
                bits |= Modes.IPSEC_ALT2
            except BinderRefusal:
                pass
        return bits

    # --- client -------------------------------------------------------------

    def accept(self, unused: bytes, client: IPAddress, server: IPAddress) -> Binding:
        """Validate the greeting's announcement against our own kernel (draft §4.1: else MUST close)."""
        client, server = _addr(client), _addr(server)
        try:
            ann = Announcement.unpack(bytes(unused))
        except BinderRefusal as e:
            raise self._refuse(e.reason, e.detail) from None
        if ann.prf not in self.config.accept_prfs:
            raise self._refuse(Reason.UNSUPPORTED_PRF, f"prf {ann.prf.name}")
        c2s = self.table.get(ann.spi_c2s, ann.proto, server)
        if c2s is None:
            raise self._refuse(Reason.NO_SA, f"spi=0x{ann.spi_c2s:08x} proto={ann.proto} daddr={server}")
        if c2s.saddr != client:
            raise self._refuse(Reason.SA_MISMATCH, f"{ik.describe(c2s)}: source is not {client}")
        s2c = self.table.get(ann.spi_s2c, ann.proto, client)
        if s2c is None:
            raise self._refuse(Reason.NO_REVERSE_SA, f"spi=0x{ann.spi_s2c:08x} proto={ann.proto} daddr={client}")
        if s2c.saddr != server:
            raise self._refuse(Reason.SA_MISMATCH, f"{ik.describe(s2c)}: source is not {server}")
        if s2c.reqid != c2s.reqid:
            raise self._refuse(Reason.SA_MISMATCH, f"reqid {c2s.reqid} vs {s2c.reqid}")
        return self._finish("client", ann, c2s, s2c)

    def check_mode(self, mode: int, protocol: str = "twamp") -> None:
        """Wire-format §1.2: at most one key bit; ALT1/ALT2 need a keyed security bit."""
        if mode & rfc7717_bit(protocol) and mode & IPSEC_BITS:
            raise self._refuse(Reason.BAD_MODE, f"mode 0x{mode:08x}: more than one key mode")
        key_bits = mode & IPSEC_BITS
        if key_bits & (key_bits - 1):
            raise self._refuse(Reason.BAD_MODE, f"mode 0x{mode:08x}: more than one key mode")
        if key_bits and key_bits != Modes.IPSEC_BOUND and not mode & KEYED_SECURITY:
            raise self._refuse(Reason.BAD_MODE, f"mode 0x{mode:08x}: needs authenticated/encrypted/mixed")


# --- adapter to agent.control.keyring's seam -------------------------------------------------


class BinderKeySource:
    """``agent.control.keyring`` key-source hooks backed by a :class:`Binder`.

    Answers only when ``ctx.mode`` carries one of its key bits, so it chains in
    front of passphrase sources. Bindings are kept per connection
    (local, peer) until :meth:`forget`; at most ``max_bindings`` are kept.
    """

    def __init__(self, binder: Binder, max_bindings: int = 4096) -> None:
        self.binder = binder
        self.max_bindings = max_bindings
        self._bindings: collections.OrderedDict[Hashable, Binding] = collections.OrderedDict()

    @staticmethod
    def _conn(ctx: HandshakeContext) -> Hashable:
        return (ctx.role, ctx.local, ctx.peer)

    def _mine(self, ctx: HandshakeContext) -> bool:
        return bool(ctx.mode & IPSEC_BITS)

    def _remember(self, ctx: HandshakeContext, b: Binding) -> Binding:
        self._bindings[self._conn(ctx)] = b
        while len(self._bindings) > self.max_bindings:
            self._bindings.popitem(last=False)
        return b

    def binding(self, ctx: HandshakeContext, *, probe: bool = False) -> Binding:
        """The connection's binding; on the client, validates the greeting on first use.

        ``probe``: the server's greeting asking whether there is an SA pair at all. A
        miss is then no refusal (the IPsec modes are simply not offered); it counts once
        a client picks an IPsec mode on such a connection, through the other hooks."""
        b = self._bindings.get(self._conn(ctx))
        if b is not None:
            return b
        if ctx.local is None or ctx.peer is None:
            raise self.binder._refuse(Reason.NO_SA, "connection addresses unknown", not probe)
        if ctx.role == "client":
            return self._remember(ctx, self.binder.accept(ctx.greeting_unused, ctx.local[0], ctx.peer[0]))
        return self._remember(ctx, self.binder.announce(ctx.local[0], ctx.peer[0], count=not probe))

    def forget(self, ctx: HandshakeContext) -> None:
        self._bindings.pop(self._conn(ctx), None)

    # hooks ------------------------------------------------------------------

    def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        return None  # never a passphrase

    def greeting_extra(self, ctx: HandshakeContext) -> bytes | None:
        """Server: the announcement, or None when this connection has no usable SA pair."""
        try:
            b = self.binding(ctx, probe=True)
        except BinderRefusal:
            return None
        return b.announcement.pack()

    def validate(self, ctx: HandshakeContext) -> Binding | None:
        """Client: call when the greeting arrives and an IPsec bit is chosen (also for
        unauth + IPSEC_BOUND, which has no Token). Raises BinderRefusal: close the connection."""
        if not self._mine(ctx):
            return None
        self.binder.check_mode(ctx.mode, ctx.protocol)
        return self.binding(ctx)

    def _keys(self, fn, *args):
        """Run a Binding key derivation, counting its refusals (they carry the reason)."""
        try:
            return fn(*args)
        except BinderRefusal as e:
            raise self.binder.count(e) from None

    def token_key(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        if not self._mine(ctx) or ctx.mode & (Modes.IPSEC_ALT1 | Modes.IPSEC_ALT2):
            return None
        self.binder.check_mode(ctx.mode, ctx.protocol)
        return self._keys(self.binding(ctx).token_key, ctx.mode, ctx.protocol)

    def make_token(self, key_id: str, ctx: HandshakeContext, challenge: bytes) -> tuple[bytes, ControlKeys] | None:
        if not ctx.mode & (Modes.IPSEC_ALT1 | Modes.IPSEC_ALT2):
            return None
        self.binder.check_mode(ctx.mode, ctx.protocol)
        return self._keys(self.binding(ctx).make_token, ctx.mode, challenge)

    def open_token(self, key_id: str, ctx: HandshakeContext, challenge: bytes, token: bytes) -> ControlKeys | None:
        if not ctx.mode & (Modes.IPSEC_ALT1 | Modes.IPSEC_ALT2):
            return None
        from agent.control.keyring import TokenRejected

        try:
            self.binder.check_mode(ctx.mode, ctx.protocol)
            b = self.binding(ctx)
            keys = self._keys(b.control_keys, ctx.mode)
            ok = keys is not None and b.token_ok(ctx.mode, challenge, token)
        except BinderRefusal as e:
            raise TokenRejected(e.reason.value) from None
        if not ok:
            self.binder.refusals["token_mismatch"] += 1
            raise TokenRejected("token mismatch")
        return keys

    def test_keys(self, sid: bytes, ctx: HandshakeContext) -> TestKeys | None:
        if not self._mine(ctx):
            return None
        return self._keys(self.binding(ctx).test_keys, ctx.mode, sid)

    def __repr__(self) -> str:
        return f"<BinderKeySource {len(self._bindings)} bindings>"


# --- rekey ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rebind:
    """The bound SA was replaced by a rekey: re-establish control on the new pair (wire-format §5)."""

    key: Hashable
    old: Binding
    new_c2s: SA
    new_s2c: SA

    def __repr__(self) -> str:
        return (f"<Rebind {self.key!r} 0x{self.old.c2s.spi:08x}->0x{self.new_c2s.spi:08x} "
                f"0x{self.old.s2c.spi:08x}->0x{self.new_s2c.spi:08x} reqid={self.old.reqid}>")


@dataclass(frozen=True, slots=True)
class Stop:
    """The bound SA is gone and no successor appeared within the grace period."""

    key: Hashable
    old: Binding
    reason: Reason = Reason.SA_DELETED

    def __repr__(self) -> str:
        return f"<Stop {self.key!r} {self.reason.value} spi=0x{self.old.c2s.spi:08x} reqid={self.old.reqid}>"


Action = Rebind | Stop
SAId = tuple[int, int, IPAddress]


class RekeyTracker:
    """Follows table events for bound sessions (wire-format §5).

    Feed every event with :meth:`on_event` *after* ``table.apply(event)``, and
    call :meth:`tick` periodically; both return the actions due. Per event the
    work is O(bindings on that SA); pending deletions are few and short-lived.
    """

    def __init__(self, table: SATable, grace: float = 5.0) -> None:
        self.table = table
        self.grace = grace
        self._watched: dict[Hashable, Binding] = {}
        self._by_sa: dict[SAId, set[Hashable]] = {}
        self._pending: dict[Hashable, float] = {}  # key -> deadline
        self.rekeys = 0
        self.stops = 0

    def watch(self, key: Hashable, binding: Binding) -> None:
        self.unwatch(key)
        self._watched[key] = binding
        for sa in (binding.c2s, binding.s2c):
            self._by_sa.setdefault(_norm(sa.key_id), set()).add(key)

    def unwatch(self, key: Hashable) -> None:
        b = self._watched.pop(key, None)
        self._pending.pop(key, None)
        if b is None:
            return
        for sa in (b.c2s, b.s2c):
            s = self._by_sa.get(_norm(sa.key_id))
            if s is not None:
                s.discard(key)
                if not s:
                    del self._by_sa[_norm(sa.key_id)]

    def __len__(self) -> int:
        return len(self._watched)

    def _successor(self, b: Binding) -> tuple[SA, SA] | None:
        old = {b.c2s.key_id, b.s2c.key_id}
        sas = [sa for sa in self.table.by_reqid(b.reqid) if sa.key_id not in old]

        def pick(prev: SA) -> SA | None:
            return _newest(sa for sa in sas if int(sa.proto) == int(prev.proto) and sa.saddr == prev.saddr
                           and sa.daddr == prev.daddr and sa.selector == prev.selector)

        c2s, s2c = pick(b.c2s), pick(b.s2c)
        return (c2s, s2c) if c2s is not None and s2c is not None else None

    def _rebind(self, key: Hashable, succ: tuple[SA, SA]) -> Rebind:
        b = self._watched[key]
        self.unwatch(key)
        self.rekeys += 1
        act = Rebind(key, b, succ[0], succ[1])
        log.info("rekey: %r", act)
        return act

    def on_event(self, event: XfrmEvent, now: float) -> list[Action]:
        actions: list[Action] = []
        kind = event.kind
        if kind is EventKind.DEL_SA or (kind is EventKind.EXPIRE and event.hard):
            sid = event.key_id
            for key in list(self._by_sa.get(_norm(sid), ())) if sid is not None else ():
                succ = self._successor(self._watched[key])
                if succ is not None:
                    actions.append(self._rebind(key, succ))
                else:
                    self._pending.setdefault(key, now + self.grace)
        elif kind in (EventKind.NEW_SA, EventKind.UPD_SA) and event.sa is not None and self._pending:
            for key in [k for k in self._pending if self._watched[k].reqid == event.sa.reqid]:
                succ = self._successor(self._watched[key])
                if succ is not None:
                    actions.append(self._rebind(key, succ))
        actions.extend(self.tick(now))
        return actions

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for key, deadline in list(self._pending.items()):
            if now < deadline:
                continue
            succ = self._successor(self._watched[key])
            if succ is not None:
                actions.append(self._rebind(key, succ))
                continue
            b = self._watched[key]
            self.unwatch(key)
            self.stops += 1
            act = Stop(key, b)
            log.info("stop: %r", act)
            actions.append(act)
        return actions


def _norm(sid: SAId) -> SAId:
    return (sid[0], int(sid[1]), sid[2])
