"""Shared pytest set-up. Tests marked ``kernel`` need ESP/AH/netem: see tools/run-tests."""
