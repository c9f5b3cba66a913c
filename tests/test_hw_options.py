"""Hardware-stamp options: the agent's ``iface`` keys and ``--iface`` of ping/stamp/reflect.

Bad values: one line (config: file, key, why; CLI: stderr) and exit 2. The hardware itself is
shown in the VM (tests/kernel_hw); here only what the options turn into."""

from __future__ import annotations

import asyncio

import pytest

from agent.daemon import config as cfg
from agent.engine import timestamping as ts
from tests.test_cli_errors import HOST, assert_one_line, xwamp


def _err(doc: dict) -> str:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(doc, "xwamp.toml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_iface_keys_reach_the_config() -> None:
    assert cfg.parse({"server": {"iface": "eth2"}}).server.iface == "eth2"
    c = cfg.parse({"peers": [{"address": "192.0.2.2", "iface": "eth0"},
                             {"address": "192.0.2.3", "protocol": "stamp", "iface": "enp1s0f1"}],
                   "discovery": {"iface": "eth1"}, "reflector": {"enabled": True, "iface": "eth0"}})
    assert [p.session.iface for p in c.peers] == ["eth0", "enp1s0f1"]
    assert c.discovery.session.iface == "eth1" and c.reflector.iface == "eth0"
    assert cfg.parse({}).reflector.iface is None and cfg.SessionTemplate().iface is None


@pytest.mark.parametrize("doc,key", [
    ({"peers": [{"address": "192.0.2.2", "iface": "a/b"}]}, "peers[0].iface"),
    ({"peers": [{"address": "192.0.2.2", "iface": "x" * 16}]}, "peers[0].iface"),
    ({"peers": [{"address": "192.0.2.2", "iface": ""}]}, "peers[0].iface"),
    ({"peers": [{"address": "192.0.2.2", "iface": 3}]}, "peers[0].iface"),
    ({"discovery": {"iface": "eth 0"}}, "discovery.iface"),
    ({"reflector": {"iface": "eth0:1"}}, "reflector.iface"),
    ({"server": {"iface": "a b"}}, "server.iface"),
])
def test_bad_iface_is_one_line(doc: dict, key: str) -> None:
    assert f"xwamp.toml: {key}: " in _err(doc)


@pytest.mark.parametrize("cmd", [["ping", HOST], ["stamp", HOST], ["reflect", "--port", "0", "--duration", "1"],
                                 ["server", "--twamp-port", "0", "--owamp-port", "0", "--duration", "1"]])
def test_cli_unknown_iface(cmd: list[str]) -> None:
    line = assert_one_line(xwamp(*cmd, "--iface", "nosuchif0"), "--iface nosuchif0", "no interface named")
    assert line.startswith(f"xwamp {cmd[0]}: ")


def test_reflect_iface_without_phc_keeps_software_stamps() -> None:
    """lo has no PHC: same fallback as ping, software stamps, no error; the reflector answers."""
    r = xwamp("reflect", "--listen", "127.0.0.1", "--port", "0", "--iface", "lo", "--duration", "0.5")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "listening on 127.0.0.1:" in r.stdout


def test_stamp_session_asks_for_hardware_on_its_iface(monkeypatch) -> None:
    """StampOptions.iface reaches the sender's socket set-up (hardware=True, the NIC named)."""
    from agent.engine import udp
    from agent.sessions.stamp import StampOptions, stamp_session

    seen = {}

    async def fake_sender(*a, **kw):
        seen.update(iface=kw.get("iface"), hardware=kw.get("hardware"))
        return []

    monkeypatch.setattr(udp, "run_twamp_sender", fake_sender)
    asyncio.run(stamp_session(StampOptions("127.0.0.1", 862, count=1, iface="eth7")))
    assert seen == {"iface": "eth7", "hardware": True}
    asyncio.run(stamp_session(StampOptions("127.0.0.1", 862, count=1)))
    assert seen == {"iface": None, "hardware": False}


def test_hardware_opt_in_configures_once_and_never_raises(monkeypatch) -> None:
    calls = []

    def configure(iface):
        calls.append(iface)
        raise OSError(19, "No such device")

    monkeypatch.setattr(ts, "configure_nic", configure)
    monkeypatch.setattr(ts, "_OPTED_IN", set())
    assert ts.hardware_opt_in(None) is False and calls == []
    assert ts.hardware_opt_in("eth9") is True and ts.hardware_opt_in("eth9") is True
    assert calls == ["eth9"]  # once per process: agent cycles reuse the decision


def test_raw_hardware_needs_the_flag_and_a_phc() -> None:
    f = ts.SOF_TIMESTAMPING_RAW_HARDWARE
    assert ts.TimestampingConfig(False, True, True, True, 0, f).raw_hardware  # hardware TX only: RX used if it comes
    assert not ts.TimestampingConfig(False, False, True, True, None, 0).raw_hardware
    assert not ts.TimestampingConfig(False, True, True, True, None, f).raw_hardware


def test_agent_metrics_carry_stamp_sources_and_reply_tx_stamps() -> None:
    """The agent's exporter sees the process-wide counters, the Follow-Up T3 sources and its own
    reflector's reply TX stamps (the supervisor used to build MetricsState without any)."""
    from agent.daemon.supervisor import Daemon
    from agent.engine.clock import STAMP_COUNTERS
    from agent.engine.udp import REPLY_TX_COUNTERS
    from exporters.prometheus import render

    before = REPLY_TX_COUNTERS.tx_hw
    REPLY_TX_COUNTERS.tx_hw += 2
    STAMP_COUNTERS.t3_hw += 3
    try:
        snap = Daemon(cfg.parse({}), exporter=False).metrics.snapshot()
        assert snap.stamps["reply_hw"] == before + 2 and snap.stamps["t3_hw"] >= 3
        assert snap.clock_synced is not None
        text = render(snap)[0].decode()
        assert f'xwamp_timestamps_total{{direction="reply",source="hw"}} {before + 2}' in text
        assert "xwamp_clock_synchronized" in text
    finally:
        REPLY_TX_COUNTERS.tx_hw -= 2
        STAMP_COUNTERS.t3_hw -= 3


@pytest.mark.parametrize("protocol", ["twamp", "owamp", "stamp"])
def test_agent_peer_iface_reaches_the_sender(tmp_path, monkeypatch, protocol: str) -> None:
    """A peer's ``iface`` is switched on once and reaches every cycle's test socket (hardware=True);
    lo has no PHC, so the packets still flow with software stamps. Real sessions on loopback."""
    from agent.daemon import supervisor as dm
    from agent.engine import udp
    from tests.test_daemon import FakeSAs, _free_port, until

    real = udp.run_twamp_sender
    seen: list[tuple[object, object]] = []

    async def spy(*a, **kw):
        seen.append((kw.get("iface"), kw.get("hardware")))
        return await real(*a, **kw)

    monkeypatch.setattr(udp, "run_twamp_sender", spy)
    from agent.sessions import session

    real_ep = session._started_endpoint
    endpoints: list[object] = []

    async def spy_ep(cls, host, port, ports=None, iface=None):
        endpoints.append((cls.__name__, iface))
        return await real_ep(cls, host, port, ports, iface)

    monkeypatch.setattr(session, "_started_endpoint", spy_ep)
    opted: list[str] = []
    monkeypatch.setattr(ts, "configure_nic", lambda iface: opted.append(iface))
    monkeypatch.setattr(ts, "_OPTED_IN", set())
    tw, ow, st = _free_port(), _free_port(), _free_port()
    port = {"twamp": tw, "owamp": ow, "stamp": st}[protocol]
    path = tmp_path / "x.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
iface = "lo"
[reflector]
enabled = true
listen = ["127.0.0.1"]
port = {st}
iface = "lo"
[exporter]
port = 0
[[peers]]
name = "self"
address = "127.0.0.1"
protocol = "{protocol}"
port = {port}
interval = 0.01
count = 5
timeout = 0.3
iface = "lo"
""")

    async def main():
        d = dm.Daemon(cfg.load(path), str(path), sa_source=FakeSAs([]), notify=lambda *a: True)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        m = d.metrics.sessions["peer:self"]
        await until(lambda: m.cycles >= 2, 30)
        d.request_stop()
        assert await asyncio.wait_for(task, 20) == 0
        return m

    m = asyncio.run(main())
    assert m.received >= 5
    assert ("lo", True) in seen and all(s == ("lo", True) for s in seen if s[0] is not None), seen
    assert opted == ["lo"]  # once per process, whatever the cycles, [server] and [reflector]
    # The server's side of TWAMP/OWAMP (its reflector / receiver endpoints; our OWAMP receiver) too.
    if protocol != "stamp":
        assert endpoints and all(e[1] == "lo" for e in endpoints), endpoints


def test_reload_puts_back_a_nic_no_key_names_any_more(tmp_path, monkeypatch) -> None:
    """SIGHUP that drops ``iface`` from [reflector] puts that NIC's stamping back at once (what used
    it has restarted), keeping the NICs still named; before, it stayed on until shutdown."""
    from agent.daemon import supervisor as dm
    from tests.test_daemon import FakeSAs, _free_port

    monkeypatch.setattr(ts, "configure_nic", lambda iface: None)
    monkeypatch.setattr(ts, "_OPTED_IN", set())
    kept: list[frozenset[str]] = []
    monkeypatch.setattr(ts, "restore_nic_configs", lambda keep=(): kept.append(frozenset(keep)) or [])
    port = _free_port()
    path = tmp_path / "x.toml"

    def write(reflector_iface: str) -> None:
        path.write_text(f"""
