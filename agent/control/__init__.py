"""O/TWAMP-Control (RFC 4656 §3, RFC 5357 §3, RFC 5618, RFC 5938): sans-IO core and asyncio adapters.

Modules
-------
messages   frozen dataclasses with pack()/unpack() for every control message;
           ``ProtocolError`` is the one exception for malformed input.
modes      Modes bits (security modes, key modes incl. RFC 7717 / xwamp IPsec bits via
           ``register_key_mode``, TWAMP capability bits) and the client's choice.
security   PBKDF2 key, Token, per-direction AES-CBC streams chained across messages,
           control HMAC chain, test-session key derivation (-> agent.engine.keys.TestKeys).
client     ``ControlClient``: sans-IO client state machine (TWAMP and OWAMP).
server     ``ControlServer``: sans-IO server state machine with per-connection limits.
events     the events both machines return from ``receive_data()``; with
           ``defer_keys=True`` a ``KeyNeeded`` hands the PBKDF2 to the adapter
           (answer with ``key_ready()``), which runs it in a worker thread.
keyring    the key seam: where the control plane asks for a KeyID's shared secret
           (passphrase files, static keys; the binder plugs in here too).
aio        ``ControlListener`` (TCP server: limits, isolation, idle timeout) and
           ``AsyncControlClient``.

May import ``agent.engine`` (test-session keys, time formats) and ``netlink`` (Secret);
never the binder, sessions, daemon or CLI. Full sessions that drive the test plane live in
agent.sessions.
"""
