"""O/TWAMP-Test and STAMP (RFC 4656 §4, RFC 5357 §4, RFC 8762/8972): packets, sender, reflector.

Modules:

* :mod:`agent.test.packets` — layouts, codecs, ``Proto``/``Security``, Modes bits,
  ``security_from_mode`` (RFC 5618 mixed → unauthenticated test packets), ``PacketError``.
* :mod:`agent.test.crypto` — per-session AES/HMAC contexts (``TwampTestCrypto``,
  ``StampCrypto``) and what each mode encrypts and authenticates.
* :mod:`agent.test.tlv` — RFC 8972 TLVs.
* :mod:`agent.test.reflector` — sans-IO ``ReflectorSession.reflect(data, rx_ns, ttl, now_ns)``.
* :mod:`agent.test.sender` — sans-IO ``TestSender`` (build / on_tx_stamp / on_reply /
  records), ``Schedule`` (fixed, poisson, RFC 4656 slots), ``PacketRecord``.
* :mod:`agent.test.schedule` — the RFC 4656 §5 deterministic exponential schedule.
* :mod:`agent.test.receiver` — sans-IO ``OwampReceiver`` and Fetch-Session records.
* :mod:`agent.test.udp` — asyncio adapters: ``TwampReflectorEndpoint``,
  ``OwampReceiverEndpoint``, ``run_twamp_sender`` (see its docstring for the
  control plane's calls).
* :mod:`agent.test.counters` — ``Counters.as_dict()`` shared by the per-session counter records.
* :mod:`agent.results` (outside this package) — statistics of ``PacketRecord`` lists.

The keys come from the control plane as :class:`agent.test.keys.TestKeys`.
"""
