"""Options and the run loop shared by the client commands (``ping``, ``owping``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Awaitable, Callable

from agent.commands import _args as A
from agent.commands._runtime import (
    EXIT_GREETING_REFUSED,
    GREETING_REFUSALS,
    ipsec_modes,
    iface_usable,
    ipsec_runtime,
    is_ipsec_mode,
    netns_entered,
)

MODES = ("unauth", "auth", "enc", "mixed")
# IPsec-bound modes (docs/wire-format.md): keyed from the SA pair the server announces,
# which the client checks against its own kernel before answering.
IPSEC_MODES = ipsec_modes(MODES)
# RFC 7717: keyed from the IKE SA of --ike-keys (agent.binder.rfc7717); keyed modes only (§5.1).
RFC7717_MODES = tuple(f"{s}+rfc7717" for s in MODES if s != "unauth")


def add_client_options(p: argparse.ArgumentParser, default_port: int,
                       modes: tuple[str, ...] = MODES + IPSEC_MODES + RFC7717_MODES) -> None:
    """Options shared by ``ping`` and ``owping``."""
    p.add_argument("host", help="server address or name")
    p.add_argument("--port", type=A.PORT, default=default_port, help=f"control TCP port (default {default_port})")
    p.add_argument("-c", "--count", type=A.COUNT, default=10, help="test packets to send (default 10)")
    p.add_argument("-i", "--interval", type=A.DURATION, default=1.0, help="seconds between packets, or their mean (default 1)")
    p.add_argument("--schedule", choices=("fixed", "exponential"), default="fixed",
                   help="fixed interval, or exponential gaps (Poisson sampling, RFC 3432)")
    p.add_argument("--padding", type=A.PADDING, default=None, help="padding octets per test packet")
    p.add_argument("--dscp", type=A.DSCP, default=0, help="DSCP of the test packets (Type-P descriptor)")
    p.add_argument("--mode", action="append", choices=modes, default=None, metavar="MODE",
                   help="security mode, or security+key mode keyed from the IPsec SA (e.g. auth+ipsec-bound, "
                        "enc+ipsec-alt1); repeat to give a preference order (default unauth). "
                        f"Choices: {', '.join(modes)}")
    p.add_argument("--source", metavar="ADDR", help="source address of control and test packets "
                                                    "(e.g. the tunnel's local inner address)")
    p.add_argument("--netns", metavar="NS", help="run in this network namespace (its SAs key the IPsec modes)")
    p.add_argument("--keyfile", help="key file: 'identity passphrase' lines (or a perfSONAR .pfs file)")
    p.add_argument("--ike-keys", metavar="FILE",
                   help="IKE key-source JSON (SK_d per IKE SA, agent/binder/keysource.py): select RFC 7717 "
                        "(IKEv2-derived key) when the server offers it, before each keyed --mode")
    p.add_argument("--rfc7717-kdf", choices=("pbkdf2", "direct"), default="pbkdf2",
                   help="RFC 7717 secret to Token key: PBKDF2 with the greeting's Salt/Count (default) or its "
                        "first 16 octets (docs/wire-format.md §4.4)")
    p.add_argument("--user", default="", help="identity (KeyID) to authenticate as")
    p.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase for --user from this environment variable")
    p.add_argument("--max-count", type=A.COUNT, default=1 << 20, help="largest PBKDF2 Count accepted from a server")
    p.add_argument("--wait", type=A.DURATION, default=2.0, help="seconds to wait for late packets (default 2)")
    p.add_argument("--timeout", type=A.POSITIVE_DURATION, default=10.0, help="control-plane answer timeout (default 10 s)")
    p.add_argument("--test-port", type=A.PORT_OR_ZERO, default=0, help="UDP port to ask the server for (default: its choice)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def key_source(args: argparse.Namespace):
    """The client's KeySource from --keyfile / --passphrase-env, or None."""
    import os

    from agent.control.keyring import ChainedKeySource, PassphraseFile, StaticKeySource
    from netlink.secret import Secret

    sources: list = []
    if getattr(args, "ike_keys", None):
        from agent.binder.keysource import FileIKEKeySource
        from agent.binder.rfc7717 import RFC7717KeySource

        sources.append(RFC7717KeySource(FileIKEKeySource(args.ike_keys), args.rfc7717_kdf))
    if args.passphrase_env:
        v = os.environ.get(args.passphrase_env)
        if v is None:
            raise ValueError(f"environment variable {args.passphrase_env} is not set")
        sources.append(StaticKeySource({args.user: Secret(v.encode("utf-8"))}))
    if args.keyfile:
        sources.append(PassphraseFile(args.keyfile))
    return ChainedKeySource(*sources) if sources else None


