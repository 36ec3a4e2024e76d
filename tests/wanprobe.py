"""Measuring a WanLab's links before trusting them: bulk TCP each way, and TCP-connect round trips.

All peers are measured at once (their links are independent; the hub has no limit), each against a
listener of its own in the hub namespace: first five connects (a connect takes one round trip), then a
bulk transfer up and one down. Slow start is left out: only the `seconds` after a warm-up of 0.25 s +
4 RTT count, as the slope fitted to the payload the receiving kernel got (see `_payload_in`). A link's
rate counts IP bytes, so a full link reads ~3.5% below it (52 header bytes per 1500-byte packet).
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass

_CONNECTS = 5
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Figure:
    """One measured quantity next to what was asked."""

    what: str
    asked: float
    got: float

    def off_by(self, tolerance: float) -> bool:
        if self.asked < 1.0:  # no latency asked: allow the forwarder's own milliseconds
            return self.got - self.asked > 2.0
        return abs(self.got / self.asked - 1) > tolerance


@dataclass(frozen=True)
class PeerFigures:
    peer: int
    address: str
    up_mbit: Figure
    down_mbit: Figure
    rtt_ms: Figure


@dataclass(frozen=True)
class CheckResult:
    """What `WanLab.check` measured, and what the forwarder cost meanwhile."""

    peers: list[PeerFigures]
    pair_rtt_ms: Figure | None
    """Peer 0 to peer 1 (both links' RTTs), when there are two peers or more."""
    wall_s: float
    forwarder_cpu_s: float
    packets: int
    queue_drops: int

    @property
    def forwarder_cpu(self) -> float:
        """The forwarder's CPU time over the measurement, as a fraction of one core."""
        return self.forwarder_cpu_s / self.wall_s

    def figures(self) -> list[Figure]:
        rows = [f for p in self.peers for f in (p.up_mbit, p.down_mbit, p.rtt_ms)]
        return rows + ([self.pair_rtt_ms] if self.pair_rtt_ms else [])

    def problems(self, tolerance: float) -> list[str]:
        """One line per figure more than `tolerance` (a fraction) off what was asked."""
        return [
            f"{f.what}: asked {f.asked:g}, got {f.got:.1f}" for f in self.figures() if f.off_by(tolerance)
        ]

    def table(self) -> str:
        lines = [
            f"emulated links, {len(self.peers)} peers (Mbit/s of TCP payload: a full link is ~3.5% under its IP rate)",
            f"{'peer':<6}{'address':<14}{'upload Mbit/s':>16}{'download Mbit/s':>18}{'RTT to hub ms':>18}",
            f"{'':<20}" + f"{'asked':>9}{'got':>7}" + f"{'asked':>11}{'got':>7}" + f"{'asked':>11}{'got':>7}",
        ]
        for p in self.peers:
            lines.append(
                f"{p.peer:<6}{p.address:<14}"
                f"{p.up_mbit.asked:>9.1f}{p.up_mbit.got:>7.1f}"
                f"{p.down_mbit.asked:>11.1f}{p.down_mbit.got:>7.1f}"
                f"{p.rtt_ms.asked:>11.1f}{p.rtt_ms.got:>7.1f}"
            )
        if self.pair_rtt_ms:
            lines.append(
                f"peer 0 <-> peer 1 RTT: asked {self.pair_rtt_ms.asked:.1f} ms, got {self.pair_rtt_ms.got:.1f} ms"
            )
        lines.append(
            f"forwarder: {self.forwarder_cpu:.1%} of one core over {self.wall_s:.1f} s "
            f"({self.packets} packets, {self.queue_drops} dropped at full link queues)"
        )
        return "\n".join(lines)


def measure(lab, *, hub: str, seconds: float) -> CheckResult:
    """Measure every peer of `lab` (a running WanLab) against the hub, all at once."""
    before, start = lab.forwarder_stats(), time.monotonic()
    figures: list[PeerFigures | None] = [None] * lab.peers
    errors: list[str] = []

    def run(peer: int) -> None:
        try:
            figures[peer] = _measure_peer(lab, peer, hub=hub, seconds=seconds)
        except OSError as e:
            errors.append(f"peer {peer}: {e}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(lab.peers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise OSError("link measurement failed: " + "; ".join(errors))
    pair = None
    if lab.peers >= 2:
        pair = Figure("peer 0 <-> peer 1 RTT ms", lab.expected_rtt_ms(0, 1), _rtt_ms(lab, 0, 1))
    after, wall = lab.forwarder_stats(), time.monotonic() - start

    def total(stats: dict, key: str) -> int:
        return sum(port[key] for port in stats["ports"].values())

    return CheckResult(
        peers=figures,
        pair_rtt_ms=pair,
        wall_s=wall,
        forwarder_cpu_s=after["cpu_s"] - before["cpu_s"],
        packets=total(after, "sent") - total(before, "sent"),
        queue_drops=total(after, "queue_drops") - total(before, "queue_drops"),
    )


def _measure_peer(lab, peer: int, *, hub: str, seconds: float) -> PeerFigures:
    asked = lab.links[peer]
    rtt = _rtt_ms(lab, peer, hub)
    warmup = 0.25 + 4 * max(rtt, asked.rtt_ms) / 1000
    up = _goodput_mbit(lab, peer, hub, upload=True, warmup=warmup, seconds=seconds)
    down = _goodput_mbit(lab, peer, hub, upload=False, warmup=warmup, seconds=seconds)
    return PeerFigures(
        peer,
        lab.address(peer),
        Figure(f"peer {peer} upload Mbit/s", asked.up_mbit, up),
        Figure(f"peer {peer} download Mbit/s", asked.down_mbit, down),
        Figure(f"peer {peer} RTT ms", asked.rtt_ms, rtt),
    )


def _listener(lab, where) -> socket.socket:
    with lab.inside(where):
        return socket.create_server((lab.address(where), 0))


def _rtt_ms(lab, client, server) -> float:
    """Median time of TCP connects from `client` to a listener in `server` (one round trip each)."""
    times = []
    with _listener(lab, server) as listener:
        for _ in range(_CONNECTS):
            with lab.inside(client):
                begin = time.perf_counter()
                conn = socket.create_connection(listener.getsockname(), timeout=10)
                times.append((time.perf_counter() - begin) * 1000)
            conn.close()
            listener.accept()[0].close()
    return statistics.median(times)


def _goodput_mbit(lab, peer: int, hub: str, *, upload: bool, warmup: float, seconds: float) -> float:
    with _listener(lab, hub) as listener:
        with lab.inside(peer):
            client = socket.create_connection(listener.getsockname(), timeout=10)
        server = listener.accept()[0]
    with client, server:
        sender, receiver = (client, server) if upload else (server, client)
        return _bulk(sender, receiver, warmup=warmup, seconds=seconds)


def _bulk(sender: socket.socket, receiver: socket.socket, *, warmup: float, seconds: float) -> float:
    """Send as fast as TCP allows; Mbit/s of payload arriving over `seconds` after `warmup`, fitted."""
    done = threading.Event()

    def pump() -> None:
        chunk = bytes(_CHUNK)
        with contextlib.suppress(OSError):  # the receiver's close resets the connection
            while not done.is_set():
                sender.sendall(chunk)

    sender.settimeout(30)
    receiver.settimeout(30)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    buffer = bytearray(_CHUNK)
    if not receiver.recv_into(buffer):
        raise OSError("the bulk transfer ended before its first byte")
    start = time.monotonic() + warmup
    times: list[float] = []
    arrived: list[int] = []
    while not times or times[-1] - times[0] < seconds:
        if not receiver.recv_into(buffer):
            raise OSError("the bulk transfer ended early")
        if time.monotonic() >= start:
            arrived.append(_payload_in(receiver))
            times.append(time.monotonic())
    done.set()
    receiver.close()
    thread.join(timeout=30)
    # the slope of all samples: a moment's lag of this thread or of the forwarder (a busy machine)
    # moves a window's end points but hardly the fitted rate
    return statistics.linear_regression(times, arrived).slope * 8 / 1e6


def _payload_in(sock: socket.socket) -> int:
    """Payload bytes the kernel has received on `sock`: data segments x MSS (struct tcp_info's
    tcpi_data_segs_in and tcpi_rcv_mss). Unlike the bytes read, this counts segments that arrive
    after a loss while the stream waits for the retransmission, so a recovery cannot skew a window."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return struct.unpack_from("I", info, 152)[0] * struct.unpack_from("I", info, 20)[0]
