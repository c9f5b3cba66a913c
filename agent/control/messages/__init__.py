"""O/TWAMP-Control message codecs, one module per phase of the conversation (RFC 4656 §3, RFC 5357 §3, RFC 5938 §3).

Every message is a frozen dataclass with ``pack() -> bytes`` (plaintext, HMAC
fields zero) and ``unpack(bytes) -> message``. HMAC fields are never filled or
checked here: which octets an HMAC covers depends on the whole direction of the
stream (RFC 4656 §3.2), so :mod:`agent.control.security` does that, using each
message's ``hmac_offsets()``. Malformed input raises :class:`ProtocolError` and
nothing else.

Encoders are strict (they refuse values that do not fit), decoders are strict on
sizes and enumerated values but ignore MBZ contents (lenient, so future uses of
those octets do not break us). RFC 6038's fields in formerly MBZ octets are decoded.
"""

from typing import Union

from agent.control.messages.base import *  # noqa: F403
from agent.control.messages.commands import *  # noqa: F403
from agent.control.messages.fetch import *  # noqa: F403
from agent.control.messages.handshake import *  # noqa: F403
from agent.control.messages.requests import *  # noqa: F403

# Every command a client may send once the connection is set up.
ClientCommand = Union[RequestSession, RequestTWSession, StartSessions, StopSessions, FetchSession,  # noqa: F405
                      StartNSessions, StopNSessions]  # noqa: F405
