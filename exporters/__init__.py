"""Exporters: Prometheus exposition of xwamp measurements and SA state.

May import the measurement state (``agent.sessions``) and what lies below it (``agent.binder``,
``agent.control``, ``agent.engine``, ``netlink``); never the daemon or the CLI, which use it.
"""
