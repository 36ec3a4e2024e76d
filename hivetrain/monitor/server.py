"""The monitor's HTTP server: the page, `/api/state` (JSON) and `/metrics` (Prometheus text format).

Read-only: GET (and HEAD) on a fixed table of paths, nothing else. The page's three files are read
from the package once and served from memory (no path from a request ever reaches the file system).
Every response carries a strict Content-Security-Policy (scripts, styles and data from this origin
only, no inline code), `nosniff` and no framing, so even a peer name that slipped past the page's
text-only rendering could not run. `/metrics` is built by a prometheus-client collector from the
current snapshot at each scrape, in a registry of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..errors import HivetrainError
from ..metrics import MEASURES
from .aggregate import RunMonitor

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

STATIC = {
    "/": ("index.html", "text/html"),
    "/static/app.js": ("app.js", "text/javascript"),
    "/static/style.css": ("style.css", "text/css"),
}

PEER_GAUGES = (
    *((name, f.field_info.extra["gauge"], f.field_info.description) for name, f in MEASURES.items()),
    ("age_s", "hivetrain_peer_record_age_seconds", "Age of one peer's last metrics record."),
)
RUN_GAUGES = (
    ("peers", "hivetrain_peers", "Peers publishing metrics now."),
    ("samples_per_s", "hivetrain_samples_per_second", "Training samples per second of all live peers."),
    ("loss", "hivetrain_loss", "Mean training loss of the live peers."),
    ("lr", "hivetrain_learning_rate", "Learning rate of the most advanced peer."),
    ("global_step", "hivetrain_global_step", "Global optimizer step of the most advanced peer."),
    ("data_epoch", "hivetrain_data_epoch", "The run's current data epoch."),
    ("val_top1", "hivetrain_val_top1", "Latest validation top-1 accuracy (0-1)."),
    ("val_top5", "hivetrain_val_top5", "Latest validation top-5 accuracy (0-1)."),
)


class StateCollector:
    """A prometheus-client collector over a RunMonitor's snapshot (read at each scrape)."""

    def __init__(self, monitor: RunMonitor):
        self.monitor = monitor

    def collect(self) -> Iterator:
        state = self.monitor.state()
        totals = state["totals"]
        for field, name, doc in RUN_GAUGES:
            if totals.get(field) is not None:
                yield GaugeMetricFamily(name, doc, value=totals[field])
        by_state = GaugeMetricFamily("hivetrain_peers_by_state", "Peers by state.", labels=["state"])
        for status in ("live", "stale", "left"):
            by_state.add_metric([status], sum(p["state"] == status for p in state["peers"]))
        yield by_state
        up = GaugeMetricFamily(
            "hivetrain_peer_up", "1 while a peer publishes metrics.", labels=["peer", "name"]
        )
        families = {f: GaugeMetricFamily(n, d, labels=["peer", "name"]) for f, n, d in PEER_GAUGES}
        for peer in state["peers"]:
            labels = [peer["peer"], peer["name"]]
            up.add_metric(labels, 1.0 if peer["state"] == "live" else 0.0)
            for field, family in families.items():
                if peer.get(field) is not None:
                    family.add_metric(labels, peer[field])
        yield up
        yield from families.values()
        epoch = state["epoch"]
        if epoch is not None:
            shards = GaugeMetricFamily(
                "hivetrain_epoch_shards", "Shards of the current epoch by state.", labels=["state"]
            )
            for status in ("done", "claimed", "backup", "free"):
                shards.add_metric([status], epoch[status])
            yield shards
        refused = CounterMetricFamily(
            "hivetrain_refused_records",
            "Records from peers refused (forged, malformed, oversized).",
            labels=["reason"],
        )
        for reason, count in state["refused"].items():
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "hivetrain_dht_up",
            "1 while the monitor can read the DHT.",
            value=float(state["dht_error"] is None),
        )


class MonitorServer:
    """Serve a RunMonitor over HTTP from a background thread.

    >>> with MonitorServer(monitor, host="127.0.0.1", port=8080) as server:
    ...     print(server.url)
    """

    def __init__(self, monitor: RunMonitor, *, host: str = "127.0.0.1", port: int = 8080):
        self.monitor, self.host, self.port = monitor, host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(monitor))
        package = resources.files(__package__) / "static"
        self._files = {
            path: (package.joinpath(name).read_bytes(), kind) for path, (name, kind) in STATIC.items()
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    async def _static(self, request: web.Request) -> web.Response:
        body, kind = self._files[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8")

    async def _state(self, request: web.Request) -> web.Response:
        text = json.dumps(self.monitor.state(), allow_nan=False, separators=(",", ":"))
        return web.Response(text=text, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    @web.middleware
    async def _headers(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            response = e
        response.headers.update(SECURITY_HEADERS)
        return response

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            return socket.create_server((self.host, self.port), family=family)
        except OSError as e:
            raise HivetrainError(f"cannot listen on {self.host}:{self.port} ({e.strerror or e})") from None

    def start(self) -> MonitorServer:
        """Bind and serve in a daemon thread; returns when the server accepts connections."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        app = web.Application(middlewares=[self._headers])
        for path in STATIC:
            app.router.add_get(path, self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=log, shutdown_timeout=1.0)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
        self._thread = threading.Thread(target=self._loop.run_forever, name="monitor-server", daemon=True)
        self._thread.start()
        log.info("monitor of run %s at %s", self.monitor.run_id, self.url)
        return self

    def stop(self) -> None:
        """Close the listening socket and open connections, then end the thread."""
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            future.result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> MonitorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
