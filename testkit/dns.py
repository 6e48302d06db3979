"""A DNS server on loopback whose answers change while it runs (dnslib).

It plays the cluster DNS of a headless Service: :meth:`ZoneServer.set_endpoints`
publishes the instances of a name as SRV records (``_connect._tcp`` style
targets ``<n>.<name>`` with their own A/AAAA records, also sent as
additional records) and the name's own A/AAAA records; the next query sees
the new set. ``fail`` makes it answer SERVFAIL (a resolver failure).
Used by the discovery tests and the rolling-restart benchmark.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any, Dict, Iterable, List, Tuple

__all__ = ["ZoneServer"]

TTL = 1


class ZoneServer:
    """A UDP (and TCP) DNS server on ``host`` and a free port; see the module doc.

    Use as a context manager or call :meth:`stop`. ``address`` is
    ``(host, port)``; ``queries`` counts the questions answered.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        from dnslib.server import DNSServer

        self._lock = threading.Lock()  # guards _records, _fail and queries
        self._records: Dict[str, List[Any]] = {}  # lower-case name with dot -> RRs
        self._fail = False
        self.queries = 0
        #: Whether SRV answers carry their targets' addresses (as CoreDNS's do).
        self.glue = True
        for _attempt in range(50):  # a UDP port whose TCP twin is free too
            self._udp = DNSServer(_Resolver(self), address=host, port=0, logger=_QuietLogger())
            port = self._udp.server.server_address[1]
            try:
                self._tcp = DNSServer(_Resolver(self), address=host, port=port, tcp=True,
                                      logger=_QuietLogger())
                break
            except OSError:
                self._udp.server.server_close()
        else:  # pragma: no cover
            raise OSError("no port free for both UDP and TCP")
        self.address: Tuple[str, int] = (host, port)
        for dns_server in (self._udp, self._tcp):
            threading.Thread(target=dns_server.server.serve_forever, kwargs={"poll_interval": 0.05},
                             name="dns-server", daemon=True).start()

    def set_endpoints(self, name: str, endpoints: Iterable[Tuple[str, int]], srv: bool = True) -> None:
        """Publish ``endpoints`` (``(ip, port)`` pairs) for ``name``: SRV
        records with per-instance targets when ``srv``, and the name's
        A/AAAA records. An empty list removes the name (NXDOMAIN)."""
        from dnslib import AAAA, QTYPE, RR, SRV, A

        name = name.rstrip(".").lower() + "."
        records: Dict[str, List[Any]] = {}
        for index, (address, port) in enumerate(sorted(endpoints)):
            is_v6 = ipaddress.ip_address(address).version == 6
            rdata = AAAA(address) if is_v6 else A(address)
            rtype = QTYPE.AAAA if is_v6 else QTYPE.A
            records.setdefault(name, []).append(RR(name, rtype, rdata=rdata, ttl=TTL))
            if srv:
                target = f"i{index}-{port}.{name}"
                records[name].append(RR(name, QTYPE.SRV, rdata=SRV(0, 100, port, target), ttl=TTL))
                records.setdefault(target, []).append(RR(target, rtype, rdata=rdata, ttl=TTL))
        with self._lock:
            for key in [key for key in self._records if key == name or key.endswith("." + name)]:
                del self._records[key]
            self._records.update(records)

    def fail(self, failing: bool = True) -> None:
        """Answer SERVFAIL to everything (``False``: answer again)."""
        with self._lock:
            self._fail = failing

    def answer(self, request: Any) -> Any:
        """The reply to one parsed request (called on the server's threads)."""
        from dnslib import QTYPE, RCODE

        reply = request.reply()
        question = request.q
        qname = str(question.qname).lower()
        with self._lock:
            self.queries += 1
            if self._fail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = list(self._records.get(qname, ()))
            known = qname in self._records
            glue = {key: list(value) for key, value in self._records.items()}
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for record in records:
            if record.rtype == question.qtype:
                reply.add_answer(record)
                if record.rtype == QTYPE.SRV and self.glue:
                    for extra in glue.get(str(record.rdata.target).lower(), ()):
                        reply.add_ar(extra)
        return reply

    def stop(self) -> None:
        """Stop serving (both threads end)."""
        self._udp.server.shutdown()
        self._tcp.server.shutdown()
        self._udp.server.server_close()
        self._tcp.server.server_close()

    def __enter__(self) -> "ZoneServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Resolver:
    def __init__(self, zone: ZoneServer) -> None:
        self.zone = zone

    def resolve(self, request: Any, handler: Any) -> Any:
        return self.zone.answer(request)


class _QuietLogger:
    """dnslib logs every query to stdout by default: say nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
