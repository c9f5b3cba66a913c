"""``xwamp reflect``: a STAMP (RFC 8762/8972) and TWAMP-Light Session-Reflector.

Unauthenticated STAMP and TWAMP-Light senders are answered on the same port
(senders of 41 to 43 octets get the 41-octet TWAMP-Light format; shorter ones nothing: no amplification). With
``--auth-key-file`` the reflector runs STAMP authenticated mode (112-octet
packets, HMAC-SHA-256) and drops packets whose HMAC does not verify.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands import _args as A


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reflect",
        help="STAMP / TWAMP-Light reflector",
        description="Answer STAMP (RFC 8762/8972) and TWAMP-Light test packets.",
    )
    p.add_argument("--listen", default="::", metavar="ADDR", help="address to bind (default :: = IPv4+IPv6)")
    p.add_argument("--port", type=A.PORT_OR_ZERO, default=862, help="UDP port (default 862; 0: any free port)")
    p.add_argument("--auth-key-file", type=Path, metavar="FILE",
                   help="STAMP authenticated mode: HMAC key file (hex, or raw bytes)")
    p.add_argument("--key-from-tunnel", action="store_true",
                   help="authenticated STAMP keyed from the IPsec SA pair each sender's packets ride in "
                        "(docs/wire-format.md §9)")
    p.add_argument("--netns", metavar="NS", help="run in this network namespace")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stateful", dest="stateful", action="store_true", default=True,
                      help="own sequence numbers per sender and SSID (default; RFC 8762 §4.3.1)")
    mode.add_argument("--stateless", dest="stateful", action="store_false",
                      help="copy the sender's sequence numbers")
    p.add_argument("--t3", choices=("late", "early"), default="late",
                   help="late (default): build the reply, then read the clock and write only T3 where no HMAC covers "
                        "it; early: read it inside the reflector, before the last steps (for measurements)")
    p.add_argument("--iface", metavar="IF", help="hardware timestamps from this NIC's PHC: T2 where its RX filter "
                                                 "stamps our packets, T3 (Follow-Up) from its TX stamps; switches its "
                                                 "stamping on when off, puts it back at exit (docs/timestamping.md)")
    p.add_argument("--ptp", action="store_true", help="write PTP-format timestamps (RFC 8186, Z=1)")
    p.add_argument("--duration", type=A.DURATION, default=0.0, help="stop after this many seconds (default: run until ^C)")
    p.add_argument("--log-interval", type=A.POSITIVE_DURATION, default=10.0, help="seconds between reports of dropped packets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from agent.commands._runtime import wait_until_stopped
    from agent.control.keyring import read_hmac_key
    from agent.engine.packets import Proto, Security
    from agent.engine.reflector import ReflectorSession
    from agent.engine.udp import TwampReflectorEndpoint
    from netlink.secret import Secret

    log = logging.getLogger("xwamp.reflect")
    key: Secret | None = None
    if args.auth_key_file is not None:
        try:
            key = Secret(read_hmac_key(args.auth_key_file))
        except ValueError as e:  # KeyFileError too: messages name the file, never the key
            print(f"xwamp reflect: cannot read the key file: {e}", file=sys.stderr)
            return 2
    if key is not None and args.key_from_tunnel:
        print("xwamp reflect: --auth-key-file and --key-from-tunnel exclude each other", file=sys.stderr)
        return 2
    from agent.commands._runtime import iface_usable, netns_entered

    if not netns_entered("reflect", args.netns) or not iface_usable("reflect", args.iface):
        return 2
    from agent.engine import timestamping as ts

    hardware = ts.hardware_opt_in(args.iface)  # same fallback rules as ping: software where it cannot
    session = ReflectorSession(
        Proto.STAMP,
        Security.AUTH if key is not None else Security.UNAUTH,
        stamp_key=key,
        stateful=args.stateful,
        ptp=args.ptp,
    )
    ep = TwampReflectorEndpoint((args.listen, args.port), default=session, iface=args.iface,
                                hardware=hardware, log_interval=args.log_interval,
                                late_t3=args.t3 == "late")

    async def main() -> None:
        fol = None
        if args.key_from_tunnel:
            from agent.sessions.bound import XfrmFollower
            from agent.sessions.stamp_keys import TunnelStampKeys

            fol = XfrmFollower(None)
            await fol.start()
            tk = TunnelStampKeys(fol.table, fol.policies, local=args.listen)
            ep.default = tk.reflector(stateful=args.stateful, ptp=args.ptp)
        try:
            await _serve(fol)
        finally:
            if fol is not None:
                await fol.close()

    async def _serve(fol) -> None:
        await ep.start()
        host = args.listen if ":" not in args.listen else f"[{args.listen}]"
        mode = "authenticated (key " + key.fingerprint() + ")" if key is not None else "unauthenticated"
        if fol is not None:
            mode = "authenticated (keys from the tunnel)"
        print(f"xwamp reflect: STAMP/TWAMP-Light {mode}, {'stateful' if args.stateful else 'stateless'}, "
              f"listening on {host}:{ep.port}", flush=True)
        try:
            await wait_until_stopped(args.duration)
        finally:
            ep.close()

    try:
        asyncio.run(main())
    except BrokenPipeError:  # our output went into a closed pipe: agent.cli handles it
        raise
    except OSError as e:
        log.error("cannot listen on %s port %d: %s", args.listen, args.port, e.strerror or e)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        ep.close()
        if hardware:
            ts.restore_nic_configs()  # the NIC as we found it
        c = ep.counters()
        for k, v in getattr(ep.default, "key_results", {}).items():
            c[f"tunnel_key_{k}"] = v
        print("xwamp reflect: " + ", ".join(f"{k} {v}" for k, v in c.items()), flush=True)
    return 0
