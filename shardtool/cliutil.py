"""What both command-line tools share: logging set-up and turning user errors into one line."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator

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


class Size(click.ParamType):
    """A size such as 256MB, 1GiB or 4096 (bytes), parsed by `shardtool.build.parse_size`."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from .build import parse_size
        from .errors import ShardtoolError

        try:
            return parse_size(value)
        except ShardtoolError as e:
            self.fail(str(e), param, ctx)


SIZE = Size()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_signals(handler: Callable[[int], None], signals=STOP_SIGNALS) -> Iterator[None]:
    """Call `handler(signum)` on `signals` while the block runs; the previous handlers come back after."""
    previous = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stop_on_signals(event: threading.Event, *, message: str | None = None, signals=STOP_SIGNALS):
    """Ctrl-C or SIGTERM sets `event` (a clean stop, announced with `message` if given); a second one
    raises KeyboardInterrupt, which stops at once."""

    def handler(signum: int) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        if message:
            click.echo(f"{signal.Signals(signum).name}: {message} (again to stop at once)", err=True)
        event.set()

    return on_signals(handler, signals)


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
