"""Shared pytest set-up. Tests marked ``kernel`` need ESP/AH/netem: see tools/run-tests."""

import socket
import time

import pytest


@pytest.fixture(scope="session", autouse=True)
def _rx_stamping_switched_on():
    """Keep one timestamping socket open for the whole run, as a running agent does.

    The kernel turns RX stamping on lazily: the first socket that asks schedules a work
    item (net_enable_timestamp -> netstamp_work) and packets received before it has run
    get no stamp. The engine counts those as user-space fallbacks; the tests want the
    steady state, not that start-up race, which made them flaky under load.
    """
    from agent.engine.timestamping import enable_timestamping

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    enable_timestamping(s)
    time.sleep(0.05)
    yield
    s.close()
