"""``xwamp ping HOST``: a TWAMP (RFC 5357) client, output like ping(8) or JSON."""

from __future__ import annotations

import argparse

from agent.commands._runtime import ipsec_modes, is_ipsec_mode

MODES = ("unauth", "auth", "enc", "mixed")
# IPsec-bound modes (docs/wire-format.md): keyed from the SA pair the server announces,
# which the client checks against its own kernel before answering.
IPSEC_MODES = ipsec_modes(MODES)


def add_client_options(p: argparse.ArgumentParser, default_port: int,
                       modes: tuple[str, ...] = MODES + IPSEC_MODES) -> None:
    """Options shared by ``ping`` and ``owping``."""
    p.add_argument("host", help="server address or name")
    p.add_argument("--port", type=int, default=default_port, help=f"control TCP port (default {default_port})")
    p.add_argument("-c", "--count", type=int, default=10, help="test packets to send (default 10)")
    p.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between packets, or their mean (default 1)")
    p.add_argument("--schedule", choices=("fixed", "exponential"), default="fixed",
                   help="fixed interval, or exponential gaps (Poisson sampling, RFC 3432)")
    p.add_argument("--padding", type=int, default=None, help="padding octets per test packet")
    p.add_argument("--dscp", type=int, default=0, help="DSCP of the test packets (Type-P descriptor)")
    p.add_argument("--mode", action="append", choices=modes, default=None, metavar="MODE",
                   help="security mode, or security+key mode keyed from the IPsec SA (e.g. auth+ipsec-bound, "
                        "enc+ipsec-alt1); repeat to give a preference order (default unauth). "
                        f"Choices: {', '.join(modes)}")
    p.add_argument("--source", metavar="ADDR", help="source address of control and test packets "
                                                    "(e.g. the tunnel's local inner address)")
    p.add_argument("--netns", metavar="NS", help="run in this network namespace (its SAs key the IPsec modes)")
    p.add_argument("--keyfile", help="key file: 'identity passphrase' lines (or a perfSONAR .pfs file)")
    p.add_argument("--user", default="", help="identity (KeyID) to authenticate as")
    p.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase for --user from this environment variable")
    p.add_argument("--max-count", type=int, default=1 << 20, help="largest PBKDF2 Count accepted from a server")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to wait for late packets (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="control-plane answer timeout (default 10 s)")
    p.add_argument("--test-port", type=int, default=0, help="UDP port to ask the server for (default: its choice)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ping", help="TWAMP client (round trip, one-way, loss)",
                              description="Run one TWAMP session against HOST and report like ping.")
    add_client_options(p, 862)
    p.add_argument("--reflect-octets", type=int, default=0, metavar="N",
                   help="RFC 6038 Reflect Octets: the reflector returns N octets of our padding (needs the mode)")
    p.add_argument("--symmetrical", action="store_true",
                   help="select RFC 6038 Symmetrical Size when offered (equal packet sizes both ways)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only")
    p.set_defaults(func=run)


def key_source(args: argparse.Namespace):
    """The client's KeySource from --keyfile / --passphrase-env, or None."""
    import os

    from agent.keyring import ChainedKeySource, PassphraseFile, StaticKeySource
    from netlink.secret import Secret

    sources = []
    if args.passphrase_env:
        v = os.environ.get(args.passphrase_env)
        if v is None:
            raise ValueError(f"environment variable {args.passphrase_env} is not set")
        sources.append(StaticKeySource({args.user: Secret(v.encode("utf-8"))}))
    if args.keyfile:
        sources.append(PassphraseFile(args.keyfile))
    return ChainedKeySource(*sources) if sources else None


def options(args: argparse.Namespace):
    from agent.session import PingOptions

    modes = tuple(args.mode or ("unauth",))
    ks = key_source(args)
    if any(m != "unauth" and not is_ipsec_mode(m) for m in modes) and ks is None:
        raise ValueError("authenticated modes need --keyfile or --passphrase-env (and --user)")
    from agent.control.modes import Mode

    reflect = getattr(args, "reflect_octets", 0)  # ping only (owping shares these options)
    if not 0 <= reflect <= 0xFFFF:
        raise ValueError("--reflect-octets is 0..65535")
    features = int(Mode.SYMMETRICAL_SIZE) if getattr(args, "symmetrical", False) else 0
    return PingOptions(args.host, args.port, count=args.count, interval=args.interval,
                       schedule="poisson" if args.schedule == "exponential" else "fixed", padding=args.padding,
                       dscp=args.dscp, wanted=modes, key_id=args.user, key_source=ks, max_count=args.max_count,
                       wait=args.wait, timeout=args.timeout, test_port=args.test_port, features=features,
                       reflect_length=reflect, local_addr=args.source)


def mode_name(mode: int, twamp: bool = True) -> str:
    """``auth``, or ``auth+ipsec-bound`` with a key mode (the names --mode takes)."""
    from agent.control import modes as md

    try:
        sec, key, _ = md.split_mode(mode, twamp)
    except ValueError:
        return hex(mode)
    return f"{sec.name}+{key.name}" if key is not None else sec.name


def run(args: argparse.Namespace) -> int:
    import json

    from agent import results
    from agent.commands._runtime import run_client
    from agent.session import twamp_ping

    def before() -> str | None:
        if args.count < 1 or args.interval < 0 or not 0 <= args.dscp < 64:
            return "--count >= 1, --interval >= 0, --dscp 0..63"
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
