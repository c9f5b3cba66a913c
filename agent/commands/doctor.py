"""``xwamp doctor [IFACE]``: can this host stamp packets precisely, is its clock honest, can we read XFRM?"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import time
from typing import Any

HELP = "check timestamping, clock sync and XFRM readability on this host"
LOCKDOWN_PATH = "/sys/kernel/security/lockdown"
CLOCKSOURCE_PATH = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help=HELP, description=HELP)
    p.add_argument("iface", nargs="?", help="measurement interface (default: the default-route interface)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


# ---- probes: each returns a JSON-able dict and never raises ---------------------------------


def default_iface(route_path: str = "/proc/net/route") -> str:
    try:
        with open(route_path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return "lo"


def probe_timestamping(iface: str) -> dict[str, Any]:
    from agent.engine import ethtool
    from agent.engine import timestamping as ts

    out: dict[str, Any] = {"iface": iface, "ok": True}
    try:
        info = ethtool.ts_info(iface)
    except (OSError, ValueError) as e:
        out.update(ok=False, error=f"ts-info: {e}")
        return out
    out["ts_info"] = info.to_dict()
    try:
        cur = ethtool.get_hwtstamp(iface)
        out["hwtstamp"] = cur.to_dict() if cur is not None else None
        out["hwtstamp_note"] = None if cur is not None else "driver reports no hardware-stamp config"
    except OSError as e:
        out["hwtstamp"], out["hwtstamp_note"] = None, f"SIOCGHWTSTAMP: {e.strerror}"
    out["hardware"] = hardware_verdict(info)
    if info.phc_index >= 0:
        out["phc"] = _probe_phc(info.phc_index, iface)
    try:
        hw_rx, hw_tx, phc = ts._hardware_plan(iface, configure_nic=False)
        out["plan"] = {"hardware_rx": hw_rx, "hardware_tx": hw_tx, "phc_index": phc,
                       "software_rx": True, "software_tx": True}
    except (OSError, ts.UnsupportedArchitecture) as e:
        out["plan"] = {"error": str(e)}
    out["kernel_stamps"] = _self_test()
    out["ok"] = bool(out["kernel_stamps"].get("ok"))
    return out


def hardware_verdict(info: Any) -> dict[str, Any]:
    """What hardware stamping the engine can get from this driver (docs/timestamping.md):
    TX needs tx type 'on'; RX needs filter 'all' (asked first) or 'ntp-all' (asked next:
    some drivers widen it to all). PTP-only filters never stamp our UDP packets."""
    from agent.engine import ethtool

    has_phc = info.phc_index >= 0
    tx = has_phc and bool(info.tx_types & (1 << ethtool.HWTSTAMP_TX_ON))
    if not has_phc:
        rx, why = "software", "no PTP hardware clock"
    elif info.rx_filters & (1 << ethtool.HWTSTAMP_FILTER_ALL):
        rx, why = "hardware", "driver grants filter all"
    elif info.rx_filters & (1 << ethtool.HWTSTAMP_FILTER_NTP_ALL):
        rx, why = "hardware if the driver widens ntp-all", "driver grants ntp-all, not all"
    else:
        rx, why = "software", ("driver grants only " + (" ".join(info.rx_filter_names) or "no filters")
                               + "; neither all nor ntp-all")
    return {"tx": "hardware" if tx else "software", "rx": rx, "rx_reason": why}


def phc2sys_processes(proc: str = "/proc") -> list[dict[str, Any]]:
    """Running phc2sys instances: {pid, args}. A doctor's heuristic: the kernel does not
    say who disciplines CLOCK_REALTIME, only whether someone marked it synchronised."""
    found = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "phc2sys":
            found.append({"pid": int(pid), "args": argv[1:]})
    return found


def _phc2sys_targets(p: dict[str, Any], index: int, iface: str) -> bool:
    args = p["args"]
    if any(a == "-a" or (a.startswith("-a") and not a.startswith("--")) for a in args):
        return True  # automatic: follows ptp4l's ports
    for i, a in enumerate(args[:-1]):
        if a == "-s" and args[i + 1] in (f"/dev/ptp{index}", iface):
            return True
    return any(a in (f"-s/dev/ptp{index}", f"-s{iface}") for a in args)


def _probe_phc(index: int, iface: str = "") -> dict[str, Any]:
    from agent.engine import clock
    from agent.engine import timestamping as ts

    d: dict[str, Any] = {"device": f"/dev/ptp{index}"}
    try:
        phc = ts.PhcClock(index)
    except (OSError, ts.UnsupportedArchitecture) as e:
        d.update(readable=False, error=str(e),
                 note="hardware stamps cannot be related to CLOCK_REALTIME: software stamps will be used")
        return d
    try:
        phc_ns, off = phc._last
        d.update(readable=True, method=phc.method, uncertainty_ns=phc.uncertainty_ns,
                 phc_minus_realtime_s=off / 1e9)
        # What the Error Estimate adds for the conversion (RFC 4656 §4.1.2): it needs the drift, so
        # a second reading one refresh interval later, as the agent has after its first second.
        time.sleep(phc.refresh_ns / 1e9)
        try:
            phc.refresh()
            d.update(conversion_error_ns=phc.conversion_error_ns, drift_ppm=phc._slope * 1e6,
                     conversion_steps=phc.steps, conversion_span_s=phc.refresh_ns / 1e9)
        except OSError as e:
            d["conversion_error"] = f"second PHC reading failed: {e}"
        if abs(off / 1e9 - round(off / 1e9)) < 1e-3 and 30 <= round(off / 1e9) <= 40:
            d["note"] = "PHC looks like TAI (ptp4l); converted per stamp, phc2sys not required"
        # CLOCK_REALTIME disciplined to this PHC: a phc2sys follows it and has marked the
        # kernel clock synchronised (linuxptp clears STA_UNSYNC once its servo locks), and
        # the offset we measure is whole seconds (UTC/TAI) to within a millisecond.
        residual = off - round(off / 1e9) * 10**9
        daemons = [p for p in phc2sys_processes() if _phc2sys_targets(p, index, iface)]
        try:
            synced = clock.read_clock_state().synced
        except OSError:
            synced = False
        d.update(residual_offset_ns=residual, phc2sys=daemons, realtime_synced=synced,
                 disciplined=bool(daemons) and synced and abs(residual) < 1_000_000)
    finally:
        phc.close()
    return d


def _self_test() -> dict[str, Any]:
    """Send one datagram to ourselves on loopback: do kernel RX and TX stamps arrive?"""
    from agent.engine import timestamping as ts
    from agent.engine.clock import StampCounters

    c = StampCounters()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            cfg = ts.enable_timestamping(s, "lo", hardware=False)
            t_user = time.time_ns()
            s.sendto(b"xwamp-doctor", s.getsockname())
            s.settimeout(1.0)
            _d, anc, _f, _a = s.recvmsg(64, ts.ANCILLARY_BUFSIZE)
            t_after = time.time_ns()
            rx = ts.rx_stamp(anc, config=cfg, counters=c)
            tx: list = []
            deadline = time.monotonic() + 1.0
            while not tx and time.monotonic() < deadline:
                tx = ts.drain_tx_stamps(s, config=cfg, counters=c)
                time.sleep(0.001)
    except (OSError, ts.UnsupportedArchitecture) as e:
        return {"ok": False, "error": str(e)}
    res: dict[str, Any] = {
        "rx": rx.source.value if rx else None,
        "tx": tx[0][1].source.value if tx else None,
        "tx_key": tx[0][0] if tx else None,
        "ok": rx is not None and bool(tx),
    }
    if rx and tx:
        res["tx_minus_user_us"] = (tx[0][1].ns - t_user) / 1e3
        res["user_minus_rx_us"] = (t_after - rx.ns) / 1e3
    return res


def probe_clock() -> dict[str, Any]:
    from agent.engine import clock

    out: dict[str, Any] = {}
    try:
        st = clock.read_clock_state()
    except OSError as e:
        return {"error": str(e)}
    names = {v: k[4:].lower() for k, v in vars(clock).items() if k.startswith("STA_") and isinstance(v, int)}
    ee, ee_ptp = st.error_estimate(), st.error_estimate(ptp=True)
    out.update(
        synced=st.synced, state=st.state_name,
        status=[names[b] for b in sorted(names) if st.status & b],
        esterror_us=st.esterror_us, maxerror_us=st.maxerror_us,
        offset_ns=st.offset_ns, freq_ppm=round(st.freq_ppm, 3), tai_offset_s=st.tai_offset_s,
        error_estimate={"ntp": f"0x{ee.pack():04x}", "ptp": f"0x{ee_ptp.pack():04x}",
                        "S": int(ee.synced), "scale": ee.scale, "multiplier": ee.multiplier,
                        "seconds": ee.seconds},
    )
    if st.synced and st.esterror_us == 0 and st.maxerror_us == 0:
        out["note"] = f"daemon publishes no error; assuming {clock.UNKNOWN_SYNCED_ERROR_S * 1e3:g} ms"
    try:
        with open(CLOCKSOURCE_PATH) as f:
            out["clocksource"] = f.read().strip()
    except OSError:
        out["clocksource"] = None
    return out


def read_lockdown(path: str = LOCKDOWN_PATH) -> str | None:
    """The active lockdown mode ('none', 'integrity', 'confidentiality'); None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if "[" in text and "]" in text:
        return text[text.index("[") + 1:text.index("]")]
    return text.strip() or None


