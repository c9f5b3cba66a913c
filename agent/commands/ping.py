"""``xwamp ping HOST``: a TWAMP (RFC 5357) client, output like ping(8) or JSON."""

from __future__ import annotations

import argparse

from agent.commands import _args as A
from agent.commands._client import add_client_options, mode_name


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ping", help="TWAMP client (round trip, one-way, loss)",
                              description="Run one TWAMP session against HOST and report like ping.")
    add_client_options(p, 862)
    p.add_argument("--reflect-octets", type=A.OCTETS16, default=0, metavar="N",
                   help="RFC 6038 Reflect Octets: the reflector returns N octets of our padding (needs the mode)")
    p.add_argument("--symmetrical", action="store_true",
                   help="select RFC 6038 Symmetrical Size when offered (equal packet sizes both ways)")
    p.add_argument("--iface", metavar="IF", help="hardware timestamps from this NIC's PHC (switches its stamping "
                                                 "on when off; software stamps where it cannot; docs/timestamping.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from agent.commands._client import run_client
    from agent.sessions import results
    from agent.sessions.session import twamp_ping

    def before() -> str | None:  # --count, --interval, --dscp: checked by their argparse types (_args)
        if not args.json:
            print(f"TWAMP {args.host} port {args.port}: {args.count} packets, interval {args.interval}s", flush=True)
        return None

    def on_record(rec) -> None:
        if not args.json and not args.quiet:
            print(results.format_reply(rec, args.host), flush=True)

    rc, res = run_client("ping", args, lambda opt: twamp_ping(opt, on_record), before)
    if res is None:
        return rc
    if args.json:
        doc = {"protocol": "twamp", "peer": res.peer, "mode": mode_name(res.mode), "sid": res.sid.hex(),
               "summary": res.summary.to_dict(), "records": [r.as_dict() for r in res.records]}
        print(json.dumps(doc, indent=1, default=str))
    else:
        for r in res.records:
            if r.lost and not args.quiet:
                print(results.format_reply(r, args.host))
        print(results.format_summary(res.summary, args.host))
    return 0 if res.summary.loss.received else 1
