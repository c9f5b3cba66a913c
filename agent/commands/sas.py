"""``xwamp sas``: list the kernel's IPsec SAs (keys redacted unless --show-keys)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netlink.records import SA, Algorithm

REDACTED = "<redacted>"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sas", help="list the kernel's IPsec SAs", description=__doc__)
    p.add_argument("--netns", metavar="NS", help="network namespace (ip netns name or /proc/PID/ns/net)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--show-keys", action="store_true", help="print key material (default: redacted)")
    p.set_defaults(func=run)


def _name(value: int, enum_type: Any) -> str:
    try:
        return enum_type(value).name.lower()
    except ValueError:
        return str(int(value))


def _alg(alg: "Algorithm | None", show_keys: bool) -> dict[str, Any] | None:
    if alg is None:
        return None
    out: dict[str, Any] = {"name": alg.name, "key_bits": alg.key_bits}
    if alg.trunc_bits is not None:
        out["trunc_bits"] = alg.trunc_bits
    if alg.icv_bits is not None:
        out["icv_bits"] = alg.icv_bits
    out["key"] = alg.key.reveal().hex() if show_keys else REDACTED
    out["key_fingerprint"] = alg.key.fingerprint()  # tells keys apart without showing them
    return out


def sa_to_dict(sa: "SA", show_keys: bool = False) -> dict[str, Any]:
    from netlink.records import Mode, Proto

    sel = sa.selector
    return {
        "spi": f"0x{sa.spi:08x}",
        "proto": _name(sa.proto, Proto),
        "mode": _name(sa.mode, Mode),
        "family": 4 if sa.family == 2 else 6,
        "src": str(sa.saddr),
        "dst": str(sa.daddr),
        "reqid": sa.reqid,
        "flags": sa.flags,
        "replay_window": sa.replay_window,
        "selector": {
            "src": f"{sel.saddr}/{sel.prefixlen_s}",
            "dst": f"{sel.daddr}/{sel.prefixlen_d}",
            "proto": sel.proto,
            "sport": sel.sport,
            "dport": sel.dport,
            "ifindex": sel.ifindex,
        },
        "crypt": _alg(sa.crypt, show_keys),
        "auth": _alg(sa.auth, show_keys),
        "aead": _alg(sa.aead, show_keys),
        "mark": None if sa.mark is None else {"value": sa.mark.value, "mask": sa.mark.mask},
        "if_id": sa.if_id,
        "encap": None if sa.encap is None else {"type": sa.encap[0], "sport": sa.encap[1], "dport": sa.encap[2]},
        "lifetime": {k: getattr(sa.lifetime, k) for k in sa.lifetime.__slots__},
        "current": {k: getattr(sa.current, k) for k in sa.current.__slots__},
        "stats": {k: getattr(sa.stats, k) for k in sa.stats.__slots__},
        "replay": None if sa.replay is None else {k: getattr(sa.replay, k) for k in sa.replay.__slots__},
        "keys_zeroed_by_kernel": sa.keys_redacted,
    }


def _algs_text(sa: "SA", show_keys: bool) -> str:
    parts = []
    for alg in (sa.aead, sa.crypt, sa.auth):
        if alg is not None:
            text = alg.name
            if show_keys:
                text += f"=0x{alg.key.reveal().hex()}"
            parts.append(text)
    return "+".join(parts) or "-"


def render_table(sas: "list[SA]", show_keys: bool = False) -> str:
    from netlink.records import Mode, Proto

    header = ("SPI", "PROTO", "MODE", "SRC -> DST", "REQID", "ALGORITHMS", "BYTES", "PACKETS")
    rows = [header]
    for sa in sorted(sas, key=lambda s: (s.saddr.version, int(s.saddr), int(s.daddr), s.spi)):
        rows.append(
            (
                f"0x{sa.spi:08x}",
                _name(sa.proto, Proto),
                _name(sa.mode, Mode),
                f"{sa.saddr} -> {sa.daddr}",
                str(sa.reqid),
                _algs_text(sa, show_keys),
                str(sa.current.bytes),
                str(sa.current.packets),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import json

    from netlink.client import XfrmClient
    from netlink.errors import XfrmError

    try:
        with XfrmClient(netns=args.netns) as client:
            sas = client.dump_sas()
    except (XfrmError, PermissionError) as exc:
        print(f"xwamp sas: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump([sa_to_dict(sa, args.show_keys) for sa in sas], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif sas:
        sys.stdout.write(render_table(sas, args.show_keys))
    else:
        print("no IPsec SAs" + (f" in netns {args.netns}" if args.netns else ""), file=sys.stderr)
    return 0
