"""Integrations of tunneled connections with HTTP client libraries.

* :mod:`remotedialer.integrations.requests`: a ``requests`` transport adapter
  (:class:`~remotedialer.integrations.requests.TunnelAdapter`) and an opt-in
  monkeypatch (:func:`~remotedialer.integrations.requests.patch_requests`).

Each submodule imports its HTTP library only when it is imported itself.
"""