def _keys_redacted(sa: Any) -> bool:
    kr = getattr(sa, "keys_redacted", False)
    return bool(kr() if callable(kr) else kr)


def _raw_xfrm_dump(timeout: float = 2.0) -> list[bytes]:
    """XFRM_MSG_GETSA dump over a bare NETLINK_XFRM socket -> the NEWSA message bodies."""
    from netlink import constants as C

    bodies: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, C.NETLINK_XFRM) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        seq = int(time.time()) & 0x7FFFFFFF
        s.send(struct.pack("=IHHII", 16, C.XFRM_MSG_GETSA, C.NLM_F_REQUEST | C.NLM_F_DUMP, seq, 0))
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                ln, mtype, _fl, mseq, _pid = struct.unpack_from("=IHHII", data, off)
                if ln < 16 or off + ln > len(data):
                    raise OSError("malformed netlink reply")
                if mseq == seq:
                    if mtype == C.NLMSG_DONE:
                        return bodies
                    if mtype == C.NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err:
                            raise OSError(err, os.strerror(err))
                    elif mtype == C.XFRM_MSG_NEWSA:
                        bodies.append(data[off + 16:off + ln])
                off += (ln + 3) & ~3


def probe_xfrm() -> dict[str, Any]:
    out: dict[str, Any] = {"lockdown": read_lockdown()}
    if out["lockdown"] is None:
        out["lockdown_note"] = f"{LOCKDOWN_PATH} not readable (securityfs not mounted or no lockdown LSM)"
    sas: list[Any] | None = None
    try:
        from netlink.xfrm import XfrmClient  # type: ignore[import-not-found]
    except ImportError:
        XfrmClient = None
    if XfrmClient is not None:
        try:
            client = XfrmClient()
            try:
                sas = list(client.dump_sas())
            finally:
                close = getattr(client, "close", None)
                if close:
                    close()
            out.update(readable=True, via="netlink.xfrm", sa_count=len(sas))
        except Exception as e:  # a doctor reports, it does not crash
            out.update(readable=False, via="netlink.xfrm", error=f"{type(e).__name__}: {e}")
    else:
        try:
            bodies = _raw_xfrm_dump()
            out.update(readable=True, via="raw NETLINK_XFRM", sa_count=len(bodies))
            try:
                from netlink.decode import decode_sa
                sas = [decode_sa(b) for b in bodies]
            except Exception:
                sas = None  # the count stands; keys stay unknown
        except OSError as e:
            out.update(readable=False, via="raw NETLINK_XFRM", error=str(e))
            if e.errno == 1:
                out["note"] = "dumping SAs needs CAP_NET_ADMIN"
    if sas is None:
        out["keys"] = "redacted (lockdown=confidentiality)" if out["lockdown"] == "confidentiality" else "unknown"
    elif not sas:
        out["keys"] = "no SAs to check"
    else:
        n = sum(_keys_redacted(sa) for sa in sas)
        out["keys"] = "visible" if n == 0 else f"redacted ({n}/{len(sas)} SAs)"
        out["keys_redacted_count"] = n
    return out


