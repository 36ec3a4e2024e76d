"""The `hivetrain` command: training peers (`run`) and the run's dashboard (`monitor`)."""

from __future__ import annotations

import click

from shardtool.cliutil import friendly_group, setup_logging, with_verbosity
from shardtool.errors import ShardtoolError

from . import __version__
from .errors import HivetrainError


@click.group(
    cls=friendly_group(HivetrainError, ShardtoolError),
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="hivetrain")
@with_verbosity
def cli(verbose: int, quiet: int) -> None:
    """Decentralized training over shardtool shards: peers divide the data through the hivemind DHT."""
    setup_logging(verbose, quiet)


def main() -> None:
    cli(prog_name="hivetrain")


if __name__ == "__main__":
    main()
