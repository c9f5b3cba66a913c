"""``xwamp agent``: the long-running daemon that ties every part together.

:mod:`supervisor` runs one session runner per measured peer and restarts them, follows the
SA table, reloads on SIGHUP; :mod:`discovery` says what to measure (configured peers and
discovered tunnels); :mod:`cycles` is the real runner, measuring in cycles; :mod:`servers`
holds the agent's O/TWAMP servers; :mod:`config` parses and validates the TOML config;
:mod:`sdnotify` talks to systemd and :mod:`logfmt` formats logs. May import everything
below it: ``agent.sessions``, ``agent.binder``, ``agent.control``, ``agent.engine``,
``exporters`` and ``netlink``; never the CLI (``agent.commands``, ``agent.cli``).
"""
