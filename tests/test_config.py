"""agent/daemon/config.py: defaults, validation with one-line errors naming file/key/why, CLI exit code 2."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon import config as cfg

REPO = Path(__file__).resolve().parent.parent


def err(doc: dict, source: str = "xwamp.toml") -> str:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(doc, source)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults() -> None:
    c = cfg.parse({})
    assert c.agent.log_format == "logfmt" and c.agent.log_level == "info"
    assert c.server.twamp_port == 862 and c.server.owamp_port == 861
    assert c.exporter.listen == "127.0.0.1" and c.exporter.port == 9862
    b = c.exporter.buckets
    assert b[0] == 1e-5 and b[-1] == 10.0 and list(b) == sorted(set(b))
    assert c.peers == () and not c.discovery.enabled


def test_example_config_is_valid() -> None:
    c = cfg.parse(__import__("tomllib").loads((REPO / "examples/xwamp.toml").read_text()), "examples/xwamp.toml")
    assert c.peers and c.discovery.enabled


def test_full_config() -> None:
    c = cfg.parse({
        "agent": {"log_format": "json", "log_level": "debug", "netns": "red", "sa_refresh_interval": 5},
        "server": {"listen": ["127.0.0.1", "::1"], "twamp_port": 1862, "owamp_port": 1861, "max_connections": 10,
                   "max_sessions_per_client": 2, "idle_timeout": 60, "max_rate": 100, "modes": ["unauth", "auth+ipsec-alt1"]},
        "exporter": {"listen": "::", "port": 9100, "buckets": [0.001, 0.01, 1]},
        "peers": [{"address": "192.0.2.2", "name": "paris", "interval": 0.1, "count": 100, "dscp": 46,
                   "padding": 64, "mode": ["auth+ipsec-alt1", "unauth+ipsec-bound"]},
                  {"address": "2001:db8::2", "protocol": "owamp", "source": "2001:db8::1"}],
        "discovery": {"enabled": True, "reqids": [1, 2], "selectors": ["10.0.0.0/8"], "addresses": ["192.0.2.0/24"],
                      "exclude": ["192.0.2.9/32"], "interval": 0.5, "mode": "unauth+ipsec-bound"},
    }, "x.toml")
    assert c.agent.netns == "red" and c.agent.sa_refresh_interval == 5.0
    assert c.exporter.buckets == (0.001, 0.01, 1.0) and c.exporter.ipdv_buckets == cfg.DEFAULT_BUCKETS
    p0, p1 = c.peers
    assert p0.name == "paris" and p0.address == ipaddress.ip_address("192.0.2.2") and p0.session.dscp == 46
    assert p0.session.modes == ("auth+ipsec-alt1", "unauth+ipsec-bound") and p0.session.effective_port == 862
    assert p1.name == "2001:db8::2" and p1.session.effective_port == 861
    assert c.discovery.reqids == (1, 2) and c.discovery.session.interval == 0.5
    assert c.discovery.addresses == (ipaddress.ip_network("192.0.2.0/24"),)
    with pytest.raises(Exception):
        c.agent.log_level = "error"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("doc,expected", [
    ({"peers": [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}, {"address": "10.0.0.300"}]},
     "xwamp.toml: peers[2].address: '10.0.0.300' is not an IP address"),
    ({"peers": [{"name": "x"}]}, "xwamp.toml: peers[0].address: is required"),
    ({"exporter": {"bukets": [1]}}, "xwamp.toml: exporter.bukets: unknown key"),
    ({"agent": {"log_format": "xml"}}, "xwamp.toml: agent.log_format: 'xml' is not one of logfmt, json"),
    ({"agent": {"log_level": 3}}, "xwamp.toml: agent.log_level: must be a string, not integer 3"),
    ({"peers": [{"address": "192.0.2.1", "interval": "1"}]}, "xwamp.toml: peers[0].interval: must be a number"),
    ({"peers": [{"address": "192.0.2.1", "interval": 0}]}, "xwamp.toml: peers[0].interval: 0.0 must be > 0"),
    ({"peers": [{"address": "192.0.2.1", "dscp": 64}]}, "xwamp.toml: peers[0].dscp: 64 is out of range 0..63"),
    ({"peers": [{"address": "192.0.2.1", "count": True}]}, "xwamp.toml: peers[0].count: must be an integer, not boolean"),
    ({"peers": [{"address": "192.0.2.1", "mode": "auth"}]}, "xwamp.toml: peers[0].keyfile: mode 'auth' needs a shared secret"),
    ({"peers": [{"address": "192.0.2.1", "mode": "fast"}]}, "xwamp.toml: peers[0].mode: 'fast': security mode must be one of"),
    ({"peers": [{"address": "192.0.2.1", "mode": "unauth+ipsec-alt1"}]}, "cannot be combined with unauth"),
    ({"peers": [{"address": "192.0.2.1", "mode": ["unauth", "auth+foo"]}]}, "xwamp.toml: peers[0].mode[1]: 'auth+foo': key mode"),
    ({"peers": [{"address": "192.0.2.1", "protocol": "owamp", "mode": "mixed"}]}, "mixed mode is TWAMP only"),
    ({"peers": [{"address": "192.0.2.1", "keyfile": "/nonexistent/k", "user": "u", "mode": "auth"}]},
     "xwamp.toml: peers[0].keyfile: '/nonexistent/k' does not exist"),
    ({"peers": [{"address": "192.0.2.1"}, {"address": "192.0.2.1"}]}, "xwamp.toml: peers[1].name: '192.0.2.1' is also peers[0]'s name"),
    ({"peers": [{"address": "192.0.2.1", "source": "::1"}]}, "different IP versions"),
    ({"peers": {"address": "192.0.2.1"}}, "xwamp.toml: peers: must be an array, not table"),
    ({"peers": ["192.0.2.1"]}, "xwamp.toml: peers[0]: must be a table, not string"),
    ({"server": {"listen": ["0.0.0.0", "localhost"]}}, "xwamp.toml: server.listen[1]: 'localhost' is not an IP address"),
    ({"server": {"modes": ["auth"]}}, "xwamp.toml: server.keyfile: modes auth/enc/mixed without an IPsec key mode need a keyfile"),
    ({"server": {"twamp_port": 900, "owamp_port": 900}}, "xwamp.toml: server.owamp_port: 900 is also server.twamp_port"),
    ({"exporter": {"buckets": [0.1, 0.01]}}, "xwamp.toml: exporter.buckets[1]: 0.01 must be greater than the previous bucket 0.1"),
    ({"exporter": {"buckets": [-1]}}, "xwamp.toml: exporter.buckets[0]: -1 must be a positive finite number of seconds"),
    ({"exporter": {"buckets": []}}, "xwamp.toml: exporter.buckets: needs at least one bucket"),
    ({"exporter": {"listen": "my-host"}}, "xwamp.toml: exporter.listen: 'my-host' is not an IP address"),
    ({"discovery": {"reqids": [0]}}, "xwamp.toml: discovery.reqids[0]: 0 is not a reqid"),
    ({"discovery": {"selectors": ["10.0.0.0/33"]}}, "xwamp.toml: discovery.selectors[0]: '10.0.0.0/33' is not an IP network"),
    ({"discovery": {"enabled": "yes"}}, "xwamp.toml: discovery.enabled: must be true or false, not string 'yes'"),
    ({"unknown": {}}, "xwamp.toml: unknown: unknown key"),
])
def test_errors_name_file_key_and_why(doc: dict, expected: str) -> None:
    assert expected in err(doc)


def test_load_reports_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\nlog_level = 'info'\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(bad)
    assert str(e.value).startswith(f"{bad}: invalid TOML:") and "line 1" in str(e.value)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(tmp_path / "missing.toml")
    assert "cannot read" in str(e.value)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[peers]]\naddress = "10.0.0.1"\n[[peers]]\naddress = "10.0.0.2"\n[[peers]]\naddress = "10.0.0.300"\n')
    r = _cli("agent", "--config", str(bad))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"{bad}: peers[2].address: '10.0.0.300' is not an IP address"]
    assert r.stdout == ""


def test_cli_check_mode(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[exporter]\nport = 9999\n")
    r = _cli("agent", "--config", str(good), "--check")
    assert r.returncode == 0 and r.stderr == ""
    r = _cli("agent", "--config", str(tmp_path / "nope.toml"), "--check")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
