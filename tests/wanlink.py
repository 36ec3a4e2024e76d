"""The forwarder behind tests/wanlab.py: one process that is every emulated peer's internet link.

It owns one TUN device per peer (moved into the peer's network namespace by the lab) and one for the
hub namespace (the internet core, where shared servers run). Every IPv4 packet a peer sends is read
here, passes the peer's uplink, waits out the one-way delays of both ends, passes the receiver's
downlink, and is written into the receiver's TUN device:

    peer i --uplink(rate, queue)--> delay_i --> [core] --> delay_j --downlink(rate, queue)--> peer j

So latency applies per packet in both directions (ACKs too: the bandwidth-delay product is real), a
link's queue fills and tail-drops as a modem's does, and a cut link silently drops everything, which
TCP sees as it would on the internet (stalls and retransmissions, no local error).

Written by hand because nothing installable does this here: the kernel has no `netem` (nor `fq`, whose
departure times could delay packets), so `tc` can shape rate but not add latency; `tcconfig`, comcast,
pumba and mininet drive netem; toxiproxy (not packaged by Debian) is a TCP-terminating proxy, so ACKs
are not delayed; trickle (Debian) caps bandwidth per process with LD_PRELOAD and adds no latency;
mahimahi (a TUN-based emulator of one client behind NAT) is not in Debian 12. The kernel's NFQUEUE
could hold packets for a userspace delay too, but that needs iptables and libnetfilter_queue bindings
for the same per-packet Python work. Both directions are shaped here rather than with `tc tbf` on the
TUN devices because a TUN device's egress is only the upload: what the forwarder writes into it arrives
as received traffic, which no qdisc on this kernel shapes without an `ifb` detour, and one model for
both directions keeps the rate, the queue and the cut in one place.

Protocol: the JSON configuration is the only argument; the process prints `ready` once its devices
exist, then answers lines on stdin (`cut I`, `restore I`, `stats`) with one line each, and exits when
stdin closes (its devices vanish with it). Standard library only: it runs as a plain script.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import json
import os
import select
import struct
import sys
import time
from dataclasses import dataclass, field

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_EARLY_S = 0.0005
"""Packets due this soon go out now: epoll sleeps in whole milliseconds, so this centres the error."""
_BURST = 64
"""Packets read from one device per wake-up, so that one busy peer cannot starve the others."""

_DOWNLINK, _DELIVER = 0, 1


@dataclass
class Link:
    """One direction of an access link: a FIFO sending at `rate_bps` that drops a packet arriving to
    more than `queue_s` of backlog. Pure (times are passed in), so it is tested without namespaces."""

    rate_bps: float
    queue_s: float
    free_at: float = field(default=0.0, init=False)
    """When the link finishes sending what it holds."""

    def send(self, now: float, size: int) -> float | None:
        """When a `size`-byte packet arriving at `now` has left the link, or None if it is dropped."""
        start = max(now, self.free_at)
        if start - now > self.queue_s:
            return None
        self.free_at = start + size * 8 / self.rate_bps
        return self.free_at


@dataclass
class Port:
    """A TUN device and what sits behind it: a peer's links and one-way delay, or the hub (no limits)."""

    name: str
    address: bytes
    delay_s: float = 0.0
    up: Link | None = None
    down: Link | None = None
    fd: int = -1
    cut: bool = False
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("sent", "queue_drops", "cut_drops"), 0)
    )


