"""Issue 11 item 9: with keys configured (a keyfile, or the IPsec binding), the server's
default modes leave out plain unauthenticated mode unless it is asked for."""

from __future__ import annotations

import subprocess
import sys

from tests.hostile import harness as h


def _ping(port: int, mode: str, keys) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "ping", "127.0.0.1", "--port", str(port), "--mode", mode,
                           "--keyfile", str(keys), "--user", h.USER, "-c", "1", "--wait", "1", "--timeout", "20"],
                          cwd=h.ROOT, env=h.env(), capture_output=True, text=True, timeout=60)


def test_keyfile_server_offers_no_plain_unauth_unless_asked(tmp_path) -> None:
    keys = h.keyfile(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "server", "--listen", "127.0.0.1", "--protocol", "twamp",
                             "--twamp-port", "0", "--keyfile", str(keys), "--count", "1024", "--duration", "120"],
                            cwd=h.ROOT, env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "modes auth, enc, mixed" in line and "unauth" not in line, line
        port = int(line.split(" port ")[1].split(",")[0])
        r = _ping(port, "unauth", keys)
        assert r.returncode != 0 and "none of ['unauth']" in r.stderr, r.stderr
        assert _ping(port, "auth", keys).returncode == 0
    finally:
        proc.terminate()
        proc.wait(15)


def test_ipsec_server_refuses_plain_unauth_at_setup() -> None:
    """Under --ipsec the unauth bit stays offered for unauth+ipsec-bound; plain unauth
    (no key mode) is refused in Server-Start (RFC 4656 §3.1 Accept=3)."""
    from agent.control import events as ev
    from agent.control import modes as md
    from agent.control.server import ControlServer, ServerConfig

    cfg = ServerConfig(modes=int(md.Mode.UNAUTHENTICATED | md.Mode.AUTHENTICATED), allow_plain_unauth=False)
    srv = ControlServer(True, cfg)
    srv.data_to_send()
    events = srv.receive_data((1).to_bytes(4, "big") + bytes(160))  # Set-Up-Response, Mode = 1 (unauth)
    assert any(isinstance(e, ev.SetupRejected) and e.accept == 3 for e in events)
    assert srv.data_to_send()[15] == 3 and srv.closed  # Server-Start Accept = 3


def test_agent_keyfile_default_modes(tmp_path) -> None:
    from agent.daemon import config as cfg

    keys = h.keyfile(tmp_path)
    assert "unauth" not in cfg.parse({"server": {"keyfile": str(keys)}}).server.modes
    assert "unauth" in cfg.parse({"server": {"keyfile": str(keys), "modes": ["unauth", "auth"]}}).server.modes
    assert "unauth" in cfg.parse({}).server.modes  # no keys: nothing else would work
