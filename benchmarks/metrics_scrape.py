"""CPU time of one ``/metrics`` scrape with N client keys (issue 12's "/metrics
scrape" figure), in one process: the server's metrics state is built with
``testkit.metrics.metrics_with_clients`` (each key: one session, one DATA
message, i.e. 7 samples), then each way of rendering it runs ``--runs``
times and prints the median and range of the CPU seconds of the rendering
thread (``time.thread_time``, robust on a loaded machine).

``python -m benchmarks.metrics_scrape [--keys 1000,3000,10000] [--runs 5] [--profile] [--live N]``

Three scrapes: the Prometheus text format, OpenMetrics, and as a Prometheus
3 server asks (OpenMetrics preferred, gzip), each through the endpoint of
:func:`remotedialer.metrics.make_wsgi_app` and through
``prometheus_client.make_wsgi_app`` (what the endpoint was before it wrote
the per-client families itself), alternating in the same run.

``--live N`` also scrapes a real ``remotedialer server`` holding N tunnels
(``testkit.fleet`` agents) over HTTP, as Prometheus asks: wall seconds and
the server's CPU seconds (all its threads, so the agents' pings are in it),
for the endpoint and for prometheus_client's rendering of the same registry
(a ``name[]`` query naming every series, which the endpoint hands to
prometheus_client's app).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from testkit.metrics import metrics_with_clients

__all__ = ["PROMETHEUS_SCRAPE", "SCRAPES", "scrape_cpu_seconds", "main"]

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)
"""The Accept header of a Prometheus 3 scrape (default scrape protocols)."""

SCRAPES: Dict[str, Dict[str, str]] = {
    "text format": {},
    "OpenMetrics": {"HTTP_ACCEPT": "application/openmetrics-text; version=1.0.0"},
    "as Prometheus asks (gzip)": {"HTTP_ACCEPT": PROMETHEUS_ACCEPT, "HTTP_ACCEPT_ENCODING": "gzip"},
}
"""The scrapes measured: name -> request headers (WSGI environ keys)."""

PROMETHEUS_SCRAPE = "remotedialer: as Prometheus asks (gzip)"
"""The figure of :func:`scrape_cpu_seconds` that the agents workload reports."""


def _endpoint_scrape(app: Any, headers: Dict[str, str]) -> Callable[[], bytes]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "", **headers}

    def scrape() -> bytes:
        statuses: List[str] = []
        body = b"".join(app(dict(environ), lambda status, _headers: statuses.append(status)))
        if statuses != ["200 OK"]:
            raise RuntimeError(f"/metrics answered {statuses}")
        return body

    return scrape


def scrape_cpu_seconds(keys: int, runs: int) -> Dict[str, List[float]]:
    """CPU seconds of each scrape of ``/metrics`` with ``keys`` client keys,
    through remotedialer's endpoint ("remotedialer: " and the name in
    :data:`SCRAPES`) and through ``prometheus_client.make_wsgi_app``
    ("prometheus_client: ...", which builds a ``Sample`` a series: the
    endpoint before it wrote rows itself): name -> one figure per run."""
    import prometheus_client

    from remotedialer.metrics import make_wsgi_app

    registry, sessions = metrics_with_clients(keys)
    ours, theirs = make_wsgi_app(registry), prometheus_client.make_wsgi_app(registry)
    ways: List[Tuple[str, Callable[[], bytes]]] = []
    for name, headers in SCRAPES.items():
        ways.append((f"prometheus_client: {name}", _endpoint_scrape(theirs, headers)))
        ways.append((f"remotedialer: {name}", _endpoint_scrape(ours, headers)))
    figures: Dict[str, List[float]] = {name: [] for name, _ in ways}
    for _ in range(runs):
        for name, scrape in ways:
            started = time.thread_time()
            scrape()
            figures[name].append(time.thread_time() - started)
    del sessions
    return figures


def _get(port: int, query: str) -> Tuple[float, bytes]:
    """GET /metrics as Prometheus asks: (wall seconds, the body unzipped)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        started = time.monotonic()
        conn.request("GET", "/metrics" + query, headers={
            "Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
        response = conn.getresponse()
        body = response.read()
        wall = time.monotonic() - started
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"/metrics answered {response.status}")
    return wall, gzip.decompress(body)


def live_scrape_seconds(agents: int, runs: int) -> Dict[str, List[Tuple[float, float]]]:
    """Scrape a ``remotedialer server`` holding ``agents`` tunnels: scrape name
    -> (wall seconds, server CPU seconds) per run. Blocks for a minute or
    more; raises ``BenchError`` when the tunnels do not open."""
    from remotedialer.server.process import raise_open_files_limit

    from .procs import FleetProc, Proc, free_port

    raise_open_files_limit()
    figures: Dict[str, List[Tuple[float, float]]] = {"prometheus_client (name[])": [], "remotedialer": []}
    with tempfile.TemporaryDirectory(prefix="remotedialer-metrics-") as log_dir:
        port = free_port()
        server = Proc.remotedialer("server", ["server", "--listen", f"127.0.0.1:{port}"], log_dir)
        fleet: Optional[FleetProc] = None
        try:
            server.wait_for_log(r"listening on http://127\.0\.0\.1:")
            fleet = FleetProc(port, agents, log_dir)
            fleet.wait_opened(timeout=60 + agents / 50)
            _, body = _get(port, "")
            names = sorted({line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()
                            if line and not line.startswith("#")})
            everything = "?" + "&".join(f"name[]={name}" for name in names)
            for _ in range(runs):
                for name, query in (("prometheus_client (name[])", everything), ("remotedialer", "")):
                    cpu = server.stats().cpu_seconds
                    wall, _ = _get(port, query)
                    figures[name].append((wall, server.stats().cpu_seconds - cpu))
        finally:
            if fleet is not None:
                fleet.stop()
            server.stop(timeout=30)
    return figures


def _profile(keys: int) -> None:
    import cProfile
    import pstats

    from remotedialer.metrics import make_wsgi_app

    registry, sessions = metrics_with_clients(keys)
    for name, headers in SCRAPES.items():
        scrape = _endpoint_scrape(make_wsgi_app(registry), headers)
        profiler = cProfile.Profile()
        profiler.runcall(scrape)
        print(f"--- profile: remotedialer: {name}, {keys} keys")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
    del sessions


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_scrape",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="1000,3000,10000", help="client key counts (comma-separated)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each endpoint scrape")
    parser.add_argument("--live", type=int, default=0, metavar="N",
                        help="also scrape a real server holding N tunnels")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.keys.split(",") if part.strip()]
    for keys in counts:
        for name, seconds in scrape_cpu_seconds(keys, args.runs).items():
            print(f"{keys:>6} keys  {name:<44} CPU s median {statistics.median(seconds):.3f} "
                  f"[{min(seconds):.3f}-{max(seconds):.3f}] ({len(seconds)} runs)", flush=True)
    if args.profile:
        _profile(max(counts))
    if args.live:
        for name, pairs in live_scrape_seconds(args.live, args.runs).items():
            walls, cpus = [wall for wall, _ in pairs], [cpu for _, cpu in pairs]
            print(f"{args.live:>6} tunnels, live server, {name:<28} "
                  f"wall s median {statistics.median(walls):.3f} "
                  f"[{min(walls):.3f}-{max(walls):.3f}], server CPU s median {statistics.median(cpus):.3f} "
                  f"[{min(cpus):.3f}-{max(cpus):.3f}] ({len(pairs)} runs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
