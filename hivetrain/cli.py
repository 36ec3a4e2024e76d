"""The `hivetrain` command: training peers (`run`) and the run's dashboard (`monitor`)."""

from __future__ import annotations

import logging
import signal
import threading
import warnings

import click

from shardtool.cliutil import friendly_group, setup_logging, with_verbosity
from shardtool.errors import ShardtoolError

from . import __version__
from . import recipe as recipes
from .errors import HivetrainError


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
    levels = {0: logging.CRITICAL, 1: logging.WARNING}
    logging.getLogger("hivemind").setLevel(levels.get(verbose, logging.INFO))
    if not verbose:
        logging.getLogger("asyncio").addFilter(lambda r: "Task was destroyed" not in r.getMessage())
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")


@cli.command()
@click.option(
    "--shards",
    required=True,
    metavar="MANIFEST",
    help="The run's manifest.json: a path, a folder holding it, or an http(s) URL.",
)
@click.option(
    "--run-id",
    default="hivetrain",
    show_default=True,
    help="Name of the run; every peer of one run uses the same.",
)
@click.option("--name", help="This peer's name on the monitor [host name].")
@click.option(
    "--initial-peer",
    "initial_peers",
    multiple=True,
    metavar="MADDR",
    help="Full multiaddr of a running peer (printed at its start); repeatable. None: start a run.",
)
@click.option(
    "--host-maddr",
    "host_maddrs",
    multiple=True,
    metavar="MADDR",
    help="Where to listen [/ip4/127.0.0.1/tcp/0]; /ip4/0.0.0.0/tcp/PORT for peers on other machines.",
)
@click.option(
    "--announce-maddr",
    "announce_maddrs",
    multiple=True,
    metavar="MADDR",
    help="The address others should dial (public IP and forwarded port).",
)
@click.option(
    "--client-mode", is_flag=True, help="For peers behind NAT: dial out only, accept no connections."
)
@click.option("--use-auto-relay", is_flag=True, help="Be reachable through relays when behind NAT.")
@click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Private key file that keeps this peer's id across restarts (created if missing).",
)
@click.option("--model", type=click.Choice(recipes.MODELS), help="[by dataset: resnet50 for ImageNet]")
@click.option("--batch", type=click.IntRange(min=1), help="Samples per local step [by dataset].")
@click.option("--lr", type=float, help="Peak learning rate [0.1 x global batch / 256].")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Training length in passes over the data: epochs x samples / global batch steps [by dataset].",
)
@click.option(
    "--target-global-bsz",
    type=click.IntRange(min=1),
    help="Samples across all peers per optimizer step [by dataset].",
)
@click.option("--image-size", type=click.IntRange(min=8), help="Training resolution [by dataset].")
@click.option(
    "--val-interval", type=click.IntRange(min=1), help="Validate every N global steps [once per data epoch]."
)
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop at this global step (short trials).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), help="Where latest.pt and best.pt go.")
@click.option("--resume-from", type=click.Path(), help="A checkpoint file or folder to continue from.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Initial weights from a local file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", is_flag=True, help="bfloat16 autocast (CUDA only).")
@click.option("--channels-last", is_flag=True, help="NHWC memory format (faster convolutions on GPUs).")
@click.option(
    "--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader processes."
)
@click.option(
    "--decode",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="JPEG decoding: PIL in the workers, or nvJPEG on the GPU.",
)
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), help="Where fetched shards go [LOG_DIR/cache]."
)
@click.option("--cache-limit", help="Evict least recently used shards beyond this size (e.g. 50GB).")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    default="logs",
    show_default=True,
    help="metrics.jsonl, shards.jsonl, maddrs.txt.",
)
@click.option("--mirror", "mirrors", multiple=True, metavar="URL", help="Extra HTTP base URL for shards.")
@click.option(
    "--via",
    type=click.Choice(["auto", "http", "torrent"]),
    default="auto",
    show_default=True,
    help="How missing shards are fetched.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds before an unrenewed shard claim passes to other peers.",
)
@click.option(
    "--matchmaking-time",
    type=click.FloatRange(min=0.5),
    default=15.0,
    show_default=True,
    help="Seconds to gather peers for each averaging round.",
)
@click.option(
    "--averaging-timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds before an averaging round is abandoned.",
)
@click.option("--seed", default=0, show_default=True, help="Shard order seed (the same on all peers).")
@click.pass_obj
def run(
    verbose: int,
    shards,
    run_id,
    name,
    initial_peers,
    host_maddrs,
    announce_maddrs,
    client_mode,
    use_auto_relay,
    identity,
    lease,
    matchmaking_time,
    averaging_timeout,
    cache_limit,
    **train,
) -> None:
    """Train as one peer of a decentralized run: stream shards, average with peers, checkpoint.

    \b
    Start a run, then join it from other machines with the printed address:
      hivetrain run --shards http://host:8080/manifest.json --host-maddr /ip4/0.0.0.0/tcp/31337
      hivetrain run --shards http://host:8080/manifest.json --initial-peer /ip4/1.2.3.4/tcp/31337/p2p/Qm...
    Ctrl-C stops cleanly: the current shards go back to the run and latest.pt is saved.
    """
    from shardtool.build import parse_size

    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)
    from .train import NetworkOptions, Peer, TrainOptions

    _route_hivemind_logs(verbose)

    network = NetworkOptions(
        run_id=run_id,
        name=name,
        initial_peers=initial_peers,
        host_maddrs=host_maddrs or NetworkOptions.host_maddrs,
        announce_maddrs=announce_maddrs,
        client_mode=client_mode,
        identity=identity,
        use_auto_relay=use_auto_relay,
        lease_s=lease,
        matchmaking_time=matchmaking_time,
        averaging_timeout=averaging_timeout,
    )
    options = TrainOptions(
        shards=shards,
        cache_limit=parse_size(cache_limit) if cache_limit else None,
        mirrors=tuple(train.pop("mirrors")),
        **train,
    )
    with Peer(options, network) as peer, _stop_on_signals(peer.stop_event):
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
    help="Without --initial-peer: where the DHT listens [/ip4/127.0.0.1/tcp/0].",
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
        host_maddrs=host_maddrs or ("/ip4/127.0.0.1/tcp/0",),
        host=host,
        port=port,
        shards=shards,
        tensorboard=tensorboard,
    ) as running:
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            click.echo(f"monitoring run {run_id} at {running.server.url}", nl=True)
            if running.addresses:
                click.echo("training peers join this run with:")
                for address in running.addresses:
                    click.echo(f"  --initial-peer {address}")
            while not stop.wait(1.0):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    click.echo("monitor stopped")


class _stop_on_signals:
    """SIGINT/SIGTERM set `event` (a clean stop); a second one stops at once."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        click.echo(
            f"{signal.Signals(signum).name}: stopping after this batch (again to stop at once)", err=True
        )
        self.event.set()

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def main() -> None:
    cli(prog_name="hivetrain")


if __name__ == "__main__":
    main()
