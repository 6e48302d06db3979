"""Integrations of tunneled connections with HTTP client libraries.

* :mod:`remotedialer.integrations.requests`: a ``requests`` transport adapter
  (:class:`~remotedialer.integrations.requests.TunnelAdapter`), a urllib3 pool
  manager, and an opt-in monkeypatch
  (:func:`~remotedialer.integrations.requests.patch_requests`);
* :mod:`remotedialer.integrations.httpcore`: an ``httpcore`` network backend
  (:class:`~remotedialer.integrations.httpcore.TunnelBackend`; needs the
  ``httpcore`` extra);
* :mod:`remotedialer.integrations.httpx`: an ``httpx`` transport
  (:class:`~remotedialer.integrations.httpx.TunnelTransport`; needs the
  ``httpx`` extra).

Each submodule imports its HTTP library only when it is imported itself.
"""
