"""``xwamp agent --config /etc/xwamp/xwamp.toml``: the long-running measurement daemon."""

from __future__ import annotations

import argparse
import sys

HELP = "run the agent: O/TWAMP server, sessions to every peer and tunnel, Prometheus exporter"
DEFAULT_CONFIG = "/etc/xwamp/xwamp.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help=HELP, description=HELP)
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--log-format", choices=("logfmt", "json"), help="override agent.log_format")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override agent.log_level")
    p.add_argument("--check", action="store_true", help="validate the configuration, print nothing, exit 0 or 2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.daemon import config as cfg

    try:
        conf = cfg.load(args.config)
    except cfg.ConfigError as e:
        print(str(e), file=sys.stderr)  # one line: file, key, why
        return 2
    if args.check:
        return 0

    import asyncio
    import logging
    from dataclasses import replace

    from agent.daemon import logfmt
    from agent.daemon import supervisor as daemon

    overrides = {k: v for k, v in (("log_format", args.log_format), ("log_level", args.log_level)) if v}
    if overrides:
        conf = replace(conf, agent=replace(conf.agent, **overrides))

    def log_config(a: cfg.AgentSection) -> None:
        # A reload may change level/format, but flags given on the command line win.
        logfmt.setup(overrides.get("log_format", a.log_format), overrides.get("log_level", a.log_level))

    log_config(conf.agent)
    log = logging.getLogger("xwamp.agent")
    _raise_nofile()
    try:
        daemon.enter_netns(conf.agent.netns)
    except OSError as e:
        log.error("cannot enter network namespace", extra={"netns": conf.agent.netns, "error": str(e)})
        return 1
    try:
        return asyncio.run(daemon.serve(conf, args.config, on_log_config=log_config))
    except OSError as e:  # e.g. the exporter's port is taken: systemd shows this line
        log.error("agent failed to start", extra={"error": str(e)})
        return 1


def _raise_nofile(want: int = 65536) -> None:
    """Each session holds a control connection and a UDP socket on both ends: lift the soft
    file limit towards the hard one (systemd's LimitNOFILE sets both)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
