"""The agent speaks STAMP: a [reflector] and a protocol = "stamp" peer in one daemon on loopback,
with the same metrics and labels as TWAMP, the reflector's counters exported; config errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.daemon import config as cfg
from agent.daemon import supervisor as dm
from tests.test_daemon import FakeSAs, _free_port, until


@pytest.mark.parametrize("mode", ["unauth", "auth"])
def test_stamp_peer_against_own_reflector(tmp_path: Path, mode: str) -> None:
    port = _free_port()
    keyfile = tmp_path / "stamp.key"
    keyfile.write_text(bytes(range(32)).hex())
    keyfile.chmod(0o600)  # others may not read a key file
    auth = f'mode = "auth"\nkeyfile = "{keyfile}"\n' if mode == "auth" else ""
    path = tmp_path / "x.toml"
    path.write_text(f"""
[server]
enabled = false
[exporter]
port = 0
[reflector]
enabled = true
listen = ["127.0.0.1"]
port = {port}
{auth}
[[peers]]
name = "self"
address = "127.0.0.1"
protocol = "stamp"
port = {port}
interval = 0.01
count = 10
timeout = 0.3
{auth}""")

    async def main():
        d = dm.Daemon(cfg.load(path), str(path), sa_source=FakeSAs([]), notify=lambda *l: True)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        m = d.metrics.sessions["peer:self"]
        await until(lambda: m.cycles >= 2, 30)
        from exporters.prometheus import render

        body = render(d.snapshot())[0].decode()
        d.request_stop()
        assert await asyncio.wait_for(task, 20) == 0
        return m, body

    m, body = asyncio.run(main())
    assert m.sent >= 20 and m.received == m.sent
    # Follow-Up Telemetry: each cycle's last reply never gets its real T3, so it stays out of RTT
    # (at least that one; a follow-up that does not come in time leaves another sample pending)
    assert m.received - 2 * m.cycles <= m.rtt.snapshot().count <= m.received - m.cycles
    assert m.lost_forward == m.lost_reverse == m.lost_unknown == 0
    assert 'xwamp_packets_sent_total{name="self",peer="127.0.0.1",reqid="",protocol="stamp"}' in body
    assert 'xwamp_stamp_reflector_packets_total{result="reflected"}' in body
    assert 'xwamp_stamp_reflector_packets_total{result="bad_hmac"} 0.0' in body


@pytest.mark.parametrize("text,why", [
    ('[[peers]]\naddress = "127.0.0.1"\nprotocol = "stamp"\nmode = "enc"', "STAMP modes are unauth, auth"),
    ('[[peers]]\naddress = "127.0.0.1"\nprotocol = "stamp"\nmode = "auth"', "needs keyfile"),
    ('[reflector]\nenabled = true\nmode = "auth"', "reflector.keyfile: mode 'auth' needs keyfile"),
    ('[reflector]\nstateful = 1', "reflector.stateful"),
    ('[reflector]\nbogus = 1', "reflector"),
])
def test_stamp_config_errors(tmp_path: Path, text: str, why: str) -> None:
    p = tmp_path / "x.toml"
    p.write_text(text)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(p)
    assert why in str(e.value)


def test_stamp_defaults() -> None:
    c = cfg.parse({"peers": [{"address": "192.0.2.1", "protocol": "stamp"}]})
    assert c.peers[0].session.effective_port == 862
    assert c.reflector == cfg.ReflectorSection()


def test_tx_lag_histogram_in_metrics_both_renderers(tmp_path: Path) -> None:
    """xwamp_tx_stamp_lag_seconds{role}: the reflector's replies and the sender's packets measured
    (kernel TX stamp - the stamp written in the packet); read back with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    from agent.engine.txlag import TX_LAG
    from agent.sessions.metrics import MetricsState
    from exporters.prometheus import render

    TX_LAG.reset()
    TX_LAG.observe("reflector", 1_000_020_000, 1_000_000_000)  # 20 µs
    TX_LAG.observe("sender", 1_000_003_000, 1_000_000_000)  # 3 µs
    TX_LAG.observe("sender", 1_000_000_000, 1_000_000_500)  # negative: a misattributed stamp, not counted
    snap = MetricsState(cfg.DEFAULT_BUCKETS).snapshot()
    for accept in (None, "application/openmetrics-text; version=1.0.0"):
        body = render(snap, accept)[0].decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        fam = fams["xwamp_tx_stamp_lag_seconds"]
        assert fam.type == "histogram"
        got = {(smp.labels["role"], smp.name.rsplit("_", 1)[1], smp.labels.get("le")): smp.value for smp in fam.samples}
        assert got[("reflector", "count", None)] == 1 and got[("sender", "count", None)] == 1
        assert got[("reflector", "bucket", "2.5e-05")] == 1 and got[("reflector", "bucket", "1e-05")] == 0
        assert abs(got[("sender", "sum", None)] - 3e-6) < 1e-12
    assert TX_LAG.recent_bound("reflector") == 2e-05
    TX_LAG.reset()