def probe_arch() -> dict[str, Any]:
    from agent.engine import timestamping as ts

    m = platform.machine()
    return {"machine": m, "so_constants_ok": ts._so_values_ok(m.lower()), "ptp_ioctls_ok": ts._ioc_ok(m.lower())}


def collect(iface: str) -> dict[str, Any]:
    return {"iface": iface, "arch": probe_arch(), "timestamping": probe_timestamping(iface),
            "clock": probe_clock(), "xfrm": probe_xfrm()}


# ---- rendering -----------------------------------------------------------------------------


def fmt_seconds(x: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x / 1e-9:.4g} ns"


def _line(label: str, value: object) -> str:
    return f"  {label + ':':<16}{value}"


def render_text(r: dict[str, Any]) -> str:
    out = [f"xwamp doctor: {r['iface']}"]
    t = r["timestamping"]
    out.append(f"Timestamping ({t['iface']})")
    if "ts_info" not in t:
        out.append(_line("error", t.get("error")))
    else:
        i = t["ts_info"]
        out.append(_line("capabilities", " ".join(i["capabilities"]) or "none"))
        out.append(_line("PHC", f"/dev/ptp{i['phc_index']}" if i["phc_index"] is not None else "none"))
        out.append(_line("tx types", " ".join(i["tx_types"]) or "-"))
        out.append(_line("rx filters", " ".join(i["rx_filters"]) or "-"))
        hw = t.get("hwtstamp")
        out.append(_line("hwtstamp", f"tx {hw['tx_type']}, rx filter {hw['rx_filter']}" if hw
                         else t.get("hwtstamp_note")))
        if "phc" in t:
            p = t["phc"]
            if p.get("readable"):
                out.append(_line("PHC-REALTIME", f"{p['phc_minus_realtime_s']:.9f} s via {p['method']} "
                                 f"(±{p['uncertainty_ns']} ns)"))
                if "conversion_error_ns" in p:
                    out.append(_line("conversion", f"±{p['conversion_error_ns']} ns added to the Error Estimate "
                                     f"(drift {p['drift_ppm']:+.3f} ppm over {p['conversion_span_s']:g} s"
                                     + (", a step seen: drift unknown" if p["conversion_steps"] else "") + ")"))
                elif "conversion_error" in p:
                    out.append(_line("conversion", p["conversion_error"]))
            else:
                out.append(_line("PHC", f"{p['device']} not readable: {p.get('error')}"))
            if p.get("note"):
                out.append(_line("", p["note"]))
            if p.get("readable"):
                who = ", ".join(f"phc2sys pid {q['pid']}" for q in p["phc2sys"]) or "no phc2sys follows it"
                out.append(_line("disciplined", ("yes: CLOCK_REALTIME follows the PHC" if p["disciplined"] else "no")
                                 + f" ({who}; kernel clock {'synced' if p['realtime_synced'] else 'unsynced'}; "
                                 f"residual {p['residual_offset_ns'] / 1e3:.1f} µs)"))
        hv = t.get("hardware")
        if hv:
            out.append(_line("hardware TX", hv["tx"]))
            out.append(_line("hardware RX", f"{hv['rx']} ({hv['rx_reason']})"))
        plan = t.get("plan", {})
        if "error" in plan:
            out.append(_line("plan", plan["error"]))
        else:
            rx = "hardware" if plan.get("hardware_rx") else "software"
            tx = "hardware" if plan.get("hardware_tx") else "software"
            out.append(_line("plan", f"RX {rx}, TX {tx} (software is the per-packet fallback)"))
        k = t.get("kernel_stamps", {})
        if k.get("ok"):
            out.append(_line("kernel stamps", f"OK on loopback: RX {k['rx']}, TX {k['tx']} (OPT_ID {k['tx_key']}), "
                             f"TX-user {k['tx_minus_user_us']:.1f} µs, user-RX {k['user_minus_rx_us']:.1f} µs"))
        else:
            out.append(_line("kernel stamps", f"FAILED: {k.get('error') or k}"))
    c = r["clock"]
    out.append("Clock")
    if "error" in c:
        out.append(_line("adjtimex", c["error"]))
    else:
        out.append(_line("sync", ("synchronised" if c["synced"] else "NOT synchronised") + f" ({c['state']})"))
        out.append(_line("status", " ".join(c["status"]) or "-"))
        out.append(_line("esterror", fmt_seconds(c["esterror_us"] * 1e-6)))
        out.append(_line("maxerror", fmt_seconds(c["maxerror_us"] * 1e-6)))
        e = c["error_estimate"]
        out.append(_line("error estimate", f"S={e['S']} scale={e['scale']} mult={e['multiplier']} = "
                         f"{fmt_seconds(e['seconds'])} (NTP {e['ntp']}, PTP {e['ptp']})"))
        if c.get("note"):
            out.append(_line("", c["note"]))
        out.append(_line("clocksource", c.get("clocksource") or "unknown"))
    x = r["xfrm"]
    out.append("XFRM")
    if x.get("readable"):
        out.append(_line("netlink", f"readable via {x['via']}, {x['sa_count']} SAs"))
    else:
        out.append(_line("netlink", f"NOT readable via {x.get('via')}: {x.get('error')}"))
        if x.get("note"):
            out.append(_line("", x["note"]))
    out.append(_line("lockdown", x["lockdown"] or x.get("lockdown_note")))
    out.append(_line("SA keys", x["keys"]))
    a = r["arch"]
    out.append("Architecture")
    out.append(_line("machine", a["machine"] + ("" if a["so_constants_ok"] else
                                                 " (UNSUPPORTED: SO_TIMESTAMPING numbers differ)")))
    if not a["ptp_ioctls_ok"]:
        out.append(_line("", "PTP ioctl encoding differs: hardware stamps unavailable"))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    iface = args.iface or default_iface()
    report = collect(iface)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_text(report))
    return 0 if report["timestamping"].get("ok") else 1
