"""Whole measurement sessions: the control plane, the key binder and the test engine wired together.

:mod:`session` runs TWAMP/OWAMP clients and the server's per-connection handlers;
:mod:`bound`, :mod:`bound_server` and :mod:`bound_measurement` are sessions that live and
die with the SA they are bound to (rekeys, deletions); :mod:`netns_loop` runs an asyncio
loop inside a network namespace; :mod:`results` turns packet records into statistics and
:mod:`metrics` keeps the measurement state the exporter reads. May import: ``agent.binder``,
``agent.control``, ``agent.engine`` and ``netlink``; never the daemon, exporters or the CLI.
"""
