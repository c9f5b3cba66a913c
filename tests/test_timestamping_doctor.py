"""`xwamp doctor`: probes, rendering, and XFRM readability inside a namespace with one SA."""

from __future__ import annotations

import json
import os
from pathlib import Path


from agent import cli
from agent.commands import doctor

ROOT = Path(__file__).resolve().parent.parent


def test_lockdown_parsing(tmp_path):
    f = tmp_path / "lockdown"
    f.write_text("none integrity [confidentiality]\n")
    assert doctor.read_lockdown(str(f)) == "confidentiality"
    f.write_text("[none] integrity confidentiality\n")
    assert doctor.read_lockdown(str(f)) == "none"
    assert doctor.read_lockdown(str(tmp_path / "missing")) is None


def test_default_iface(tmp_path):
    f = tmp_path / "route"
    f.write_text("Iface\tDestination\tGateway\n"
                 "eth1\t0000A8C0\t00000000\n"
                 "wan0\t00000000\t0100A8C0\n")
    assert doctor.default_iface(str(f)) == "wan0"
    assert doctor.default_iface(str(tmp_path / "none")) == "lo"


def test_fmt_seconds():
    assert doctor.fmt_seconds(16.0) == "16 s"
    assert doctor.fmt_seconds(0.0015) == "1.5 ms"
    assert doctor.fmt_seconds(2.5e-7) == "250 ns"


def test_doctor_on_loopback_text_and_json(capsys):
    assert cli.main(["doctor", "lo"]) == 0
    text = capsys.readouterr().out
    for section in ("Timestamping (lo)", "Clock", "XFRM", "kernel stamps:  OK", "error estimate:"):
        assert section in text
    assert cli.main(["doctor", "lo", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = r["timestamping"]
    assert t["ts_info"]["phc_index"] is None and t["hwtstamp"] is None
    assert t["kernel_stamps"] == t["kernel_stamps"] | {"ok": True, "rx": "sw", "tx": "sw", "tx_key": 0}
    assert t["plan"]["hardware_rx"] is False
    assert r["clock"]["error_estimate"]["multiplier"] >= 1
    assert r["arch"]["so_constants_ok"]
    if os.geteuid() == 0:
        assert r["xfrm"]["readable"] is True and isinstance(r["xfrm"]["sa_count"], int)


def test_doctor_unknown_interface_fails_cleanly(capsys):
    assert cli.main(["doctor", "nosuchif0"]) == 1
    assert "No such device" in capsys.readouterr().out


def test_render_survives_unreadable_everything():
    report = {"iface": "x", "arch": {"machine": "parisc64", "so_constants_ok": False, "ptp_ioctls_ok": False},
              "timestamping": {"iface": "x", "ok": False, "error": "boom"},
              "clock": {"error": "adjtimex: EPERM"},
              "xfrm": {"lockdown": None, "lockdown_note": "n/a", "readable": False, "via": "raw", "error": "EPERM",
                       "note": "dumping SAs needs CAP_NET_ADMIN", "keys": "unknown"}}
    text = doctor.render_text(report)
    assert "UNSUPPORTED" in text and "NOT readable" in text
