"""The UDP test engine: O/TWAMP-Test and STAMP (RFC 4656 §4, RFC 5357 §4, RFC 8762/8972) over
SO_TIMESTAMPING sockets, hardware stamps first.

May import ``netlink`` (for network namespaces) and nothing else of xwamp: the control
plane, the binder and the sessions build on this package, never the other way round.

Modules:

* :mod:`agent.engine.packets` — layouts, codecs, ``Proto``/``Security``, Modes bits,
  ``security_from_mode`` (RFC 5618 mixed → unauthenticated test packets), ``PacketError``.
* :mod:`agent.engine.crypto` — per-session AES/HMAC contexts (``TwampTestCrypto``,
  ``StampCrypto``) and what each mode encrypts and authenticates.
* :mod:`agent.engine.tlv` — RFC 8972 TLVs.
* :mod:`agent.engine.reflector` — sans-IO ``ReflectorSession.reflect(data, rx_ns, ttl, now_ns)``.
* :mod:`agent.engine.sender` — sans-IO ``TestSender`` (build / on_tx_stamp / on_reply /
  records), ``Schedule`` (fixed, poisson, RFC 4656 slots), ``PacketRecord``.
* :mod:`agent.engine.schedule` — the RFC 4656 §5 deterministic exponential schedule.
* :mod:`agent.engine.receiver` — sans-IO ``OwampReceiver`` and Fetch-Session records.
* :mod:`agent.engine.udp` — asyncio adapters: ``TwampReflectorEndpoint``,
  ``OwampReceiverEndpoint``, ``run_twamp_sender`` (see its docstring for the
  control plane's calls).
* :mod:`agent.engine.counters` — ``Counters.as_dict()`` shared by the per-session counter records.
* :mod:`agent.engine.timestamping` — SO_TIMESTAMPING (hardware first), PHC ↔ CLOCK_REALTIME.
* :mod:`agent.engine.clock` — the clock's state (adjtimex) and the Error Estimate;
  :mod:`agent.engine.clockerr` the per-packet estimate; :mod:`agent.engine.timefmt` NTP/PTP
  timestamp formats; :mod:`agent.engine.ethtool` the NIC's timestamping capabilities.
* :mod:`agent.sessions.results` (outside this package) — statistics of ``PacketRecord`` lists.

The keys come from the control plane as :class:`agent.engine.keys.TestKeys`.
"""
