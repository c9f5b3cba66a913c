"""``xwamp agent`` configuration: TOML (stdlib tomllib) validated into frozen dataclasses.

Every problem is reported as one line naming the file, the key and why::

    xwamp.toml: peers[2].address: '10.0.0.300' is not an IP address

Unknown keys are errors (a typo must not silently fall back to a default).
See examples/xwamp.toml for every key with its default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any, Callable, TypeVar

T = TypeVar("T")

LOG_FORMATS = ("logfmt", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
PROTOCOLS = ("twamp", "owamp", "stamp")
# STAMP (RFC 8762) has no control channel: unauth, auth with a key file (RFC 8762 §4.2.2),
# or auth keyed from the SA pair the packets ride in (docs/wire-format.md §9).
STAMP_MODES = ("unauth", "auth", "auth+ipsec-bound")
SECURITY_MODES = ("unauth", "auth", "enc", "mixed")
# Key-source suffixes ("auth+ipsec-alt1"): docs/wire-format.md §1. IPsec modes take
# their keys from the SA the session runs in, so they need no keyfile.
KEY_MODES = ("ipsec-bound", "ipsec-alt1", "ipsec-alt2", "rfc7717")
IPSEC_KEY_MODES = ("ipsec-bound", "ipsec-alt1", "ipsec-alt2")
# Modes keyed without a passphrase: the IPsec modes from the SA, RFC 7717 from agent.ike_keys.
NO_SECRET_KEY_MODES = IPSEC_KEY_MODES + ("rfc7717",)
RFC7717_KDFS = ("pbkdf2", "direct")
SCHEDULES = ("fixed", "poisson")
DEFAULT_SERVER_MODES = ("unauth", "unauth+ipsec-bound", "auth+ipsec-alt1", "enc+ipsec-alt1")

# 10 µs .. 10 s, 1-2.5-5 per decade: LAN hardware-stamped RTTs up to satellite/backoff.
DEFAULT_BUCKETS: tuple[float, ...] = tuple(
    float(f"{m}e{e}") for e in range(-5, 1) for m in ("1", "2.5", "5")
) + (10.0,)


class ConfigError(ValueError):
    """One clear line: ``<file>: <key>: <why>``."""

    def __init__(self, source: str, key: str, why: str) -> None:
        if len(why) > 200:  # a value quoted in full (a huge string, deep arrays) is not one clear line
            why = why[:197] + "..."
        self.source, self.key, self.why = source, key, why
        super().__init__(f"{source}: {key}: {why}" if key else f"{source}: {why}")


# --------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class AgentSection:
    log_format: str = "logfmt"
    log_level: str = "info"
    netns: str | None = None  # run the whole agent (sockets and XFRM) in this named netns
    sa_refresh_interval: float = 15.0  # seconds between counter refreshes of the measured SAs (targeted GETSA)
    sa_redump_interval: float = 600.0  # seconds between full SA re-dumps (besides those after an event overrun)
    # IKE key-source JSON (agent/binder/keysource.py). With it, RFC 7717 is on: the server
    # offers it with each keyed mode and sessions select it first (agent.binder.rfc7717).
    ike_keys: str | None = None
    rfc7717: bool = True  # false: keep the IKE file for the IPsec modes' Root = SKEYSEED only
    rfc7717_kdf: str = "pbkdf2"  # docs/wire-format.md §4.4: "pbkdf2" | "direct"

    @property
    def rfc7717_on(self) -> bool:
        return self.ike_keys is not None and self.rfc7717


@dataclass(frozen=True, slots=True)
class ServerSection:
    enabled: bool = True
    listen: tuple[str, ...] = ("::",)
    twamp_port: int = 862
    owamp_port: int = 861
    twamp: bool = True
    owamp: bool = True
    max_connections: int = 64
    max_connections_per_client: int = 8  # control connections from one address
    max_sessions_per_client: int = 32  # test sessions over all of one address's connections
    max_sessions_per_connection: int = 16
    idle_timeout: float = 900.0  # RFC 5357 SERVWAIT default
    setup_timeout: float = 5.0  # connect to Server-Start, absolute (agent.control.states.Deadline)
    empty_test_timeout: float = 10.0  # Start-Sessions with no session to run
    max_rate: float = 1000.0  # packets per second a single session may ask for
    max_packets: int = 1 << 20  # OWAMP Number of Packets per session
    max_padding: int = 9000
    modes: tuple[str, ...] = DEFAULT_SERVER_MODES  # offered; plain auth/enc/mixed need keyfile
    keyfile: str | None = None  # passphrases for auth/enc clients (RFC 4656 shared secrets)
    max_rate_per_client: float = 4000.0  # test packets/s over all sessions of one client address
    max_connections_per_prefix: int = 32  # control connections from one /24 or /64
    test_ports: tuple[int, int] = (8760, 9960)  # UDP test ports, like twampd's testports (>= 1024)
    iface: str | None = None  # hardware stamps on the test sessions peers ask of us (docs/timestamping.md)


@dataclass(frozen=True, slots=True)
class TlsServerConfig:
    """``[exporter.tls_server_config]``, named as Prometheus exporter-toolkit's web config."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_auth_type: str = "NoClientCert"  # or VerifyClientCertIfGiven, RequireAndVerifyClientCert


