"""``xwamp owping HOST``: OWAMP (RFC 4656) in both directions; the far side's records
come back with Fetch-Session."""

from __future__ import annotations

import argparse

from agent.commands._client import add_client_options, mode_name
from agent.commands._runtime import ipsec_modes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("owping", help="OWAMP client (one-way delay and loss, both directions)",
                              description="Run OWAMP sessions to and from HOST and report one-way statistics.")
    add_client_options(p, 861, modes=("unauth", "auth", "enc") + ipsec_modes(("unauth", "auth", "enc"))
                       + ("auth+rfc7717", "enc+rfc7717"))
    p.set_defaults(func=run)


def _line(name: str, s) -> str:
    out = f"{name}: {s.sent} sent, {s.received} received, {s.lost} lost"
    if s.duplicates:
        out += f", {s.duplicates} duplicates"
    if s.delay:
        d = s.delay
        note = "" if s.synced else " (clocks not synchronised: delays untrusted)"
        out += f"\n  delay min/median/max = {d.min:.3f}/{d.p50:.3f}/{d.max:.3f} ms, stdev {d.stdev:.3f} ms{note}"
    if s.ttl:
        out += f"\n  hops (TTL seen) {s.ttl[0]}..{s.ttl[1]}"
    return out


def run(args: argparse.Namespace) -> int:
    import json

    from agent.commands._client import run_client
    from agent.sessions.session import owping

    rc, res = run_client("owping", args, owping)
    if res is None:
        return rc
    if args.json:
        doc = {"protocol": "owamp", "peer": args.host, "mode": mode_name(res.mode, twamp=False),
               "forward": res.forward.to_dict(), "reverse": res.reverse.to_dict(),
               "receiver_counters": res.receiver_counters}
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(f"--- owping {args.host} ({mode_name(res.mode, twamp=False)}) ---")
        print(_line("to " + args.host, res.forward))
        print(_line("from " + args.host, res.reverse))
    return 0 if res.forward.received or res.reverse.received else 1
