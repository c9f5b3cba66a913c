"""Tests here need a kernel with ESP/AH/netem: tools/run-tests runs them natively or in the VM."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
