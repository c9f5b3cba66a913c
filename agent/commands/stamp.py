"""``xwamp stamp HOST``: a STAMP (RFC 8762/8972) Session-Sender, output like ping(8) or JSON.

No control channel: packets go straight to the reflector's UDP port (862). Keys for
authenticated mode come from ``--auth-key-file`` or, with ``--key-from-tunnel``, from the
IPsec SA pair the packets ride in (docs/wire-format.md §7).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands import _args as A

# --tlv NAME[=ARGS]: the RFC 8972 TLVs a Session-Sender sets.
TLV_NAMES = ("extra-padding", "location", "timestamp-info", "cos", "direct-measurement", "access-report",
             "follow-up", "hmac")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stamp", help="STAMP Session-Sender (round trip, one-way, loss)",
                              description="Send STAMP test packets to HOST's reflector and report like ping.")
    p.add_argument("host", help="reflector address")
    p.add_argument("--port", type=A.PORT, default=862, help="reflector UDP port (default 862)")
    p.add_argument("-c", "--count", type=A.COUNT, default=10, help="test packets to send (default 10)")
    p.add_argument("-i", "--interval", type=A.DURATION, default=1.0, help="seconds between packets, or their mean")
    p.add_argument("--schedule", choices=("fixed", "poisson"), default="fixed",
                   help="fixed interval, or exponential gaps (Poisson sampling, RFC 3432)")
    p.add_argument("--padding", type=A.PADDING, default=None, metavar="N",
                   help="extra octets per packet (STAMP: an Extra Padding TLV; --light: bare padding)")
    p.add_argument("--dscp", type=A.DSCP, default=0, help="DSCP of the test packets")
    p.add_argument("--ssid", type=A.integer(0, 65535, "SSID"), default=0, help="STAMP Session-Sender Identifier (RFC 8972 §3), 0..65535")
    p.add_argument("--source", metavar="ADDR", help="source address (e.g. the tunnel's local inner address)")
    p.add_argument("--netns", metavar="NS", help="run in this network namespace")
    p.add_argument("--auth-key-file", type=Path, metavar="FILE",
                   help="authenticated STAMP (RFC 8762 §4.2.2): HMAC key file (hex, or raw bytes)")
    p.add_argument("--key-from-tunnel", action="store_true",
                   help="authenticated STAMP keyed from the IPsec SA pair toward HOST (docs/wire-format.md §7)")
    p.add_argument("--light", action="store_true", help="TWAMP-Light packet format (RFC 8762 §4.6)")
    p.add_argument("--tlv", action="append", default=[], metavar="NAME[=ARGS]",
                   help="RFC 8972 TLV to send (repeatable): extra-padding=N, location, timestamp-info, "
                        "cos=DSCP1, direct-measurement, access-report[=ID,CODE], follow-up, hmac")
    p.add_argument("--no-follow-up", dest="follow_up", action="store_false", default=True,
                   help="do not ask for Follow-Up Telemetry (RFC 8972 §4.7; asked by default)")
    p.add_argument("--iface", metavar="IF", help="hardware timestamps from this NIC's PHC (T1; T4 where its RX "
                                                 "filter stamps our packets); switches its stamping on when off, puts "
                                                 "it back at exit; software stamps where it cannot (docs/timestamping.md)")
    p.add_argument("--wait", type=A.DURATION, default=2.0, help="seconds to wait for late replies (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run)


def parse_tlv(spec: str):
    """One ``--tlv`` value as an agent.engine.tlv.Tlv; ValueError with a one-line reason."""
    from agent.engine import tlv as t

    name, _, arg = spec.partition("=")
    name = name.strip().lower()

    def ints(n: int) -> list[int]:
        vals = [int(x, 0) for x in arg.split(",")] if arg else []
        if len(vals) > n:
            raise ValueError(f"--tlv {name} takes at most {n} numbers")
        return vals

    try:
        if name == "extra-padding":
            (n,) = ints(1) or [0]
            if not 0 <= n <= 9000:
                raise ValueError("--tlv extra-padding=N: N is 0..9000")
            return t.extra_padding(n)
        if name == "location":
            return t.location()
        if name == "timestamp-info":
            return t.timestamp_info()
        if name == "cos":
            (d,) = ints(1) or [0]
            if not 0 <= d < 64:
                raise ValueError("--tlv cos=DSCP1: DSCP1 is 0..63")
            return t.class_of_service(d)
        if name == "direct-measurement":
            return t.direct_measurement(0)
        if name == "access-report":
            v = ints(2) + [0, 0]
            if not (0 <= v[0] < 16 and 0 <= v[1] < 256):
                raise ValueError("--tlv access-report=ID,CODE: ID 0..15, CODE 0..255")
            return t.access_report(v[0], v[1])
        if name == "follow-up":
            return t.follow_up_request()
        if name == "hmac":
            return t.Tlv(0, t.T_HMAC, bytes(16))  # placeholder: the codec computes it
    except ValueError as e:
        if str(e).startswith("--tlv"):
            raise
        raise ValueError(f"--tlv {spec}: bad number") from None
    raise ValueError(f"--tlv {name}: unknown TLV (one of {', '.join(TLV_NAMES)})")


def _synced(packed: int | None) -> bool:
    return packed is not None and bool(packed & 0x8000)


def reply_line(rec, host: str, answers: list[dict[str, object]]) -> str:
    """ping-like: size, numbers, TTLs, RTT; both one-way delays only when both clocks say they are
    synchronised (S bit, RFC 4656 §4.1.2); the stamp sources; the reflector's TLV answers."""
    from agent.engine import tlv as t

    if rec.lost:
        return f"seq={rec.seq} lost"
    parts = [f"{rec.reply_size} bytes from {host}:", f"seq={rec.seq}", f"rseq={rec.reflector_seq}",
             f"ttl={rec.sender_ttl}/{rec.reply_ttl}"]
    if rec.rtt_ns is not None:
        parts.append(f"rtt={rec.rtt_ns / 1e6:.3f} ms")
    elif rec.follow_up == "pending":
        parts.append("rtt=pending")  # RFC 8972 §4.7: T3 not known yet, never the one written
    if _synced(rec.reflector_error) and _synced(rec.t1_error) and rec.t2_ns is not None and rec.t3_ns is not None:
        parts.append(f"fwd={(rec.t2_ns - rec.t1_best_ns) / 1e6:.3f} rev={(rec.t4_ns - rec.t3_ns) / 1e6:.3f} ms")
    else:
        parts.append("one-way=unsync")
    # T1/T4 our kernel stamps; T3 the reflector's TX stamp via Follow-Up Telemetry, or as written
    t3 = rec.t3_source if rec.follow_up == "corrected" else ("pending" if rec.follow_up == "pending" else "written")
    parts.append(f"stamps=tx:{rec.t1_source},rx:{rec.t4_source},t3:{t3}")
    if rec.duplicates:
        parts.append(f"(DUP x{len(rec.duplicates)})")
    tl = t.format_tlv_answers(answers)
    if tl:
        parts.append(tl)
    return " ".join(parts)