[server]
enabled = false
iface = "eth7"
[exporter]
enabled = false
[reflector]
enabled = true
listen = ["127.0.0.1"]
port = {port}
{reflector_iface}
""")

    write('iface = "lo"')

    async def main() -> None:
        d = dm.Daemon(cfg.load(path), str(path), sa_source=FakeSAs([]), notify=lambda *a: True, exporter=False)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        write("")
        assert await d.reload()
        assert kept == [frozenset({"eth7"})]  # lo is no longer named; [server]'s eth7 still is
        d.request_stop()
        assert await asyncio.wait_for(task, 20) == 0
        assert kept[-1] == frozenset()  # shutdown: everything

    asyncio.run(main())


def test_restore_keeps_the_nics_still_named(monkeypatch) -> None:
    from agent.engine import ethtool

    cur = {"eth0": ethtool.HwTstampConfig(0, 1, ethtool.HWTSTAMP_FILTER_ALL)}
    monkeypatch.setattr(ethtool, "get_hwtstamp", lambda iface: cur[iface])
    monkeypatch.setattr(ethtool, "set_hwtstamp", lambda iface, c: cur.__setitem__(iface, c))
    monkeypatch.setattr(ts, "_NIC_CHANGED", {"eth0": ethtool.HwTstampConfig(0, 0, 0)})
    monkeypatch.setattr(ts, "_NIC_APPLIED", {"eth0": cur["eth0"]})
    monkeypatch.setattr(ts, "_OPTED_IN", {"eth0", "eth1"})
    assert ts.restore_nic_configs(keep={"eth0"}) == [] and ts._OPTED_IN == {"eth0"}
    assert cur["eth0"].rx_filter == ethtool.HWTSTAMP_FILTER_ALL
    assert ts.restore_nic_configs() == ["eth0"] and cur["eth0"] == ethtool.HwTstampConfig(0, 0, 0)
    assert ts._OPTED_IN == set()
