"""Hardware-timestamp tests: two emulated Intel 82576 (igb, each with a PHC) on one QEMU hub.

tools/run-tests boots them with ``tools/vm/run --nics igb`` (QEMU 10, fetched into the VM
cache). Everything here is marked ``kernel`` and ``hwstamp``. Without the two NICs the
session fixture FAILS (never skips): the hardware path must not go silently untested.

The ``igb`` fixture moves the first NIC into netns ``hwa`` (10.77.0.1/24) and the second
into ``hwb`` (10.77.0.2/24) and waits for carrier; frames really cross the emulated wire.
"""

from __future__ import annotations

import pytest

from .igbpair import IgbPair, Nic, SetupError, netns, setup, teardown  # noqa: F401 (re-exported for tests)


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/kernel_hw/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
            item.add_marker(pytest.mark.hwstamp)


@pytest.fixture(scope="session")
def igb() -> IgbPair:
    try:
        pair = setup()
    except SetupError as e:
        pytest.fail(str(e))  # never a skip: the hardware path must not go silently untested
    yield pair
    teardown()
