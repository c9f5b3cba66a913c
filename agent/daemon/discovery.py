"""What the agent measures: configured ``[[peers]]`` and tunnels discovered in the SA table,
each as a :class:`SessionSpec` (equal specs across a reload leave the runner alone)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable

from agent.daemon import config as cfg
from agent.sessions.metrics import Tunnel
from netlink.records import SA, IPAddress
from netlink.table import SATable

log = logging.getLogger("xwamp.agent")


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """What one runner measures. Equal specs across a reload = leave the runner alone."""

    key: str
    tunnel: Tunnel
    origin: str  # configured | discovered
    address: IPAddress
    local: IPAddress | None
    session: cfg.SessionTemplate


# ----------------------------------------------------------------------------- discovery


def is_local_default(addr: IPAddress) -> bool:
    """True when ``addr`` is one of this host's (netns's) addresses: binding works only then."""
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.bind((str(addr), 0))
        return True
    except OSError:
        return False


def _within(addr: IPAddress, nets: tuple[Any, ...]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _selector_net(sa: SA) -> Any:
    sel = sa.selector
    try:
        return ipaddress.ip_network(f"{sel.daddr}/{sel.prefixlen_d}", strict=False)
    except ValueError:
        return None


def _inner_ends(policies: Any, o: SA, local: Callable[[IPAddress], bool]) -> tuple[IPAddress, IPAddress] | None:
    """For a tunnel-mode SA: the (local, remote) *inner* host addresses its outbound
    policy carries, when the selector names one host each side and the local one is
    ours. Traffic between the outer addresses does not go through the tunnel, so a
    tunnel is measured between these (the agents listen there)."""
    if policies is None or int(o.mode) != 1:  # XFRM_MODE_TUNNEL
        return None
    for p in policies.out_policies():
        s = p.selector
        full = 32 if s.saddr.version == 4 else 128
        if s.prefixlen_s != full or s.prefixlen_d != full:
            continue
        if not any(t.saddr == o.saddr and t.daddr == o.daddr and (not t.reqid or t.reqid == o.reqid)
                   for t in p.templates):
            continue
        if local(s.saddr) and not local(s.daddr):
            return s.saddr, s.daddr
    return None


def discover(table: SATable, d: cfg.DiscoverySection, is_local: Callable[[IPAddress], bool],
             policies: Any = None) -> list[SessionSpec]:
    """Tunnels to measure: each outbound/inbound SA pair whose local end is ours and whose
    remote end passes the filters. Keyed by (remote, reqid): stable across rekeys.
    Tunnel mode with a host-to-host policy: measured between the inner addresses."""
    if not d.enabled:
        return []
    local_cache: dict[IPAddress, bool] = {}

    def local(a: IPAddress) -> bool:
        if a not in local_cache:
            local_cache[a] = is_local(a)
        return local_cache[a]

    addrs = {sa.saddr for sa in table} | {sa.daddr for sa in table}
    mine = [a for a in addrs if local(a)]
    out: dict[str, SessionSpec] = {}
    for o, i in table.pairs(local=mine):
        if not local(o.saddr) or local(o.daddr):
            continue  # both ends here (a lab netns pair seen from one side) or neither
        remote = o.daddr
        if d.reqids and o.reqid not in d.reqids:
            continue
        if d.addresses and not _within(remote, d.addresses):
            continue
        if d.exclude and _within(remote, d.exclude):
            continue
        if d.selectors:
            net = _selector_net(o)
            if net is None or not any(net.version == s.version and net.overlaps(s) for s in d.selectors):
                continue
        key = f"sa:{remote}/{o.reqid}"
        inner = _inner_ends(policies, o, local)
        src, dst = inner if inner is not None else (o.saddr, remote)
        tunnel = Tunnel(name=f"{remote}/{o.reqid}", peer=str(dst), reqid=str(o.reqid), protocol=d.session.protocol)
        out[key] = SessionSpec(key, tunnel, "discovered", dst, src, d.session)
    return [out[k] for k in sorted(out)]


def configured(c: cfg.Config, policies: Any = None) -> list[SessionSpec]:
    """Configured peers; one carried by a tunnel-mode policy (given its ``source``) is
    labelled with the tunnel's reqid, so its session and SA series line up."""
    out = []
    for p in c.peers:
        reqid = ""
        if policies is not None and p.source is not None:
            o = policies.outer(p.source, p.address)
            reqid = str(o.reqid) if o is not None and o.reqid else ""
        out.append(SessionSpec(p.key, Tunnel(p.name, str(p.address), reqid, p.session.protocol), "configured",
                               p.address, p.source, p.session))
    return out


def newest_sa(sas: list[SA]) -> SA | None:
    """The most recently added SA of ``sas`` (a rekey's successor), or None."""
    return max(sas, key=lambda s: s.current.add_time, default=None)
