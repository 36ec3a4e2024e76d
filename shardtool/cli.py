"""The `shardtool` command: build, inspect, serve and fetch WebDataset shards.

Each subcommand only parses options, calls the library, and reports; the work lives in the modules
named in the package docstring.
"""

from __future__ import annotations

import click

from . import __version__
from .cliutil import friendly_group, setup_logging, with_verbosity
from .errors import ShardtoolError


@click.group(cls=friendly_group(ShardtoolError), context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shardtool")
@with_verbosity
def cli(verbose: int, quiet: int) -> None:
    """Turn datasets into reproducible WebDataset shards and move them between peers, verified.

    \b
    Typical use:
      shardtool build ~/data/ILSVRC2012 --out shards/imagenet --workers 8
      shardtool serve shards/imagenet --port 8080
      shardtool fetch http://host:8080/manifest.json --out shards/imagenet --jobs 8
    """
    setup_logging(verbose, quiet)


# ---- build and inspect: build, synth, verify, info ----------------------------------------------


# ---- transport: serve, fetch, torrent, seed -----------------------------------------------------


def main() -> None:
    cli(prog_name="shardtool")


if __name__ == "__main__":
    main()
