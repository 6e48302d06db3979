"""WebSocket transports under a session (layer 2, see docs/contributing.rst):
the interface (:mod:`~remotedialer.transports.base`), the agent's
websocket-client end (:mod:`~remotedialer.transports.websocket_client`) and the
server's end taken over from a WSGI server (:mod:`~remotedialer.transports.wsgi`).
"""
