"""`hivetrain monitor`: a live view of a decentralized run, read from the run's own DHT.

Every training peer publishes a small signed metrics record (`hivetrain.metrics.MetricsPublisher`);
the monitor joins the DHT (client mode), reads those records and the shard leases, and serves them.

    aggregate.py    RunMonitor: polls the DHT, keeps peers, the current epoch's shard grid and a bounded
                    history; one JSON-ready snapshot
    refusals.py     counts the records the DHT node refuses (forged, malformed, oversized)
    server.py       MonitorServer (aiohttp): the page, /api/state, /metrics (prometheus-client)
    tensorboard.py  TensorBoardWriter: event files of the aggregate curves
    static/         the page: plain HTML, JS and CSS (no build step, no external resources)
"""

from .aggregate import MonitorOptions, RunMonitor, shard_lists_of
from .server import MonitorServer

__all__ = ["MonitorOptions", "MonitorServer", "RunMonitor", "shard_lists_of"]