def open_tun(name: str) -> int:
    """A non-blocking TUN device (IP packets, no extra header) that lives as long as the descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


class Forwarder:
    """Moves packets between ports through the link model, each at its due time (a heap of events)."""

    def __init__(self, ports: list[Port]):
        self.ports = ports
        self.by_address = {p.address: i for i, p in enumerate(ports)}
        self.events: list[tuple] = []
        self.seq = itertools.count()
        self.other_drops = 0

    def receive(self, src: int, packet: bytes, now: float) -> None:
        """A packet read from port `src`: through its uplink and delay, towards its destination."""
        dst = self.by_address.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
        if dst is None or dst == src:
            self.other_drops += 1
            return
        sender, receiver = self.ports[src], self.ports[dst]
        if sender.cut or receiver.cut:
            sender.counts["cut_drops"] += 1
            return
        due = now
        if sender.up is not None:
            due = sender.up.send(now, len(packet))
            if due is None:
                sender.counts["queue_drops"] += 1
                return
        due += sender.delay_s + receiver.delay_s
        stage = _DELIVER if receiver.down is None else _DOWNLINK
        heapq.heappush(self.events, (due, next(self.seq), stage, src, dst, packet))

    def run_due(self, now: float) -> None:
        """Process every event due by `now`, in time order (a downlink hop uses its exact arrival time)."""
        events = self.events
        while events and events[0][0] <= now + _EARLY_S:
            due, _, stage, src, dst, packet = heapq.heappop(events)
            receiver = self.ports[dst]
            if receiver.cut or self.ports[src].cut:
                receiver.counts["cut_drops"] += 1
            elif stage == _DOWNLINK:
                left = receiver.down.send(due, len(packet))
                if left is None:
                    receiver.counts["queue_drops"] += 1
                else:
                    heapq.heappush(events, (left, next(self.seq), _DELIVER, src, dst, packet))
            else:
                try:
                    os.write(receiver.fd, packet)
                    self.ports[src].counts["sent"] += 1
                except OSError:
                    self.other_drops += 1

    def timeout(self) -> float:
        """Seconds epoll may sleep before the next event is due (-1: until a packet comes)."""
        if not self.events:
            return -1
        return max(0.0, self.events[0][0] - _EARLY_S - time.monotonic())

    def command(self, line: str) -> str:
        """Answer one control line: `cut I`, `restore I` or `stats`."""
        verb, *args = line.split()
        if (
            verb in ("cut", "restore")
            and len(args) == 1
            and args[0].isdigit()
            and int(args[0]) < len(self.ports)
        ):
            port = self.ports[int(args[0])]
            port.cut = verb == "cut"
            for link in (port.up, port.down):
                if link is not None:
                    link.free_at = 0.0
            return "ok"
        if verb == "stats":
            times = os.times()
            return json.dumps(
                {
                    "cpu_s": times.user + times.system,
                    "ports": {p.name: p.counts for p in self.ports},
                    "other_drops": self.other_drops,
                    "queued": len(self.events),
                }
            )
        return f"error: unknown command {line.strip()!r}"


def ports_from_config(config: dict) -> list[Port]:
    """Peers first (in order), the hub last, from the lab's configuration."""
    ports = []
    for peer in config["peers"]:
        up = Link(peer["up_bps"], peer["queue_s"])
        down = Link(peer["down_bps"], peer["queue_s"])
        ports.append(
            Port(peer["name"], bytes(map(int, peer["address"].split("."))), peer["delay_s"], up, down)
        )
    hub = config["hub"]
    ports.append(Port(hub["name"], bytes(map(int, hub["address"].split(".")))))
    return ports


def main() -> None:
    forwarder = Forwarder(ports_from_config(json.loads(sys.argv[1])))
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)  # delays stay true while training peers load the cores
    poll = select.epoll()
    by_fd = {}
    for index, port in enumerate(forwarder.ports):
        port.fd = open_tun(port.name)
        poll.register(port.fd, select.EPOLLIN)
        by_fd[port.fd] = index
    control = sys.stdin.fileno()
    poll.register(control, select.EPOLLIN)
    print("ready", flush=True)
    pending = b""
    while True:
        for fd, _ in poll.poll(forwarder.timeout()):
            if fd == control:
                chunk = os.read(control, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    print(forwarder.command(line.decode()), flush=True)
                continue
            now = time.monotonic()
            for _ in range(_BURST):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                forwarder.receive(by_fd[fd], packet, now)
        forwarder.run_due(time.monotonic())


if __name__ == "__main__":
    main()
