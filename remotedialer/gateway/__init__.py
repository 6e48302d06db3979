"""The example server's HTTP gateway: ``/client/<id>/<scheme>/<host>/...``
requests sent on through a client's tunnel.

* :mod:`~remotedialer.gateway.http1`: HTTP/1.1 rules of both directions, sans-IO;
* :mod:`~remotedialer.gateway.upstream`: the HTTP/1.1 client and connection
  pool through the tunnel;
* :mod:`~remotedialer.gateway.forwarder_app`: the WSGI app (:class:`Forwarder`);
* :mod:`~remotedialer.gateway.frontend`: the keep-alive HTTP/1.1 front end and
  the bounded threaded server;
* :mod:`~remotedialer.gateway.proxy`: the proxy front end (HTTP CONNECT,
  absolute-form HTTP and SOCKS5 on one port), its handshakes sans-IO in
  :mod:`~remotedialer.gateway.proxy_handshake`.
"""