def summary_lines(res) -> list[str]:
    from agent.sessions import results

    s = res.summary
    out = results.format_summary(s, res.peer).splitlines()
    if not s.one_way.trusted:
        # format_summary reports one-way values marked untrusted; STAMP shows them only when
        # the reflector's clock (and ours) says it is synchronised.
        out = [ln for ln in out if not ln.startswith("one-way")]
        out.append("one-way delays not shown: a clock is not synchronised (Error Estimate S = 0)")
    if s.loss.lost and res.stateful is not True:
        out.append("loss direction cannot be told: the reflector's numbers match ours (stateless reflector, "
                   "or stateful with no forward loss)")
    src = ", ".join(f"{k} {v}" for k, v in sorted(s.stamp_sources.items()))
    out.append(f"timestamp sources: {src}")
    return out


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import sys

    from agent.commands._runtime import iface_usable, netns_entered
    from agent.control.keyring import read_hmac_key
    from agent.sessions.stamp import StampOptions, stamp_session
    from netlink.secret import Secret

    def fail(msg: str) -> int:
        print(f"xwamp stamp: {msg}", file=sys.stderr)
        return 2

    try:
        tlvs = [parse_tlv(s) for s in args.tlv]
    except ValueError as e:
        return fail(str(e))
    if args.auth_key_file is not None and args.key_from_tunnel:
        return fail("--auth-key-file and --key-from-tunnel exclude each other")
    key = None
    if args.auth_key_file is not None:
        try:
            key = Secret(read_hmac_key(args.auth_key_file))
        except (OSError, ValueError) as e:
            return fail(f"cannot read the key file: {e.__class__.__name__}")
    follow_up = args.follow_up and not args.light
    opt = StampOptions(args.host, args.port, count=args.count, interval=args.interval, schedule=args.schedule,
                       padding=args.padding, dscp=args.dscp, ssid=args.ssid, local_addr=args.source, key=key,
                       light=args.light, tlvs=tlvs, wait=args.wait, follow_up=follow_up)
    try:
        opt.validate()
        if opt.light and args.key_from_tunnel:
            raise ValueError("TWAMP-Light format carries no key")
    except ValueError as e:
        return fail(str(e))
    if not netns_entered("stamp", args.netns) or not iface_usable("stamp", args.iface):
        return 2

    answers_seen: dict[int, list] = {}

    def on_record(rec) -> None:
        if args.json or args.quiet:
            return
        from agent.engine import tlv as t

        ans = t.describe_tlvs(rec.reply_tlvs) if rec.reply_tlvs else []
        answers_seen[rec.seq] = ans
        print(reply_line(rec, args.host, ans), flush=True)

    async def main():
        from agent.engine import timestamping as ts

        if ts.hardware_opt_in(args.iface):  # same fallback rules as ping: software where it cannot
            opt.iface = args.iface
        if args.key_from_tunnel:
            from agent.sessions.stamp_keys import tunnel_stamp_session

            return await tunnel_stamp_session(opt, on_record)
        return await stamp_session(opt, on_record)

    if not args.json:
        what = "TWAMP-Light" if opt.light else ("authenticated" if key is not None or args.key_from_tunnel
                                                else "unauthenticated")
        print(f"STAMP {args.host} port {args.port}: {args.count} packets, interval {args.interval}s, {what}",
              flush=True)
    from agent.binder.keys import BinderRefusal

    try:
        try:
            res = asyncio.run(main())
        finally:
            if args.iface:
                from agent.engine import timestamping as ts

                ts.restore_nic_configs()  # the NIC as we found it
    except BinderRefusal as e:  # one line: which pair is missing or unusable (SPIs, never keys)
        print(f"xwamp stamp: no tunnel key: {e}", file=sys.stderr)
        return 3
    except ValueError as e:
        return fail(str(e))
    except OSError as e:
        print(f"xwamp stamp: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(res.to_dict(), indent=1, default=str))
    else:
        for r in res.records:
            if r.lost and not args.quiet:
                print(reply_line(r, args.host, []))
        if res.key_tag:
            print(f"keyed from the tunnel: {res.key_tag}")
        print("\n".join(summary_lines(res)))
    return 0 if res.summary.loss.received else 1
