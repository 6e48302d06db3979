"""Loopback fixtures shared by the test suite and the benchmarks (not
installed with the package): the test suite never imports ``benchmarks``,
and the benchmarks never import ``tests``, so what both need lives here.

* :mod:`testkit.connect_proxy`: a forward proxy on loopback (HTTP CONNECT,
  SOCKS5, optionally TLS) that may want credentials or refuse;
* :mod:`testkit.dns`: a DNS server on loopback whose answers change while it
  runs (the cluster DNS of a headless Service);
* :mod:`testkit.fleet`: many lightweight agents (tunnels) from one process;
* :mod:`testkit.metrics`: metrics with many client keys.
"""
