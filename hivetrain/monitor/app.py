"""Putting the monitor together: join (or start) the run's DHT, poll it, serve the page; tear it all down."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import hivemind

from ..dht import make_dht, visible_addresses
from ..metrics import MetricsRecords
from ..options import LOOPBACK_MADDR
from .aggregate import MonitorOptions, RunMonitor, shard_lists_of
from .server import MonitorServer


@dataclass(frozen=True)
class Monitoring:
    """A running monitor: its DHT node, the poller, the HTTP server, and (own DHT only) the addresses
    training peers pass as `--initial-peer`."""

    dht: hivemind.DHT
    monitor: RunMonitor
    server: MonitorServer
    addresses: tuple[str, ...]


@contextlib.contextmanager
def monitoring(
    *,
    run_id: str,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = (LOOPBACK_MADDR,),
    host: str = "127.0.0.1",
    port: int = 8080,
    shards: str | None = None,
    tensorboard: str | os.PathLike | None = None,
    options: MonitorOptions | None = None,
) -> Iterator[Monitoring]:
    """Run a monitor of `run_id` until the block ends.

    With `initial_peers` the monitor joins the run in client mode (it dials out only and stores nothing
    for others). Without, it starts the run's DHT itself on `host_maddrs`, so it can be running before
    the first training peer, which then joins through `Monitoring.addresses`.

    Args:
        shards: a manifest (path or URL) whose shard names label the shard grid.
        tensorboard: a folder for TensorBoard event files of the aggregate curves.

    Raises:
        PeerError: no initial peer reachable (after retries), a malformed address.
        HivetrainError: the port is taken. ManifestError: an unreadable manifest.
    """
    shard_lists = []
    if shards is not None:
        from shardtool import manifest as manifest_io

        shard_lists = shard_lists_of(manifest_io.load(shards))
    with contextlib.ExitStack() as stack:
        dht = make_dht(
            initial_peers=initial_peers, host_maddrs=host_maddrs, client_mode=bool(initial_peers),
            run_id=run_id, schemas=[MetricsRecords],
        )  # fmt: skip
        stack.callback(dht.shutdown)
        listeners = []
        if tensorboard is not None:
            from .tensorboard import TensorBoardWriter

            writer = TensorBoardWriter(tensorboard)
            stack.callback(writer.close)
            listeners.append(writer)
        monitor = RunMonitor(
            dht,
            run_id=run_id,
            shard_lists=shard_lists,
            options=options or MonitorOptions(),
            listeners=listeners,
        )
        stack.callback(monitor.close)
        server = MonitorServer(monitor, host=host, port=port).start()
        stack.callback(server.stop)
        addresses = () if initial_peers else tuple(visible_addresses(dht))
        yield Monitoring(dht, monitor, server, addresses)
