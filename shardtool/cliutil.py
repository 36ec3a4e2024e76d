"""What both command-line tools share: logging set-up and turning user errors into one line."""

from __future__ import annotations

import logging
import sys

import click


class FriendlyGroup(click.Group):
    """A click group that prints `error_types` as one line on stderr (exit 1), never a traceback."""

    error_types: tuple[type[BaseException], ...] = ()

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except self.error_types as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def friendly_group(*error_types: type[BaseException]) -> type[FriendlyGroup]:
    """A FriendlyGroup subclass that reports the given exception types as user errors."""
    return type("Group", (FriendlyGroup,), {"error_types": tuple(error_types)})


def setup_logging(verbose: int, quiet: int) -> None:
    """-v: debug, -q: warnings only; the default shows progress-worthy info."""
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(
        level=max(logging.DEBUG, min(level, logging.ERROR)),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if level > logging.DEBUG:
        for noisy in ("httpx", "httpcore", "hivemind", "asyncio", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, level))


verbosity_options = [
    click.option("-v", "--verbose", count=True, help="More log output (repeat for more)."),
    click.option("-q", "--quiet", count=True, help="Less log output."),
]


def with_verbosity(f):
    """Decorate a group callback with -v/-q."""
    for option in reversed(verbosity_options):
        f = option(f)
    return f