def options(args: argparse.Namespace):
    from agent.sessions.session import PingOptions

    modes = tuple(args.mode or ("unauth",))
    ks = key_source(args)
    if getattr(args, "ike_keys", None):
        from agent.binder.rfc7717 import with_rfc7717

        modes = with_rfc7717(modes, passphrase=bool(args.keyfile or args.passphrase_env))
    if any(m != "unauth" and not is_ipsec_mode(m) and not m.endswith("+rfc7717") for m in modes) and ks is None:
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
                       reflect_length=reflect, local_addr=args.source, iface=getattr(args, "iface", None))


def mode_name(mode: int, twamp: bool = True) -> str:
    """``auth``, or ``auth+ipsec-bound`` with a key mode (the names --mode takes)."""
    from agent.control import modes as md

    try:
        sec, key, _ = md.split_mode(mode, twamp)
    except ValueError:
        return hex(mode)
    return f"{sec.name}+{key.name}" if key is not None else sec.name


def run_client(name: str, args: argparse.Namespace, session: Callable[[Any], Awaitable[Any]],
               before: Callable[[], str | None] | None = None) -> tuple[int, Any]:
    """Build the client's options from ``args`` and run ``session(options)``.

    ``before`` runs once the options are built: it returns an error message (exit 2) or
    None, and may print a banner. Returns (exit code, result): 2 for bad options, 1 for
    control-plane or socket errors (printed as ``xwamp NAME: ...``), 130 on ^C, else
    (0, result)."""
    from agent.control.aio import ControlError, GreetingRefused
    from agent.control.keyring import KeyFileError
    from netlink.errors import XfrmError

    try:
        opt = options(args)
    except (ValueError, OSError, KeyFileError) as e:
        print(f"xwamp {name}: {e}", file=sys.stderr)
        return 2, None
    err = before() if before is not None else None
    if err is not None:
        print(f"xwamp {name}: {err}", file=sys.stderr)
        return 2, None
    wanted = opt.wanted
    if any(is_ipsec_mode(w) for w in wanted):
        # the user asking for ALT2 by name is the consent wire-format §4.3 wants
        session = _with_binder(session, allow_alt2=any(w.endswith("+ipsec-alt2") for w in wanted))
    if not netns_entered(name, getattr(args, "netns", None)) or not iface_usable(name, getattr(args, "iface", None)):
        return 2, None
    try:
        return 0, asyncio.run(session(opt))
    except GreetingRefused as e:  # one line, no traceback: what did not match, and the SPIs
        why = GREETING_REFUSALS.get(e.reason or "", "our key source refused the server's greeting")
        print(f"xwamp {name}: IPsec check failed: {why} ({e.reason or 'refused'}: {e.detail})", file=sys.stderr)
        return EXIT_GREETING_REFUSED, None
    except XfrmError as e:
        print(f"xwamp {name}: cannot read the kernel's SAs: {e}", file=sys.stderr)
        return 1, None
    except (ControlError, OSError) as e:
        print(f"xwamp {name}: {e}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        return 130, None


def _with_binder(session: Callable[[Any], Awaitable[Any]], allow_alt2: bool) -> Callable[[Any], Awaitable[Any]]:
    """``session`` keyed by the binder over the live SA table (passphrases as fallback).
    The client then checks the greeting's SA announcement against its own kernel."""

    async def run(opt: Any) -> Any:
        fallback = [opt.key_source] if opt.key_source is not None else []
        fol, rt = await ipsec_runtime(None, allow_alt2=allow_alt2, fallback=fallback)  # --netns: entered already
        opt.key_source = rt.key_source
        try:
            return await session(opt)
        finally:
            await rt.close()
            await fol.close()

    return run
