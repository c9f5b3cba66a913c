"""IKE key sources: SK_d, SKEYSEED and nonces that only the IKE daemon knows.

The kernel's XFRM database holds CHILD_SA keys only (docs/wire-format.md §3);
the IKE-rooted choices (Root = SKEYSEED, RFC 7717's SK_d) need the daemon's
secrets. :class:`IKEKeySource` is the seam; :class:`FileIKEKeySource` reads a
JSON file that an operator, a daemon hook or a test writes.

Lookups (all O(1)):
  * ``by_child_spis(spi_a, spi_b)`` — the two SPIs of one CHILD_SA, any order;
  * ``by_reqid(reqid)`` — the kernel reqid the daemon installed the CHILD_SA with.
Both return an :class:`IKEMaterial` (the IKE SA's secrets plus that child's nonces).
RFC 7717 (agent.binder.rfc7717) needs no CHILD_SA: ``by_ike_spis(spi_i, spi_r)`` (the
server, from the KeyID) and ``for_peer(addr)`` (the client: the IKE SA whose ``peers``
hold the O/TWAMP server's address; with no ``peers`` anywhere, the only IKE SA) return
an :class:`IKEEntry`.

File format (JSON, secrets and nonces in hex, mode 0600 or stricter)::

    {"version": 1,
     "ike_sas": [
       {"spi_i": "8e5c3ae507221684", "spi_r": "b1f201bb155c3acd",
        "prf": "hmac-sha256",                  # optional, default hmac-sha256
        "sk_d": "…", "skeyseed": "…",           # either may be absent
        "ni": "…", "nr": "…",                   # IKE_SA_INIT nonces (optional)
        "peers": ["192.0.2.2", "10.77.2.0/24"],  # optional: O/TWAMP peers reached over this IKE SA
        "children": [
          {"reqid": 1, "spis": ["c0000001", "c0000002"],
           "ni": "…", "nr": "…"}                # CHILD_SA nonces (CREATE_CHILD_SA), optional
        ]}]}

The file is re-read when its mtime changes (an IKE rekey rewrites it).

A strongSwan source
-------------------
Not provided, because no stock interface hands these secrets out (checked
against strongSwan's source): VICI's ``list-sas`` reports SPIs, algorithms
and reqids but no keys, and the ``save-keys`` plugin's listener
(``save_keys_listener.c``) writes only SK_ei/SK_er/SK_ai/SK_ar
(``ikev2_decryption_table``) and ESP keys (``esp_sa``) for Wireshark — no
SK_d, no SKEYSEED. A sound source is a small charon plugin registering a bus
listener (``listener_t`` in ``bus/listeners/listener.h``): its ``ike_keys``
hook receives the DH object (shared secret), Ni, Nr and the IKE SA being
rekeyed, from which SKEYSEED (RFC 7296 §2.14, or §2.18 with the old SK_d on
rekey) and SK_d = the first prf-length octets of
prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) follow with :mod:`agent.binder.ikev2`; its
``child_keys`` hook gives each CHILD_SA's nonces. The plugin would write this
JSON format atomically (rename) with mode 0600, keyed by IKE SPIs and child
reqid/SPIs, and the file source serves it unchanged. (strongSwan 6 passes
key-exchange objects instead of a single DH; the plugin must follow the
version it is built for.) Until that exists, Root = KEYMAT (kernel only) is
the mode that needs no daemon cooperation.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.binder.ikev2 import DEFAULT_PRF, PRF
from agent.control.keyring import MAX_KEYFILE, KeyFileError, check_secret_file
from netlink.secret import Secret


class KeySourceError(ValueError):
    """The key file is unusable. Messages name the entry and field, never values."""


@dataclass(frozen=True, slots=True)
class ChildEntry:
    reqid: int | None
    spis: frozenset[int]
    ni: bytes | None = None  # nonces travel in clear in IKE; not secret
    nr: bytes | None = None


@dataclass(frozen=True, slots=True)
class IKEEntry:
    spi_i: bytes
    spi_r: bytes
    prf: PRF = DEFAULT_PRF
    sk_d: Secret | None = None
    skeyseed: Secret | None = None
    ni: bytes | None = None
    nr: bytes | None = None
    children: tuple[ChildEntry, ...] = field(default=())
    peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())

    def reaches(self, addr: object) -> bool:
        try:
            a = ipaddress.ip_address(addr)  # type: ignore[arg-type]
        except ValueError:
            return False
        if a.version == 6 and a.ipv4_mapped is not None:  # a dual-stack socket's view of IPv4
            a = a.ipv4_mapped
        return any(a.version == n.version and a in n for n in self.peers)

    def __repr__(self) -> str:
        return (f"<IKEEntry {self.spi_i.hex()}/{self.spi_r.hex()} prf={self.prf.name} "
                f"sk_d={'yes' if self.sk_d else 'no'} skeyseed={'yes' if self.skeyseed else 'no'} "
                f"children={len(self.children)}>")


@dataclass(frozen=True, slots=True)
class IKEMaterial:
    """What the binder needs for one CHILD_SA: its IKE SA's secrets and nonces."""

    ike: IKEEntry
    child: ChildEntry

    @property
    def prf(self) -> PRF:
        return self.ike.prf

    @property
    def sk_d(self) -> Secret | None:
        return self.ike.sk_d

    @property
    def skeyseed(self) -> Secret | None:
        return self.ike.skeyseed


