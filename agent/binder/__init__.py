"""The key binder: which IPsec SA a measurement rides in, and the O/TWAMP keys derived from it.

:mod:`announce` matches the Server Greeting's SA announcement (SPI and protocol) against the
live SA table and is the control plane's key source for the IPsec modes; :mod:`keys` rebuilds
KEYMAT from the kernel's SA pair and derives each mode's keys (docs/wire-format.md §3–§4);
:mod:`ikev2` holds prf and prf+ (RFC 7296 §2.13); :mod:`keysource` reads IKE SA secrets
(SK_d, nonces) that only the IKE daemon knows. May import: ``agent.control``,
``agent.engine`` and ``netlink``; never sessions, daemon, exporters or the CLI.
"""
