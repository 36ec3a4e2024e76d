"""Bytes a peer sends and receives, measured where they leave: the kernel's TCP counters of its p2p daemon.

Everything a hivemind peer exchanges (DHT records, averaging rounds, state downloads) goes through the one
`p2pd` process its DHT started, over TCP. The kernel keeps per-socket byte counts (`tcp_info`:
bytes_sent, bytes_received) that iproute2's `ss` reports with the owning process; summing them over the
daemon's sockets, and keeping the last count of sockets that have closed, gives the peer's traffic as
sent, retransmissions and headers of the payload included, never an estimate from tensor sizes.
(hivemind exposes no byte counters, and libp2p's metrics endpoint carries none for plain connections.)

    meter = P2PTraffic.of(dht)      # None where `ss` is missing: traffic is then not reported
    meter.totals()                  # Traffic(sent=..., received=...) since the meter started
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass

import hivemind

log = logging.getLogger(__name__)

_SOCKET = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s+users:\(\(.*?pid=(\d+),")
_BYTES = re.compile(r"\bbytes_(sent|received):(\d+)")


@dataclass(frozen=True)
class Traffic:
    """Bytes sent and received (TCP payload, retransmissions included)."""

    sent: int = 0
    received: int = 0


def parse_ss(text: str, pid: int) -> dict[tuple[str, str], Traffic]:
    """Per socket (local, remote address) of process `pid`, its counters in `ss -tinpH` output."""
    sockets: dict[tuple[str, str], Traffic] = {}
    current: tuple[str, str] | None = None
    for line in text.splitlines():
        if not line[:1].isspace():
            match = _SOCKET.match(line)
            current = (match.group(1), match.group(2)) if match and int(match.group(3)) == pid else None
        elif current is not None:
            counts = dict((k, int(v)) for k, v in _BYTES.findall(line))
            sockets[current] = Traffic(counts.get("sent", 0), counts.get("received", 0))
            current = None
    return sockets


class P2PTraffic:
    """Totals of one process's TCP sockets, sampled every `interval_s` from a background thread."""

    def __init__(self, pid: int, *, interval_s: float = 2.0, ss: str = "ss"):
        self.pid, self._interval_s, self._ss = pid, interval_s, ss
        self._open: dict[tuple[str, str], Traffic] = {}
        self._closed = Traffic()
        self._base: Traffic | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name=f"P2PTraffic({pid})", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, dht: hivemind.DHT, **kwargs) -> P2PTraffic | None:
        """A meter of the DHT's p2p daemon, or None (with a log line) where it cannot be read."""
        ss = shutil.which("ss") or shutil.which("ss", path="/usr/sbin:/sbin")
        if ss is None:
            log.info("`ss` (Debian package iproute2) is not installed: bytes sent and received go unreported")
            return None
        try:
            pid = dht.run_coroutine(_daemon_pid)
        except Exception as e:  # a DHT without a local daemon (or a hivemind of another shape)
            log.info("cannot find this peer's p2p daemon (%r): bytes sent and received go unreported", e)
            return None
        return cls(pid, ss=ss, **kwargs)

    def sample(self) -> None:
        try:
            out = subprocess.run([self._ss, "-tinpH"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("ss failed: %r", e)
            return
        now = parse_ss(out, self.pid)
        with self._lock:
            gone = [t for key, t in self._open.items() if key not in now]
            self._closed = Traffic(
                self._closed.sent + sum(t.sent for t in gone),
                self._closed.received + sum(t.received for t in gone),
            )
            self._open = now
            if self._base is None:
                self._base = self._sum()

    def _sum(self) -> Traffic:
        return Traffic(
            self._closed.sent + sum(t.sent for t in self._open.values()),
            self._closed.received + sum(t.received for t in self._open.values()),
        )

    def totals(self) -> Traffic:
        """Bytes sent and received since the meter started (as of the last sample)."""
        with self._lock:
            now, base = self._sum(), self._base or Traffic()
            return Traffic(now.sent - base.sent, now.received - base.received)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()


async def _daemon_pid(_dht: hivemind.DHT, node) -> int:
    # hivemind keeps the daemon's process private (hivemind is pinned, ==1.1.12, in pyproject)
    return node.p2p._child.pid