@runtime_checkable
class IKEKeySource(Protocol):
    def by_child_spis(self, spi_a: int, spi_b: int) -> IKEMaterial | None: ...

    def by_reqid(self, reqid: int) -> IKEMaterial | None: ...


class StaticIKEKeySource:
    """In-memory source (tests, and the parsed content of a file)."""

    def __init__(self, entries: list[IKEEntry] | tuple[IKEEntry, ...] = ()) -> None:
        self._by_spis: dict[frozenset[int], IKEMaterial] = {}
        self._by_reqid: dict[int, IKEMaterial] = {}
        self._by_ike: dict[tuple[bytes, bytes], IKEEntry] = {}
        self._entries: list[IKEEntry] = []
        self._n = 0
        for e in entries:
            self.add(e)

    def add(self, entry: IKEEntry) -> None:
        self._n += 1
        self._by_ike[(entry.spi_i, entry.spi_r)] = entry
        self._entries.append(entry)
        for ch in entry.children:
            mat = IKEMaterial(entry, ch)
            self._by_spis[ch.spis] = mat
            if ch.reqid is not None:
                self._by_reqid[ch.reqid] = mat

    def by_child_spis(self, spi_a: int, spi_b: int) -> IKEMaterial | None:
        return self._by_spis.get(frozenset((spi_a, spi_b)))

    def by_reqid(self, reqid: int) -> IKEMaterial | None:
        return self._by_reqid.get(reqid)

    def by_ike_spis(self, spi_i: bytes, spi_r: bytes) -> IKEEntry | None:
        return self._by_ike.get((bytes(spi_i), bytes(spi_r)))

    def for_peer(self, addr: object) -> IKEEntry | None:
        """The newest (last listed) IKE SA whose ``peers`` reach ``addr``; when no entry
        lists peers, the only entry (a file for one tunnel), else None."""
        hits = [e for e in self._entries if e.reaches(addr)]
        if hits:
            return hits[-1]
        if len(self._entries) == 1 and not self._entries[0].peers:
            return self._entries[0]
        return None

    def __repr__(self) -> str:
        return f"<StaticIKEKeySource {self._n} IKE SAs>"


def _hex(obj: dict, key: str, where: str, size: int | None = None, required: bool = False) -> bytes | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise KeySourceError(f"{where}: missing {key}")
        return None
    if not isinstance(v, str):
        raise KeySourceError(f"{where}: {key} must be a hex string")
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise KeySourceError(f"{where}: {key} is not hex") from None
    if size is not None and len(b) != size:
        raise KeySourceError(f"{where}: {key} must be {size} octets")
    return b


def _peers(obj: dict, where: str) -> tuple:
    v = obj.get("peers", [])
    if not isinstance(v, list) or len(v) > 1024:
        raise KeySourceError(f"{where}: peers must be a list of addresses or prefixes")
    try:
        return tuple(ipaddress.ip_network(p, strict=False) for p in v)
    except (ValueError, TypeError):
        raise KeySourceError(f"{where}: peers must be a list of addresses or prefixes") from None


