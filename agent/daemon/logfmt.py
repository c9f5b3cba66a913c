"""Structured logging for the agent: logfmt (``ts=… level=info msg="…" peer=…``) or JSON lines.

Fields come from ``extra=``::

    log.info("session up", extra={"peer": "192.0.2.2", "reqid": 7})

Key material never reaches the output: bytes-like values, :class:`netlink.secret.Secret`
and fields whose name says they hold a secret are replaced by a redaction marker
(Secret's own repr is already key-free; bytes would not be).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, TextIO

from netlink.secret import Secret

# Attributes every LogRecord has: everything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SECRET_NAMES = frozenset({"key", "keys", "secret", "passphrase", "password", "token", "shared_secret",
                           "enc_key", "auth_key", "aead_key", "aes_key", "hmac_key", "sk_d", "skeyseed", "keymat"})
REDACTED = "<redacted>"


def _clean(name: str, v: Any) -> Any:
    if name.lower() in _SECRET_NAMES:
        return REDACTED
    if isinstance(v, (bytes, bytearray, memoryview, Secret)):
        return REDACTED
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return str(v)


def _ts(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record as ordered key/value pairs: ts, level, logger, msg, extras, error."""
    out: dict[str, Any] = {
        "ts": _ts(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for k, v in vars(record).items():
        if k not in _STANDARD and not k.startswith("_") and k not in out:
            out[k] = _clean(k, v)
    if record.exc_info and record.exc_info[0] is not None:
        out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        out["traceback"] = logging.Formatter().formatException(record.exc_info)
    return out


def _logfmt_value(v: Any) -> str:
    if v is None:
        return ""
    if v is True or v is False:
        return "true" if v else "false"
    s = str(v)
    if s and not any(c in s for c in ' ="\\') and s.isprintable():
        return s
    return json.dumps(s, ensure_ascii=False)  # quotes and escapes \n, \", \\


def _logfmt_key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in k) or "_"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields(record), ensure_ascii=False, separators=(",", ":"))


def setup(fmt: str = "logfmt", level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to ``stream`` (stderr: journald stores it) in ``fmt``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
