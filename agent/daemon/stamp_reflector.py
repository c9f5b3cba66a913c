"""The agent's STAMP Session-Reflector (``[reflector]``): one agent.engine.udp endpoint per
listen address, answering STAMP (RFC 8762/8972) and TWAMP-Light; counters summed for the exporter."""

from __future__ import annotations

import logging

from agent.control.keyring import read_hmac_key
from agent.daemon import config as cfg

log = logging.getLogger("xwamp.agent")


class StampReflectors:
    def __init__(self, section: cfg.ReflectorSection, runtime: object = None) -> None:
        """``runtime``: the agent's BinderRuntime (its SA table and policies) for mode
        auth+ipsec-bound (docs/wire-format.md §9)."""
        self.section = section
        self.runtime = runtime
        self.tunnel_keys: list = []
        self.endpoints: list = []

    async def start(self) -> None:
        from agent.engine import timestamping as ts
        from agent.engine.packets import Proto, Security
        from agent.engine.reflector import ReflectorSession
        from agent.engine.udp import TwampReflectorEndpoint
        from netlink.secret import Secret

        s = self.section
        key = Secret(read_hmac_key(s.keyfile)) if s.mode == "auth" and s.keyfile else None
        try:
            for addr in s.listen:
                if s.mode == "auth+ipsec-bound":
                    from agent.sessions.stamp_keys import TunnelStampKeys

                    if self.runtime is None:
                        raise ValueError("mode auth+ipsec-bound needs the SA table")
                    tk = TunnelStampKeys(self.runtime.table, self.runtime.policies, local=addr)  # type: ignore[attr-defined]
                    self.tunnel_keys.append(tk)
                    sess = tk.reflector(stateful=s.stateful)
                else:
                    sess = ReflectorSession(Proto.STAMP, Security.AUTH if key is not None else Security.UNAUTH,
                                            stamp_key=key, stateful=s.stateful)
                # [reflector] iface: T2 from the PHC where its RX filter stamps our packets, and
                # the replies' hardware TX stamps as Follow-Up T3 (RFC 8972 §4.7).
                hw = ts.hardware_opt_in(s.iface)
                ep = TwampReflectorEndpoint((addr, s.port), default=sess, iface=s.iface if hw else None, hardware=hw)
                await ep.start()
                self.endpoints.append(ep)
                log.info("STAMP reflector listening", extra={"listen": addr, "port": ep.port, "mode": s.mode,
                                                             "stateful": s.stateful})
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for ep in self.endpoints:
            ep.close()
        self.endpoints = []

    @property
    def ports(self) -> list[int]:
        return [ep.port for ep in self.endpoints]

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        peers = 0
        for ep in self.endpoints:
            for k, v in ep.counters().items():
                total[k] = total.get(k, 0) + v
            if ep.default is not None:
                peers += ep.default.peers
            for k, v in getattr(ep.default, "key_results", {}).items():
                total[f"tunnel_key_{k}"] = total.get(f"tunnel_key_{k}", 0) + v
        total["peers"] = peers
        return total