def parse_entries(doc: object) -> list[IKEEntry]:
    """Validate a decoded JSON document (see module doc) into IKEEntry records."""
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("ike_sas"), list):
        raise KeySourceError("expected {'version': 1, 'ike_sas': [...]}")
    out: list[IKEEntry] = []
    for i, e in enumerate(doc["ike_sas"]):
        where = f"ike_sas[{i}]"
        if not isinstance(e, dict):
            raise KeySourceError(f"{where}: not an object")
        try:
            prf = PRF.from_name(e.get("prf", "hmac-sha256"))
        except (ValueError, AttributeError):
            raise KeySourceError(f"{where}: unknown prf") from None
        sk_d = _hex(e, "sk_d", where)
        seed = _hex(e, "skeyseed", where)
        children = []
        raw_children = e.get("children", [])
        if not isinstance(raw_children, list):
            raise KeySourceError(f"{where}: children must be a list")
        for j, c in enumerate(raw_children):
            cw = f"{where}.children[{j}]"
            if not isinstance(c, dict):
                raise KeySourceError(f"{cw}: not an object")
            spis = c.get("spis")
            if not isinstance(spis, list) or len(spis) != 2:
                raise KeySourceError(f"{cw}: spis must list the CHILD_SA's two SPIs")
            try:
                spi_set = frozenset(int.from_bytes(bytes.fromhex(s), "big") for s in spis)
                if any(len(bytes.fromhex(s)) != 4 for s in spis):
                    raise ValueError
            except (ValueError, TypeError):
                raise KeySourceError(f"{cw}: spis must be 4-octet hex") from None
            reqid = c.get("reqid")
            if reqid is not None and (not isinstance(reqid, int) or reqid < 0):
                raise KeySourceError(f"{cw}: reqid must be a non-negative integer")
            children.append(ChildEntry(reqid, spi_set, _hex(c, "ni", cw), _hex(c, "nr", cw)))
        out.append(IKEEntry(
            spi_i=_hex(e, "spi_i", where, 8, required=True),  # type: ignore[arg-type]
            spi_r=_hex(e, "spi_r", where, 8, required=True),  # type: ignore[arg-type]
            prf=prf,
            sk_d=Secret(sk_d) if sk_d is not None else None,
            skeyseed=Secret(seed) if seed is not None else None,
            ni=_hex(e, "ni", where), nr=_hex(e, "nr", where),
            children=tuple(children),
            peers=_peers(e, where),
        ))
    return out


class FileIKEKeySource:
    """The JSON file above. Refuses, unless ``strict_perms=False``, what the O/TWAMP key
    files refuse (they hold SK_d): not a regular file, open to others, or open to the group
    while it is our own (root:xwamp 0640, written by the IKE daemon's hook, is fine). Re-read when the mtime changes; a broken rewrite
    keeps the last good content and is reported through ``last_error``."""

    def __init__(self, path: str | os.PathLike[str], strict_perms: bool = True) -> None:
        self.path = Path(path)
        self.strict_perms = strict_perms
        self._mtime: int | None = None
        self._inner = StaticIKEKeySource()
        self.last_error: str | None = None
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = self.path.stat()
            if self._mtime == st.st_mtime_ns:
                return
            if self.strict_perms:
                try:
                    check_secret_file(self.path)
                except KeyFileError as e:
                    raise KeySourceError(str(e)) from None
            with open(self.path, "rb") as f:
                raw = f.read(MAX_KEYFILE + 1)  # a FIFO or a runaway writer must not fill our memory
            if len(raw) > MAX_KEYFILE:
                raise KeySourceError(f"{self.path}: larger than {MAX_KEYFILE} octets")
            try:
                doc = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise KeySourceError(f"{self.path}: not UTF-8") from None
            except json.JSONDecodeError as e:
                raise KeySourceError(f"{self.path}: not JSON (line {e.lineno})") from None
            self._inner = StaticIKEKeySource(parse_entries(doc))
            self._mtime = st.st_mtime_ns
            self.last_error = None
        except (OSError, KeySourceError) as e:
            if initial:
                raise
            self.last_error = str(e)

    def by_child_spis(self, spi_a: int, spi_b: int) -> IKEMaterial | None:
        self._load()
        return self._inner.by_child_spis(spi_a, spi_b)

    def by_reqid(self, reqid: int) -> IKEMaterial | None:
        self._load()
        return self._inner.by_reqid(reqid)

    def by_ike_spis(self, spi_i: bytes, spi_r: bytes) -> IKEEntry | None:
        self._load()
        return self._inner.by_ike_spis(spi_i, spi_r)

    def for_peer(self, addr: object) -> IKEEntry | None:
        self._load()
        return self._inner.for_peer(addr)

    def __repr__(self) -> str:
        return f"<FileIKEKeySource {self.path}>"
