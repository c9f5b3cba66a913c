"""CLI subcommands. Each module exposes ``register(subparsers)``; agent.cli discovers them.

Modules must import heavy dependencies (pyroute2, scapy, asyncio machinery) inside
their run function, so that ``xwamp --help`` stays fast. May import every part of xwamp
(it is the top of the import graph, with agent.cli); no part imports it.
"""
