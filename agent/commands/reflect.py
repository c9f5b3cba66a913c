"""``xwamp reflect``: a STAMP (RFC 8762/8972) and TWAMP-Light Session-Reflector.

Unauthenticated STAMP and TWAMP-Light senders are answered on the same port
(senders shorter than 44 octets get the 41-octet TWAMP-Light format). With
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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stateful", dest="stateful", action="store_true", default=True,
                      help="own sequence numbers per sender and SSID (default; RFC 8762 §4.3.1)")
    mode.add_argument("--stateless", dest="stateful", action="store_false",
                      help="copy the sender's sequence numbers")
    p.add_argument("--iface", type=A.interface, help="interface for hardware RX timestamps (default: software stamps)")
    p.add_argument("--ptp", action="store_true", help="write PTP-format timestamps (RFC 8186, Z=1)")
    p.add_argument("--duration", type=A.DURATION, default=0.0, help="stop after this many seconds (default: run until ^C)")
    p.add_argument("--log-interval", type=A.POSITIVE_DURATION, default=10.0, help="seconds between reports of dropped packets")
    p.set_defaults(func=run)


def parse_key(raw: bytes, name: str = "<key file>") -> bytes:
    """A key file holds hex (whitespace and an optional 0x ignored) or, failing that, raw bytes."""
    text = raw.strip()
    if text.lower().startswith(b"0x"):
        text = text[2:]
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if not key:
        raise ValueError(f"{name}: empty key")
    return key


def read_key_file(path: Path) -> bytes:
    """The STAMP HMAC key of ``path``: refused like a passphrase file when others may
    read it or it is not a regular file (agent.control.keyring.check_secret_file)."""
    from agent.control.keyring import read_secret_file

    return parse_key(read_secret_file(path), str(path))


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from agent.commands._runtime import wait_until_stopped
    from agent.engine.packets import Proto, Security
    from agent.engine.reflector import ReflectorSession
    from agent.engine.udp import TwampReflectorEndpoint
    from netlink.secret import Secret

    log = logging.getLogger("xwamp.reflect")
    key: Secret | None = None
    if args.auth_key_file is not None:
        try:
            key = Secret(read_key_file(args.auth_key_file))
        except ValueError as e:  # KeyFileError too: messages name the file, never the key
            print(f"xwamp reflect: cannot read the key file: {e}", file=sys.stderr)
            return 2
    session = ReflectorSession(
        Proto.STAMP,
        Security.AUTH if key is not None else Security.UNAUTH,
        stamp_key=key,
        stateful=args.stateful,
        ptp=args.ptp,
    )
    ep = TwampReflectorEndpoint((args.listen, args.port), default=session, iface=args.iface,
                                hardware=args.iface is not None, log_interval=args.log_interval)

    async def main() -> None:
        await ep.start()
        host = args.listen if ":" not in args.listen else f"[{args.listen}]"
        mode = "authenticated (key " + key.fingerprint() + ")" if key is not None else "unauthenticated"
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
        c = ep.counters()
        print("xwamp reflect: " + ", ".join(f"{k} {v}" for k, v in c.items()), flush=True)
    return 0