CLIENT_AUTH_TYPES = ("NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")


@dataclass(frozen=True, slots=True)
class ExporterSection:
    enabled: bool = True
    # Loopback by default: exposing tunnel addresses to a network is an operator's choice.
    listen: str = "127.0.0.1"
    port: int = 9862
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    ipdv_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    tls: TlsServerConfig | None = None  # HTTPS when set


@dataclass(frozen=True, slots=True)
class SessionTemplate:
    """What each measurement session does: shared by [[peers]] and [discovery]."""

    protocol: str = "twamp"
    port: int | None = None  # None: 862 for TWAMP, 861 for OWAMP
    modes: tuple[str, ...] = ("unauth",)  # client preference order
    keyfile: str | None = None
    user: str | None = None
    interval: float = 1.0  # seconds between test packets
    schedule: str = "fixed"
    padding: int | None = None  # None: symmetric-size padding (RFC 6038)
    dscp: int = 0
    count: int = 60  # packets per cycle; loss and reordering are settled per cycle
    timeout: float = 2.0  # seconds to wait for a reply after the last packet of a cycle
    # Hardware timestamps from this NIC's PHC (docs/timestamping.md): its stamping is switched on
    # if off (TX on; RX all, else ntp-all, else software RX) and put back at shutdown.
    iface: str | None = None

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 861 if self.protocol == "owamp" else 862


@dataclass(frozen=True, slots=True)
class ReflectorSection:
    """The STAMP (RFC 8762/8972) Session-Reflector: a UDP port answering STAMP and TWAMP-Light."""

    enabled: bool = False
    listen: tuple[str, ...] = ("::",)
    port: int = 862  # UDP (RFC 8545); TWAMP-Control's 862 is TCP
    stateful: bool = True  # RFC 8762 §4.3.1: own sequence numbers per sender and SSID
    mode: str = "unauth"  # unauth | auth (keyfile: the HMAC key, hex) | auth+ipsec-bound (wire-format §9)
    keyfile: str | None = None
    iface: str | None = None  # hardware stamps (T2 RX where the filter allows, T3 TX for Follow-Up)


@dataclass(frozen=True, slots=True)
class Peer:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    name: str
    session: SessionTemplate
    source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @property
    def key(self) -> str:
        """Identity across reloads: a peer whose key and settings are unchanged keeps running."""
        return f"peer:{self.name}"


@dataclass(frozen=True, slots=True)
class DiscoverySection:
    enabled: bool = False
    reqids: tuple[int, ...] = ()  # empty: any
    selectors: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # SA selector within one of these
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # remote SA endpoint within
    exclude: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    session: SessionTemplate = field(default_factory=lambda: SessionTemplate(modes=("unauth+ipsec-bound",)))


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<defaults>"
    agent: AgentSection = field(default_factory=AgentSection)
    server: ServerSection = field(default_factory=ServerSection)
    exporter: ExporterSection = field(default_factory=ExporterSection)
    peers: tuple[Peer, ...] = ()
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    reflector: ReflectorSection = field(default_factory=ReflectorSection)

    def ifaces(self) -> frozenset[str]:
        """The NICs whose hardware stamping the ``iface`` keys switch on."""
        named = [self.server.iface, self.discovery.session.iface, self.reflector.iface]
        named += [p.session.iface for p in self.peers]
        return frozenset(i for i in named if i)


