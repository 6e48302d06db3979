"""High availability (layer 4, see docs/contributing.rst): servers peered with
each other (:mod:`~remotedialer.ha.peering`), peers found in DNS
(:mod:`~remotedialer.ha.discovery`), readiness and graceful drain
(:mod:`~remotedialer.ha.lifecycle`).
"""
