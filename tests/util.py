"""Helpers shared by the tests: free ports, waiting with a deadline, child processes that never leak."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def cli(
    tool: str, *args: str, check: bool = False, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    """Run `shardtool`/`hivetrain` from this venv as a user would; capture text output."""
    proc = subprocess.run(
        [str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


class Children:
    """Starts background processes in their own process groups and kills every one at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen([str(a) for a in args], **kw)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            # The whole group, even when its leader is gone: its children (DHT daemons, loader
            # workers) may still be running.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@contextlib.contextmanager
def loopback_dhts(count: int):
    """`count` hivemind DHTs on 127.0.0.1, each with its own signing key, bootstrapped from the first;
    shut down on exit. (hivemind is imported here, not at the top: most tests never need it.)"""
    from hivemind.utils.crypto import RSAPrivateKey

    from hivetrain.dht import make_dht, visible_addresses

    nodes = [make_dht(private_key=RSAPrivateKey())]
    try:
        for _ in range(count - 1):
            nodes.append(make_dht(private_key=RSAPrivateKey(), initial_peers=visible_addresses(nodes[0])))
        yield nodes
    finally:
        for dht in nodes:
            dht.shutdown()
