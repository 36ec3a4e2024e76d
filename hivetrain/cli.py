"""The `hivetrain` command: training peers (`run`) and the run's dashboard (`monitor`)."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from concurrent.futures import InvalidStateError

import click

from shardtool.cliutil import friendly_group, setup_logging, stop_on_signals, with_verbosity
from shardtool.errors import ShardtoolError

from . import __version__, options
from .errors import HivetrainError
from .options import LOOPBACK_MADDR


@click.group(
    cls=friendly_group(HivetrainError, ShardtoolError),
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="hivetrain")
@with_verbosity
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Decentralized training over shardtool shards: peers divide the data through the hivemind DHT."""
    setup_logging(verbose, quiet)
    ctx.obj = verbose


def _route_hivemind_logs(verbose: int) -> None:
    """hivemind's messages through our log format; its routine chatter and shutdown noise only with -v."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    # Failed averaging rounds and the like are routine in a swarm (peers come and go) and hivemind
    # recovers from them; hivetrain reports what matters to the user itself.
    levels = {0: logging.CRITICAL, 1: logging.WARNING, 2: logging.INFO}
    logging.getLogger("hivemind").setLevel(levels.get(verbose, logging.DEBUG))
    if not verbose:
        logging.getLogger("asyncio").addFilter(_routine_asyncio_record)
        # hivemind's futures that outlive their event loop at shutdown complain from __del__
        default_hook = sys.unraisablehook

        def quiet_shutdown(unraisable) -> None:
            if not (
                isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)
            ):
                default_hook(unraisable)

        sys.unraisablehook = quiet_shutdown
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")


def _routine_asyncio_record(record: logging.LogRecord) -> bool:
    """False for asyncio's complaints about hivemind's tasks that are harmless: tasks dropped at shutdown,
    and a round's task that finishes after the round was given up (it sets a cancelled future)."""
    if "Task was destroyed" in record.getMessage():
        return False
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, InvalidStateError) and "CANCELLED" in str(error))


@cli.command()
@options.click_options(options.TrainOptions, options.NetworkOptions, options.SyncOptions)
@click.pass_obj
def run(verbose: int, **values) -> None:
    """Train as one peer of a decentralized run: stream shards, average with peers, checkpoint.

    \b
    Start a run, then join it from other machines with the printed address:
      hivetrain run --shards http://host:8080/manifest.json --host-maddr /ip4/0.0.0.0/tcp/31337
      hivetrain run --shards http://host:8080/manifest.json --initial-peer /ip4/1.2.3.4/tcp/31337/p2p/Qm...
    Ctrl-C stops cleanly: the current shards go back to the run and latest.pt is saved.
    """
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)
    from .train import Peer

    _route_hivemind_logs(verbose)
    network = options.from_values(options.NetworkOptions, values)
    with Peer.open(
        options.from_values(options.TrainOptions, values),
        network,
        options.from_values(options.SyncOptions, values),
    ) as peer:
        if network.client_mode:
            click.echo("joined in client mode: this peer dials others and cannot be an --initial-peer")
        else:
            click.echo("other peers join this run with:")
            for address in peer.addresses:
                click.echo(f"  --initial-peer {address}")
        with stop_on_signals(peer.stop_event, message="stopping after this batch"):
            summary = peer.run()
    val = summary.val
    accuracy = f", val top-1 {100 * val['val_top1']:.2f}%, top-5 {100 * val['val_top5']:.2f}%" if val else ""
    click.echo(
        f"stopped at global step {summary.global_step}: {summary.local_steps} local steps, "
        f"{summary.samples} samples, {summary.shards_read} shards read{accuracy}"
        + (f"; {summary.skipped_steps} batches skipped (non-finite loss)" if summary.skipped_steps else "")
    )


@cli.command()
@click.option(
    "--initial-peer",
    "initial_peers",
    multiple=True,
    metavar="MADDR",
    help="Full multiaddr of a peer of the run; repeatable. None: start the run's DHT here.",
)
@click.option("--run-id", default="hivetrain", show_default=True, help="Name of the run to show.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address of the web page (0.0.0.0: all)."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port of the page."
)
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Also write the run's curves as TensorBoard event files here.",
)
@click.option("--shards", metavar="MANIFEST", help="The run's manifest, to name the shards in the grid.")
@click.option(
    "--host-maddr",
    "host_maddrs",
    multiple=True,
    metavar="MADDR",
    default=(LOOPBACK_MADDR,),
    show_default=True,
    help="Without --initial-peer: where the DHT listens.",
)
@click.pass_obj
def monitor(verbose: int, initial_peers, run_id, host, port, tensorboard, shards, host_maddrs) -> None:
    """Serve a live dashboard of a run: peers, samples/s, loss and accuracy, the epoch's shards.

    \b
    Join a run and open http://127.0.0.1:8080/ (also /api/state and /metrics for Prometheus):
      hivetrain monitor --run-id imagenet-r50 --initial-peer /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW...
    Without --initial-peer the monitor starts the run's DHT and prints the address peers join with.
    The monitor only reads; peers' names and addresses are shown as plain text.
    """
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)
    from .monitor.app import monitoring

    _route_hivemind_logs(verbose)
    stop = threading.Event()
    with monitoring(
        run_id=run_id,
        initial_peers=initial_peers,
        host_maddrs=host_maddrs,
        host=host,
        port=port,
        shards=shards,
        tensorboard=tensorboard,
    ) as running:
        click.echo(f"monitoring run {run_id} at {running.server.url}", nl=True)
        if running.addresses:
            click.echo("training peers join this run with:")
            for address in running.addresses:
                click.echo(f"  --initial-peer {address}")
        with stop_on_signals(stop):
            while not stop.wait(1.0):
                pass
    click.echo("monitor stopped")


def main() -> None:
    cli(prog_name="hivetrain")


if __name__ == "__main__":
    main()