# --------------------------------------------------------------------- validation


class _V:
    """Walks one table, remembering its dotted path for error messages."""

    def __init__(self, source: str, path: str, table: Any) -> None:
        self.source, self.path = source, path
        if not isinstance(table, dict):
            raise ConfigError(source, path, f"must be a table, not {_tname(table)}")
        self.table = table
        self.used: set[str] = set()

    def k(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def err(self, key: str, why: str) -> ConfigError:
        return ConfigError(self.source, self.k(key), why)

    def get(self, key: str, kind: type | tuple[type, ...], default: T, check: Callable[[Any], str | None] | None = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        v = self.table[key]
        # TOML booleans are not integers here, and integers are fine where floats are asked.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            want = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise self.err(key, f"must be {want}, not {_tname(v)} {v!r}")
        if check is not None:
            why = check(v)
            if why:
                raise self.err(key, why)
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        return self.get(key, str, default,
                        lambda v: None if v in choices else f"{v!r} is not one of {', '.join(choices)}")

    def int_range(self, key: str, default: Any, lo: int, hi: int) -> Any:
        return self.get(key, int, default,
                        lambda v: None if lo <= v <= hi else f"{v} is out of range {lo}..{hi}")

    def positive(self, key: str, default: Any, hi: float = math.inf) -> Any:
        return self.get(key, float, default,
                        lambda v: None if (0 < v <= hi and math.isfinite(v)) else f"{v} must be > 0 and <= {hi:g}")

    def str_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.get(key, (list, str), default)
        if isinstance(v, str):
            v = [v]
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise ConfigError(self.source, f"{self.k(key)}[{i}]", f"must be a string, not {_tname(item)}")
            out.append(item)
        return tuple(out)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.err(unknown[0], f"unknown key (known: {', '.join(sorted(self.used))})")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "an array", dict: "a table"}


def _tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _ip(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"{v!r} is not an IP address"
    return None


def _nets(vd: _V, key: str) -> tuple[Any, ...]:
    out = []
    for i, s in enumerate(vd.str_list(key, ())):
        try:
            out.append(ipaddress.ip_network(s, strict=False))
        except ValueError:
            raise ConfigError(vd.source, f"{vd.k(key)}[{i}]", f"{s!r} is not an IP network (address/prefix)") from None
    return tuple(out)


def _check_mode(v: str, protocol: str) -> str | None:
    sec, plus, key = v.partition("+")
    if sec not in SECURITY_MODES:
        return f"{v!r}: security mode must be one of {', '.join(SECURITY_MODES)}"
    if plus and key not in KEY_MODES:
        return f"{v!r}: key mode must be one of {', '.join(KEY_MODES)}"
    if protocol == "stamp" and v not in STAMP_MODES:
        return f"{v!r}: STAMP modes are {', '.join(STAMP_MODES)}"
    if sec == "mixed" and protocol == "owamp":
        return f"{v!r}: mixed mode is TWAMP only (RFC 5618)"
    if sec == "unauth" and key and key != "ipsec-bound":
        return f"{v!r}: {key} derives keys, it cannot be combined with unauth (docs/wire-format.md §1.2)"
    return None


def _check_iface(name: str) -> str | None:
    """An interface name as the kernel allows it (IFNAMSIZ 16 with the NUL; no '/', no blanks).
    Whether it exists is known only in the agent's netns, at start: a missing one is logged and
    its sessions keep software stamps."""
    if not 0 < len(name.encode()) <= 15 or "/" in name or ":" in name or not name.isprintable() \
            or any(c.isspace() for c in name) or name in (".", ".."):
        return f"{name!r} is not an interface name"
    return None


def _check_file(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path!r} does not exist"
    return None


def _check_ike_file(path: str) -> str | None:
    """The IKE key file must load now (mode 0600, valid JSON), not at the first connection."""
    from agent.binder.keysource import FileIKEKeySource, KeySourceError

    try:
        FileIKEKeySource(path)
    except KeySourceError as e:
        return str(e)
    except OSError as e:
        return f"{path!r}: {e.strerror or e}"
    return None


def _session(vd: _V, base: SessionTemplate) -> SessionTemplate:
    protocol = vd.choice("protocol", PROTOCOLS, base.protocol)
    modes = vd.str_list("mode", base.modes)
    if not modes:
        raise vd.err("mode", "needs at least one mode")
    for i, mname in enumerate(modes):
        why = _check_mode(mname, protocol)
        if why:
            raise ConfigError(vd.source, f"{vd.k('mode')}" + (f"[{i}]" if len(modes) > 1 else ""), why)
    keyfile = vd.get("keyfile", str, base.keyfile, _check_file)
    user = vd.get("user", str, base.user, lambda v: None if 0 < len(v.encode()) <= 80 else "must be 1..80 octets (RFC 4656 KeyID)")
    needs_secret = [mname for mname in modes if mname.partition("+")[0] != "unauth" and mname.partition("+")[2] not in NO_SECRET_KEY_MODES]
    if protocol == "stamp":
        if len(modes) > 1:
            raise vd.err("mode", "STAMP has no negotiation: give one mode")
        if modes[0] == "auth" and keyfile is None:
            raise vd.err("keyfile", "STAMP mode 'auth' needs keyfile (the HMAC key, hex)")
    elif needs_secret and (keyfile is None or user is None):
        missing = "keyfile" if keyfile is None else "user"
        raise vd.err(missing, f"mode {needs_secret[0]!r} needs a shared secret: set keyfile and user")
    t = SessionTemplate(
        protocol=protocol,
        port=vd.int_range("port", base.port, 1, 65535),
        modes=modes,
        keyfile=keyfile,
        user=user,
        interval=vd.positive("interval", base.interval, 3600.0),
        schedule=vd.choice("schedule", SCHEDULES, base.schedule),
        padding=vd.int_range("padding", base.padding, 0, 9000),
        dscp=vd.int_range("dscp", base.dscp, 0, 63),
        count=vd.int_range("count", base.count, 1, 1_000_000),
        timeout=vd.positive("timeout", base.timeout, 60.0),
        iface=vd.get("iface", str, base.iface, _check_iface),
    )
    return t


_SESSION_KEYS = ("protocol", "port", "mode", "keyfile", "user", "interval", "schedule",
                 "padding", "dscp", "count", "timeout", "iface")


def _buckets(vd: _V, key: str) -> tuple[float, ...]:
    v = vd.get(key, list, None)
    if v is None:
        return DEFAULT_BUCKETS
    out: list[float] = []
    for i, b in enumerate(v):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ConfigError(vd.source, f"{vd.k(key)}[{i}]", f"{b!r} must be a positive finite number of seconds")
        if out and b <= out[-1]:
            raise ConfigError(vd.source, f"{vd.k(key)}[{i}]", f"{b!r} must be greater than the previous bucket {out[-1]!r}")
        out.append(float(b))
    if not out:
        raise vd.err(key, "needs at least one bucket")
    return tuple(out)


def _tls(e: "_V") -> TlsServerConfig | None:
    raw = e.get("tls_server_config", dict, None)
    if raw is None:
        return None
    t = _V(e.source, e.k("tls_server_config"), raw)
    cert, key = t.get("cert_file", str, None, _check_file), t.get("key_file", str, None, _check_file)
    if cert is None or key is None:
        raise t.err("cert_file" if cert is None else "key_file", "is required for TLS")
    ca = t.get("client_ca_file", str, None, _check_file)
    auth = t.choice("client_auth_type", CLIENT_AUTH_TYPES, "RequireAndVerifyClientCert" if ca else "NoClientCert")
    if auth != "NoClientCert" and ca is None:
        raise t.err("client_ca_file", f"is required with client_auth_type {auth}")
    t.done()
    return TlsServerConfig(cert, key, ca, auth)


def _port_range(vd: "_V", key: str, default: tuple[int, int]) -> tuple[int, int]:
    """``"8760-9960"``: the UDP ports test sessions use; never below 1024 (issue 11 item 3)."""
    raw = vd.get(key, str, None)
    if raw is None:
        return default
    lo, sep, hi = raw.partition("-")
    try:
        rng = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise vd.err(key, f"{raw!r} is not LOW-HIGH") from None
    if not 1024 <= rng[0] <= rng[1] <= 65535:
        raise vd.err(key, f"{raw!r} must be a range within 1024-65535")
    return rng


def parse(doc: dict[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    root = _V(source, "", doc)

    a = _V(source, "agent", root.get("agent", dict, {}))
    agent = AgentSection(
        log_format=a.choice("log_format", LOG_FORMATS, "logfmt"),
        log_level=a.choice("log_level", LOG_LEVELS, "info"),
        netns=a.get("netns", str, None, lambda v: None if v and "/" not in v else f"{v!r} is not a netns name"),
        sa_refresh_interval=a.positive("sa_refresh_interval", 15.0, 3600.0),
        sa_redump_interval=a.positive("sa_redump_interval", 600.0, 86400.0),
        ike_keys=a.get("ike_keys", str, None, _check_ike_file),
        rfc7717=a.get("rfc7717", bool, True),
        rfc7717_kdf=a.choice("rfc7717_kdf", RFC7717_KDFS, "pbkdf2"),
    )
    for where in ("agent", "server"):  # the old opt-in name (issue 13): point to the new one
        if isinstance(doc.get(where), dict) and "rfc7717_unverified" in doc[where]:
            raise ConfigError(source, f"{where}.rfc7717_unverified",
                              "renamed: RFC 7717 is on whenever agent.ike_keys names an IKE key file "
                              "(agent.rfc7717 = false turns it off)")
    a.done()

    s = _V(source, "server", root.get("server", dict, {}))
    listen = s.str_list("listen", ("::",))
    for i, addr in enumerate(listen):
        why = _ip(addr)
        if why:
            raise ConfigError(source, f"server.listen[{i}]", why)
    server_modes = s.str_list("modes", DEFAULT_SERVER_MODES)
    for i, mname in enumerate(server_modes):
        why = _check_mode(mname, "twamp")
        if why:
            raise ConfigError(source, f"server.modes[{i}]", why)
    server = ServerSection(
        enabled=s.get("enabled", bool, True),
        listen=listen,
        twamp_port=s.int_range("twamp_port", 862, 1, 65535),
        owamp_port=s.int_range("owamp_port", 861, 1, 65535),
        twamp=s.get("twamp", bool, True),
        owamp=s.get("owamp", bool, True),
        max_connections=s.int_range("max_connections", 64, 1, 100_000),
        max_connections_per_client=s.int_range("max_connections_per_client", 8, 1, 100_000),
        max_sessions_per_client=s.int_range("max_sessions_per_client", 32, 1, 1_000_000),
        max_sessions_per_connection=s.int_range("max_sessions_per_connection", 16, 1, 10_000),
        idle_timeout=s.positive("idle_timeout", 900.0, 86400.0),
        setup_timeout=s.positive("setup_timeout", 5.0, 3600.0),
        empty_test_timeout=s.positive("empty_test_timeout", 10.0, 86400.0),
        max_rate=s.positive("max_rate", 1000.0, 1e6),
        max_packets=s.int_range("max_packets", 1 << 20, 1, 1 << 32),
        max_padding=s.int_range("max_padding", 9000, 0, 65000),
        modes=server_modes,
        keyfile=s.get("keyfile", str, None, _check_file),
        max_rate_per_client=s.positive("max_rate_per_client", 4000.0, 1e7),
        max_connections_per_prefix=s.int_range("max_connections_per_prefix", 32, 1, 100_000),
        test_ports=_port_range(s, "test_ports", (8760, 9960)),
        iface=s.get("iface", str, None, _check_iface),
    )
    if server.keyfile is not None and "modes" not in s.table:
        # Keys configured and no modes given: plain unauth is not offered (issue 11 item 9).
        server = dataclasses.replace(server, modes=tuple(mn for mn in server.modes if mn != "unauth"))
    if server.enabled and server.twamp and server.owamp and server.twamp_port == server.owamp_port:
        raise ConfigError(source, "server.owamp_port", f"{server.owamp_port} is also server.twamp_port")
    if any(mname.partition("+")[0] != "unauth" and mname.partition("+")[2] not in NO_SECRET_KEY_MODES
           for mname in server_modes) and server.keyfile is None and server.enabled:
        raise ConfigError(source, "server.keyfile", "modes auth/enc/mixed without an IPsec key mode need a keyfile")
    s.done()

    e = _V(source, "exporter", root.get("exporter", dict, {}))
    exporter = ExporterSection(
        enabled=e.get("enabled", bool, True),
        listen=e.get("listen", str, "127.0.0.1", _ip),
        port=e.int_range("port", 9862, 0, 65535),  # 0: any free port (tests)
        buckets=_buckets(e, "buckets"),
        ipdv_buckets=_buckets(e, "ipdv_buckets"),
        tls=_tls(e),
    )
    e.done()

    peers: list[Peer] = []
    raw_peers = root.get("peers", list, [])
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_peers):
        p = _V(source, f"peers[{i}]", raw)
        addr_s = p.get("address", str, None, _ip)
        if addr_s is None:
            raise p.err("address", "is required")
        src = p.get("source", str, None, _ip)
        name = p.get("name", str, addr_s, lambda v: None if v and v.isprintable() else "must be a non-empty printable string")
        if name in names:
            raise p.err("name", f"{name!r} is also peers[{names[name]}]'s name (names identify tunnels in metrics)")
        names[name] = i
        tmpl = _session(p, SessionTemplate())
        p.used.update(_SESSION_KEYS)
        p.done()
        address = ipaddress.ip_address(addr_s)
        source_ip = ipaddress.ip_address(src) if src else None
        if source_ip is not None and source_ip.version != address.version:
            raise p.err("source", f"{src!r} and address {addr_s!r} are of different IP versions")
        peers.append(Peer(address=address, name=name, session=tmpl, source=source_ip))

    d = _V(source, "discovery", root.get("discovery", dict, {}))
    reqids = d.get("reqids", list, [])
    for i, r in enumerate(reqids):
        if isinstance(r, bool) or not isinstance(r, int) or not 0 < r < 1 << 32:
            raise ConfigError(source, f"discovery.reqids[{i}]", f"{r!r} is not a reqid (1..4294967295)")
    dtmpl = _session(d, DiscoverySection().session)
    discovery = DiscoverySection(
        enabled=d.get("enabled", bool, False),
        reqids=tuple(reqids),
        selectors=_nets(d, "selectors"),
        addresses=_nets(d, "addresses"),
        exclude=_nets(d, "exclude"),
        session=dtmpl,
    )
    d.used.update(_SESSION_KEYS)
    d.done()
    reflector = _reflector(_V(source, "reflector", root.get("reflector", dict, {})))
    root.done()
    wants_ike = [m for m in server.modes + tuple(x for p in peers for x in p.session.modes) + discovery.session.modes
                 if m.endswith("+rfc7717")]
    if wants_ike and not agent.rfc7717_on:
        raise ConfigError(source, "agent.ike_keys", f"mode {wants_ike[0]!r} needs agent.ike_keys (and agent.rfc7717)")
    if agent.rfc7717_on:
        from agent.binder.rfc7717 import with_rfc7717

        # RFC 7717 §1: "SHOULD be used instead of shared secrets" -- offered and selected first
        server = _replace(server, modes=tuple(dict.fromkeys(
            server.modes + tuple(f"{sec}+rfc7717" for sec in dict.fromkeys(m.partition("+")[0] for m in server.modes)
                                 if sec != "unauth"))))
        # STAMP has no control channel to negotiate a key mode in: its sessions keep theirs.
        peers = [p if p.session.protocol == "stamp" else
                 _replace(p, session=_replace(p.session, modes=with_rfc7717(p.session.modes, bool(p.session.keyfile))))
                 for p in peers]
        if discovery.session.protocol != "stamp":
            discovery = _replace(discovery, session=_replace(discovery.session, modes=with_rfc7717(
                discovery.session.modes, bool(discovery.session.keyfile))))
    return Config(source=source, agent=agent, server=server, exporter=exporter, peers=tuple(peers), discovery=discovery,
                  reflector=reflector)


def _reflector(r: _V) -> ReflectorSection:
    listen = r.str_list("listen", ("::",))
    for i, addr in enumerate(listen):
        why = _ip(addr)
        if why:
            raise ConfigError(r.source, f"reflector.listen[{i}]", why)
    mode = r.choice("mode", STAMP_MODES, "unauth")
    sec = ReflectorSection(
        enabled=r.get("enabled", bool, False),
        listen=listen,
        port=r.int_range("port", 862, 0, 65535),  # 0: any free port (tests)
        stateful=r.get("stateful", bool, True),
        mode=mode,
        keyfile=r.get("keyfile", str, None, _check_file),
        iface=r.get("iface", str, None, _check_iface),
    )
    if sec.mode == "auth" and sec.keyfile is None:
        raise r.err("keyfile", "mode 'auth' needs keyfile (the HMAC key, hex)")
    r.done()
    return sec


def loads(data: bytes, source: str = "<config>") -> Config:
    """Validate a configuration file's bytes; raises ConfigError and nothing else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(source, "", f"line {line}: not UTF-8 (octet 0x{data[e.start]:02x})") from None
    try:
        return parse(tomllib.loads(text), source)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nesting level: thousands of '[' exhaust the stack
        raise ConfigError(source, "", "invalid TOML: arrays or tables nested too deeply") from None


def load(path: str | os.PathLike[str], check_keys: bool = True) -> Config:
    """Read and validate ``path``; raises ConfigError (never OSError/TOMLDecodeError).
    With ``check_keys`` every key file it names is loaded as the running agent loads it
    (:func:`check_keyfiles`): ``--check``, start-up and SIGHUP refuse the same files."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror or e}") from None
    conf = loads(data, source)
    if check_keys:
        check_keyfiles(conf)
    return conf


def keyfiles(conf: Config) -> list[tuple[str, str, str]]:
    """(config key, path, kind) of every key file ``conf`` names; kind is "passphrase"
    (O/TWAMP: identity passphrase lines) or "hmac" (STAMP: one hex key)."""
    def kind(protocol: str) -> str:
        return "hmac" if protocol == "stamp" else "passphrase"

    out: list[tuple[str, str, str]] = []
    if conf.server.enabled and conf.server.keyfile:
        out.append(("server.keyfile", conf.server.keyfile, "passphrase"))
    for i, p in enumerate(conf.peers):
        if p.session.keyfile:
            out.append((f"peers[{i}].keyfile", p.session.keyfile, kind(p.session.protocol)))
    if conf.discovery.session.keyfile:
        out.append(("discovery.keyfile", conf.discovery.session.keyfile, kind(conf.discovery.session.protocol)))
    if conf.reflector.enabled and conf.reflector.keyfile:
        out.append(("reflector.keyfile", conf.reflector.keyfile, "hmac"))
    return out


def check_keyfiles(conf: Config) -> None:
    """Load every key file the way the agent will (agent.control.keyring: regular file, not
    readable by others; passphrase files UTF-8 with well-formed lines, STAMP keys not empty);
    ConfigError."""
    from agent.control.keyring import KeyFileError, PassphraseFile, read_hmac_key

    for key, path, kind in keyfiles(conf):
        try:
            if kind == "hmac":
                read_hmac_key(path)
            else:
                PassphraseFile(path)
        except KeyFileError as e:
            raise ConfigError(conf.source, key, str(e)) from None
