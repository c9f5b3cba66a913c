"""``xwamp server``: TWAMP (Session-Reflector) and OWAMP (receiver/sender) control server.

``--ipsec`` also offers the IPsec-bound modes (docs/wire-format.md): the key binder over
the live SA table (netlink) announces each connection's SA pair in the greeting and keys
the session from it; a connection whose SA pair is deleted with no successor is stopped
(Stop-Sessions Accept=2, wire-format §5)."""

from __future__ import annotations

import argparse
import sys

from agent.commands import _args as A


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("server", help="O/TWAMP server (TCP 862 TWAMP, 861 OWAMP)",
                              description="Serve TWAMP and OWAMP control connections and their test sessions.")
    p.add_argument("--protocol", choices=("both", "twamp", "owamp"), default="both")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="address to listen on; repeat for several (default: all IPv4 and IPv6)")
    p.add_argument("--twamp-port", type=A.PORT_OR_ZERO, default=862, help="TCP port (0: any free port)")
    p.add_argument("--owamp-port", type=A.PORT_OR_ZERO, default=861, help="TCP port (0: any free port)")
    p.add_argument("--mode", action="append", choices=("unauth", "auth", "enc", "mixed"),
                   help="modes to offer; repeat (default: unauth; with --keyfile or --ipsec the keyed ones, "
                        "and plain unauth only if given)")
    p.add_argument("--keyfile", help="'identity passphrase' lines, or a perfSONAR .pfs file")
    p.add_argument("--ipsec", action="store_true",
                   help="also offer the IPsec-bound modes (ipsec-bound, ipsec-alt1), keyed from the kernel's SAs")
    p.add_argument("--allow-alt2", action="store_true",
                   help="with --ipsec, offer ipsec-alt2 too (reuses the ESP keys: wire-format §4.3)")
    p.add_argument("--ike-keys", metavar="FILE",
                   help="IKE key-source JSON (SK_d per IKE SA, agent/binder/keysource.py): also offer RFC 7717 "
                        "(IKEv2-derived key, TWAMP mode 128, OWAMP 16) with each keyed mode")
    p.add_argument("--rfc7717-kdf", choices=("pbkdf2", "direct"), default="pbkdf2",
                   help="RFC 7717 secret to Token key (docs/wire-format.md §4.4; default pbkdf2)")
    p.add_argument("--netns", metavar="NS", help="serve in this network namespace (and key from its SAs)")
    p.add_argument("--count", type=A.COUNT, default=4096, help="PBKDF2 Count offered to clients (power of 2 >= 1024)")
    p.add_argument("--max-connections", type=A.COUNT, default=64)
    p.add_argument("--max-per-client", type=A.COUNT, default=8, help="control connections per client address")
    p.add_argument("--max-sessions", type=A.COUNT, default=16, help="test sessions per control connection")
    p.add_argument("--max-sessions-per-client", type=A.COUNT, default=32,
                   help="test sessions over all connections of one client address")
    p.add_argument("--max-rate", type=A.RATE, default=1000.0, metavar="PPS",
                   help="packets/s one test session may send: OWAMP requests over it are refused (Accept=4), "
                        "TWAMP reflectors drop the excess (default 1000)")
    p.add_argument("--max-rate-per-client", type=A.RATE_OR_ZERO, default=None, metavar="PPS",
                   help="packets/s over all test sessions of one client address (default: 4x --max-rate; 0: no cap)")
    p.add_argument("--max-per-prefix", type=A.COUNT, default=32,
                   help="control connections from one /24 (IPv4) or /64 (IPv6)")
    p.add_argument("--test-ports", metavar="LOW-HIGH", default=None,
                   help="UDP ports test sessions use, like twampd's testports (default 8760-9960; never below 1024)")
    p.add_argument("--max-packets", type=A.COUNT, default=None, metavar="N",
                   help="packets per test session: OWAMP requests over it are refused (Accept=4), "
                        "TWAMP reflectors answer N at most (default: OWAMP 1048576, TWAMP no cap)")
    p.add_argument("--idle-timeout", type=A.POSITIVE_DURATION, default=30.0, help="close control connections idle this long")
    p.add_argument("--setup-timeout", type=A.POSITIVE_DURATION, default=5.0,
                   help="close control connections not set up this long after connecting")
    p.add_argument("--empty-test-timeout", type=A.POSITIVE_DURATION, default=10.0,
                   help="close control connections started with no test session after this long")
    p.add_argument("--iface", metavar="IF", help="hardware timestamps from this NIC's PHC for the test sessions "
                                                 "(switches its stamping on when off, puts it back at exit; software "
                                                 "stamps where it cannot; docs/timestamping.md)")
    p.add_argument("--duration", type=A.DURATION, default=0.0, help="exit after this many seconds (default: run until ^C)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from agent.commands._runtime import iface_usable, ipsec_runtime, netns_entered, wait_until_stopped
    from agent.control import modes as md
    from agent.control.aio import ControlListener, ListenerLimits
    from agent.control.authguard import AUTH_GUARD
    from agent.control.keyring import KeyFileError, PassphraseFile
    from agent.control.server import DEFAULT_TEST_PORTS, ServerConfig, parse_port_range
    from agent.sessions.session import POLICY, OwampHandler, SaBoundHandler, TwampHandler
    from netlink.errors import XfrmError

    log = logging.getLogger("xwamp.server")
    ks = None
    if args.keyfile:
        try:
            ks = PassphraseFile(args.keyfile)
        except (OSError, KeyFileError) as e:
            print(f"xwamp server: {e}", file=sys.stderr)
            return 2
    if args.ike_keys:
        from agent.binder.keysource import FileIKEKeySource, KeySourceError
        from agent.binder.rfc7717 import RFC7717KeySource
        from agent.control.keyring import ChainedKeySource

        try:  # first in the chain: it answers only for the RFC 7717 bit
            ike = RFC7717KeySource(FileIKEKeySource(args.ike_keys), args.rfc7717_kdf)
        except (OSError, KeySourceError) as e:
            print(f"xwamp server: {e}", file=sys.stderr)
            return 2
        ks = ChainedKeySource(ike, *([ks] if ks else []))
    if args.allow_alt2 and not args.ipsec:
        print("xwamp server: --allow-alt2 needs --ipsec", file=sys.stderr)
        return 2
    # The IPsec key modes go with a keyed security mode (ALT1/ALT2) or any (IPSEC_BOUND).
    # With keys (a keyfile, IKE keys or the IPsec binding) plain unauth is off unless asked for
    # (issue 11 item 9); the unauth bit stays offered under --ipsec for unauth+ipsec-bound only.
    names = args.mode or (["auth", "enc", "mixed"] if ks or args.ipsec else ["unauth"])
    if args.ike_keys and not any(n != "unauth" for n in names):
        print("xwamp server: --ike-keys needs a keyed --mode (auth, enc or mixed: RFC 7717 §5.1)", file=sys.stderr)
        return 2
    plain_unauth = "unauth" in names
    if args.ipsec and "unauth" not in names:
        names = ["unauth"] + names
    # TWAMP capabilities the server implements (OWAMP drops them: modes.offerable):
    # RFC 5938 individual session control, RFC 6038 Reflect Octets and Symmetrical Size.
    modes = int(md.Mode.INDIVIDUAL_SESSION_CONTROL | md.Mode.REFLECT_OCTETS | md.Mode.SYMMETRICAL_SIZE)
    for n in names:
        modes |= md.by_name(n).bit
    if args.ike_keys:  # RFC 7717 §5.2: the Modes bit alone says so (TWAMP 128, OWAMP 16)
        modes |= int(md.Mode.IKEV2_DERIVED) | md.OWAMP_IKEV2_DERIVED
    shown = [n for n in names if n != "unauth" or plain_unauth] + (["rfc7717"] if args.ike_keys else [])
    if args.ipsec:
        from agent.binder import announce as bd

        bd.register_modes()
        # offered per connection only when its greeting announces an SA pair (modes.KeyMode.announced)
        ipsec_bits = bd.Modes.IPSEC_BOUND | bd.Modes.IPSEC_ALT1 | (bd.Modes.IPSEC_ALT2 if args.allow_alt2 else 0)
        modes |= int(ipsec_bits)
        shown += ["ipsec-bound", "ipsec-alt1"] + (["ipsec-alt2"] if args.allow_alt2 else [])
    try:
        max_rate = args.max_rate
        per_client = args.max_rate_per_client if args.max_rate_per_client is not None else (
            4 * max_rate if max_rate else 0)
        caps: dict = {"max_rate": max_rate, "max_reflected": args.max_packets,
                      "test_ports": parse_port_range(args.test_ports) if args.test_ports else DEFAULT_TEST_PORTS}
        if args.max_packets is not None:
            caps["max_packets"] = args.max_packets
        cfg = ServerConfig(modes=modes, count=args.count, max_sessions=args.max_sessions,
                           auth_guard=AUTH_GUARD, allow_plain_unauth=plain_unauth, **caps)
        if args.max_per_prefix < 1:
            raise ValueError("--max-per-prefix must be >= 1")
    except ValueError as e:
        print(f"xwamp server: {e}", file=sys.stderr)
        return 2
    limits = ListenerLimits(max_connections=args.max_connections, max_per_client=args.max_per_client,
                            max_sessions_per_client=args.max_sessions_per_client, idle_timeout=args.idle_timeout,
                            setup_timeout=args.setup_timeout, empty_test_timeout=args.empty_test_timeout,
                            max_per_prefix=args.max_per_prefix, max_rate_per_client=per_client or None)
    protocols = [(twamp, port, handler) for twamp, port, handler, name in
                 ((True, args.twamp_port, TwampHandler, "twamp"), (False, args.owamp_port, OwampHandler, "owamp"))
                 if args.protocol in ("both", name)]

    def listener(twamp: bool, port: int, handler, runtime) -> ControlListener:
        if runtime is None:
            return ControlListener(handler, twamp=twamp, hosts=args.listen, port=port, config=cfg, key_source=ks,
                                   limits=limits)
        lst: ControlListener

        def bound(srv):  # IPsec-bound connections end with their SA pair (via ControlListener.abort)
            return SaBoundHandler(handler(srv), srv, runtime, lambda s, accept: lst.abort(s, accept))

        lst = ControlListener(bound, twamp=twamp, hosts=args.listen, port=port, config=cfg,
                              key_source=runtime.key_source, limits=limits)
        return lst

    async def main() -> None:
        follower = runtime = None
        if args.ipsec:  # --netns was entered already: the follower reads this namespace
            follower, runtime = await ipsec_runtime(None, allow_alt2=args.allow_alt2, fallback=[ks] if ks else [])
        listeners = [listener(twamp, port, handler, runtime) for twamp, port, handler in protocols]
        try:
            for lst in listeners:
                await lst.start()
                for a in lst.addresses:
                    # mixed is TWAMP only (RFC 5618): the OWAMP greeting never offers it
                    here = [n for n in shown if lst.twamp or n != "mixed"]
                    print(f"xwamp server: {'TWAMP' if lst.twamp else 'OWAMP'} on {a[0]} port {a[1]}, "
                          f"modes {', '.join(here)}", flush=True)
            await wait_until_stopped(args.duration)
        finally:
            for lst in listeners:
                await lst.close()
                log.info("%s: %s", "TWAMP" if lst.twamp else "OWAMP", lst.stats)
            log.info("authentication failures: %d (%d set-ups refused by the rate limit)",
                     AUTH_GUARD.failures_total, AUTH_GUARD.limited_total)
            log.info("test-plane caps: %s", dict(POLICY))
            if runtime is not None:
                log.info("binder: %s", runtime.counters())
                await runtime.close()
            if follower is not None:
                await follower.close()

    if not netns_entered("server", args.netns) or not iface_usable("server", args.iface):
        return 2
    from agent.engine import timestamping as ts

    if ts.hardware_opt_in(args.iface):  # same fallback rules as ping: software where it cannot
        import dataclasses

        cfg = dataclasses.replace(cfg, test_iface=args.iface)
    try:
        asyncio.run(main())
    except XfrmError as e:
        print(f"xwamp server: cannot read the kernel's SAs: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # our output went into a closed pipe: agent.cli handles it
        raise
    except OSError as e:
        print(f"xwamp server: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if args.iface:
            ts.restore_nic_configs()  # the NIC as we found it
    return 0
