"""Emulated internet links for tests and benchmarks: N peers on this machine, each behind its own link.

    with WanLab(peers=4, rate_mbit=20, rtt_ms=50) as lab:
        lab.check()                              # measure rate each way and RTT per peer; raise if off
        server = lab.popen(HUB, ["shardtool", "serve", ...])       # the hub: the internet core
        peer = lab.popen(0, ["hivetrain", "run", "--host-maddr", f"/ip4/{lab.address(0)}/tcp/0", ...])
        lab.cut(1); ...; lab.restore(1)          # peer 1's link drops everything, then comes back

Each peer is a network namespace whose only link (`wan<i>`, address 198.18.x.y, RFC 2544's benchmarking
range) is a TUN device served by one forwarder process (tests/wanlink.py) in a hub namespace. Per peer:
`rate_mbit` caps upload and download (IP bytes; `down_mbit` sets download apart), `rtt_ms` is the round
trip the link adds, and `queue_ms` of backlog is held before packets are dropped (a modem's buffer).
A peer reaches the hub with its own RTT and another peer with the sum of both (two access links), at
the slower of the sender's upload and the receiver's download.

Why this mechanism: this kernel has `tbf`/`htb` but no `netem`, so latency must come from userspace. A
forwarder that reads and writes whole IP packets delays every packet in both directions, ACKs too, so
TCP meets the bandwidth-delay product as over a real long link; TUN devices carry no Ethernet, ARP or
checksum offload to work around (AF_PACKET on veth ends would need TSO/GSO and checksum offload turned
off, with ethtool, not installed by default). The forwarder shapes both directions itself (its docstring
says why not `tc`); a peer's link saturated both ways at 20 Mbit/s costs it ~8% of one core here, and
`check` prints its share over the measurement.

hivemind peers in the lab must each be given the addresses of the others (`--initial-peer` for every
peer started before): libp2p treats 198.18.0.0/15 as unroutable, so two peers that know each other only
through a third cannot open streams to each other (p2pd: "routing: not found") and their averaging
rounds never form, though their DHT records still travel.

Nothing is trusted unmeasured: `check` runs bulk TCP transfers each way and TCP connects between every
peer and the hub at once, prints the achieved figures and raises `WanLabError` when one is off by more
than the tolerance. Names carry this process's id, so parallel runs never collide; everything is torn
down on exit (errors and Ctrl-C included), and namespaces left by dead processes are removed at the
next start. Needs root, `ip` (iproute2) and /dev/net/tun: `unavailable_reason()` says what is missing.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TextIO

from tests.util import BIN, Children, wait_until
from tests.wanprobe import CheckResult, measure

HUB = "hub"
"""Pass as the peer index to address the hub namespace (shared servers, monitors)."""
HUB_ADDRESS = "198.18.0.1"
_PREFIX_LEN = 15  # 198.18.0.0/15
_FORWARDER = Path(__file__).with_name("wanlink.py")
_NAME_RE = re.compile(r"^wanlab-(\d+)-\d+-")
_serials = itertools.count()
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class WanLabError(RuntimeError):
    """The lab cannot be set up, or its links do not measure what was asked."""


@dataclass(frozen=True)
class LinkSettings:
    """What one peer's link was asked to be."""

    up_mbit: float
    down_mbit: float
    rtt_ms: float
    queue_ms: float


@dataclass(frozen=True)
class Counters:
    """Bytes and packets through a peer's link interface, as its kernel counts them (IP bytes)."""

    sent_bytes: int
    received_bytes: int
    sent_packets: int
    received_packets: int


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise WanLabError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


@cache
def unavailable_reason() -> str | None:
    """Why WanLab cannot run here (not root, no `ip`, no TUN, namespaces refused), or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs the `ip` command (Debian package iproute2)"
    probe = f"wanlab-{os.getpid()}-{next(_serials)}-probe"  # swept like a lab if left
    try:
        _ip("netns", "add", probe)
    except WanLabError as e:
        return f"cannot create network namespaces: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace `name` (other threads stay where they
    are); sockets created inside keep that namespace after the body ends."""

    def setns(fd: int) -> None:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")

    with open("/proc/thread-self/ns/net", "rb") as own, open(f"/run/netns/{name}", "rb") as target:
        setns(target.fileno())
        try:
            yield
        finally:
            setns(own.fileno())


def _kill_inside(namespace: str, *, spare: Sequence[int] = ()) -> None:
    """SIGKILL every process in `namespace` (ours by construction: we created it), this one excepted."""
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        if int(pid) != os.getpid() and int(pid) not in spare:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def sweep_leftovers() -> list[str]:
    """Remove the namespaces of labs whose process is gone (killed before it could clean up)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME_RE.match(name)
        if not match:
            continue
        try:
            os.kill(int(match[1]), 0)
            continue  # its lab is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_inside(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


def _per_peer(value: float | Sequence[float], peers: int, what: str) -> list[float]:
    values = [float(value)] * peers if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != peers or any(v < 0 for v in values):
        raise ValueError(f"{what}: one non-negative number, or one per peer ({peers}); got {value!r}")
    return values


class WanLab:
    """`peers` network namespaces behind emulated internet links, and a hub namespace reachable by all.

    Args:
        peers: how many peer namespaces (indices 0..peers-1).
        rate_mbit: each peer's upload and download cap (Mbit/s of IP bytes); one number or one per peer.
        rtt_ms: the round trip each peer's link adds (to the hub; peer to peer is the sum of both).
        down_mbit: download caps when they differ from `rate_mbit`.
        queue_ms: backlog each link holds before dropping, in time at its rate; default
            max(2 x rtt_ms, 50): one bandwidth-delay product of a path between two such peers.
    """

    def __init__(
        self,
        peers: int,
        *,
        rate_mbit: float | Sequence[float],
        rtt_ms: float | Sequence[float] = 0.0,
        down_mbit: float | Sequence[float] | None = None,
        queue_ms: float | Sequence[float] | None = None,
    ):
        if peers < 1:
            raise ValueError(f"peers: at least 1, got {peers}")
        up = _per_peer(rate_mbit, peers, "rate_mbit")
        down = up if down_mbit is None else _per_peer(down_mbit, peers, "down_mbit")
        rtt = _per_peer(rtt_ms, peers, "rtt_ms")
        queue = (
            [max(2 * r, 50.0) for r in rtt] if queue_ms is None else _per_peer(queue_ms, peers, "queue_ms")
        )
        if min(up + down) <= 0:
            raise ValueError("rate_mbit and down_mbit must be positive")
        self.links = [LinkSettings(*s) for s in zip(up, down, rtt, queue)]
        self.prefix = f"wanlab-{os.getpid()}-{next(_serials)}"
        self._forwarder: subprocess.Popen | None = None
        self._children = Children()
        self._namespaces: list[str] = []
        self._lock = threading.Lock()

    @property
    def peers(self) -> int:
        return len(self.links)

    # set-up and teardown

    def __enter__(self) -> WanLab:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Create the namespaces, start the forwarder and give every link its address."""
        reason = unavailable_reason()
        if reason:
            raise WanLabError(f"WanLab {reason}")
        sweep_leftovers()
        atexit.register(self.close)
        try:
            for name in [self.namespace(HUB)] + [self.namespace(i) for i in range(self.peers)]:
                _ip("netns", "add", name)
                self._namespaces.append(name)
            self._start_forwarder()
            hub = self.namespace(HUB)
            for i in range(self.peers):
                _ip("-n", hub, "link", "set", "dev", self._device(i), "netns", self.namespace(i))
                self._configure(i)
            self._configure(HUB)
        except BaseException:
            self.close()
            raise

    def _start_forwarder(self) -> None:
        config = {
            "peers": [
                {
                    "name": self._device(i),
                    "address": self.address(i),
                    "up_bps": s.up_mbit * 1e6,
                    "down_bps": s.down_mbit * 1e6,
                    "delay_s": s.rtt_ms / 2000,
                    "queue_s": s.queue_ms / 1000,
                }
                for i, s in enumerate(self.links)
            ],
            "hub": {"name": self._device(HUB), "address": HUB_ADDRESS},
        }
        self._forwarder = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(HUB), sys.executable, str(_FORWARDER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the lab, which then closes the forwarder in order
        )
        line = self._forwarder.stdout.readline().strip()
        if line != "ready":
            raise WanLabError(f"the link forwarder {_FORWARDER} did not start (said {line!r})")

    def _configure(self, peer: int | str) -> None:
        ns, dev = self.namespace(peer), self._device(peer)
        _ip("-n", ns, "link", "set", "dev", dev, "addrgenmode", "none")  # no IPv6 chatter on the link
        _ip("-n", ns, "addr", "add", f"{self.address(peer)}/{_PREFIX_LEN}", "dev", dev)
        _ip("-n", ns, "link", "set", "dev", dev, "up")
        _ip("-n", ns, "link", "set", "dev", "lo", "up")

    def close(self) -> None:
        """Stop every process in the lab's namespaces and remove them (safe to call more than once)."""
        atexit.unregister(self.close)
        self._children.kill_all()
        self._children = Children()
        spare = [self._forwarder.pid] if self._forwarder else []
        for name in self._namespaces:
            _kill_inside(name, spare=spare)  # what the children started (DHT daemons) and strays
        if self._forwarder is not None:
            with contextlib.suppress(OSError):
                self._forwarder.stdin.close()  # its devices vanish when it exits
            try:
                self._forwarder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._forwarder.kill()
                self._forwarder.wait()
            self._forwarder.stdout.close()
            self._forwarder = None
        for name in self._namespaces:
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()

    # addressing

    def namespace(self, peer: int | str) -> str:
        """The network namespace of peer `peer` (or of the hub, with HUB)."""
        return f"{self.prefix}-{self._name(peer)}"

    def address(self, peer: int | str) -> str:
        """The peer's IPv4 address on its link (HUB: the hub's); services listen on /ip4/<addr>/tcp/0."""
        if peer == HUB:
            return HUB_ADDRESS
        index = self._index(peer)
        return f"198.18.{1 + index // 254}.{1 + index % 254}"

    def expected_rtt_ms(self, a: int | str, b: int | str = HUB) -> float:
        """The round trip asked between two peers (or a peer and the hub): both links' RTTs added."""
        return sum(self.links[self._index(p)].rtt_ms for p in (a, b) if p != HUB)

    def _device(self, peer: int | str) -> str:
        return "wanhub" if peer == HUB else f"wan{self._index(peer)}"

    def _name(self, peer: int | str) -> str:
        return HUB if peer == HUB else f"p{self._index(peer)}"

    def _index(self, peer: int | str) -> int:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.peers:
            raise ValueError(f"peer: an index in 0..{self.peers - 1} or HUB, got {peer!r}")
        return peer

    # running things inside

    def popen(self, peer: int | str, args: Sequence[str], **kw) -> subprocess.Popen:
        """Start `args` inside the peer's namespace (in its own process group; killed at close)."""
        return self._children.start("ip", "netns", "exec", self.namespace(peer), *args, **kw)

    def inside(self, peer: int | str) -> contextlib.AbstractContextManager[None]:
        """Run a block of this thread inside the peer's namespace: `with lab.inside(0):
        socket.create_connection((lab.address(HUB), port))`. Use `popen` for processes."""
        return in_namespace(self.namespace(peer))

    def socket(
        self, peer: int | str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket that lives in the peer's namespace."""
        with self.inside(peer):
            return socket.socket(family, kind)

    # the links

    def counters(self, peer: int) -> Counters:
        """The peer's link interface counters, read from its kernel (`ip -s -j link`)."""
        out = _ip("-n", self.namespace(peer), "-s", "-j", "link", "show", "dev", self._device(peer)).stdout
        stats = json.loads(out)[0]["stats64"]
        return Counters(
            stats["tx"]["bytes"], stats["rx"]["bytes"], stats["tx"]["packets"], stats["rx"]["packets"]
        )

    def cut(self, peer: int) -> None:
        """Drop every packet to or from the peer (in flight too) until `restore`; nothing local notices."""
        self._command(f"cut {self._index(peer)}")

    def restore(self, peer: int) -> None:
        """End a `cut`: the peer's link carries packets again."""
        self._command(f"restore {self._index(peer)}")

    def forwarder_stats(self) -> dict:
        """The forwarder's counters: its CPU seconds, packets delivered and dropped per port."""
        return json.loads(self._command("stats"))

    def _command(self, line: str) -> str:
        if self._forwarder is None:
            raise WanLabError("the lab is not running (use it inside `with WanLab(...)`)")
        with self._lock:
            self._forwarder.stdin.write(line + "\n")
            self._forwarder.stdin.flush()
            answer = self._forwarder.stdout.readline().strip()
        if not answer or answer.startswith("error"):
            raise WanLabError(f"link forwarder: {answer or 'no answer (it exited)'} to {line!r}")
        return answer

    def check(
        self, *, tolerance: float = 0.2, seconds: float = 1.5, file: TextIO | None = None
    ) -> CheckResult:
        """Measure every peer's upload, download (bulk TCP) and RTT to the hub, all peers at once, and
        one peer-to-peer RTT; print the table to `file` (default stderr); raise WanLabError listing every
        figure more than `tolerance` off what was asked."""
        result = measure(self, hub=HUB, seconds=seconds)
        print(result.table(), file=file or sys.stderr, flush=True)
        problems = result.problems(tolerance)
        if problems:
            raise WanLabError(f"emulated links off by more than {tolerance:.0%}: " + "; ".join(problems))
        return result


def start_diloco_peers(
    lab: WanLab,
    manifest: Path,
    logs: Sequence[Path],
    *flags: str,
    before: Callable[[int], object] | None = None,
) -> list[subprocess.Popen]:
    """One small `hivetrain run --sync diloco` per folder of `logs` (peer i in lab peer i, its output in
    its folder), one after another, each given every earlier peer's address (see the module docstring:
    libp2p here does not route through a third node). `flags`: the run's own settings (run id, local
    steps); `before(i)` runs before peer i starts (to let the run get somewhere first)."""
    procs: list[subprocess.Popen] = []
    known: list[str] = []
    for i, log_dir in enumerate(logs):
        if before is not None:
            before(i)
        log_dir.mkdir()
        out = (log_dir / "stdout.txt").open("w")
        procs.append(lab.popen(i, [
            str(BIN / "hivetrain"), "run", "--shards", str(manifest), "--image-size", "32", "--batch", "16",
            "--target-global-bsz", "48", "--workers", "0", "--epochs", "1000", "--sync", "diloco",
            "--matchmaking-time", "2", "--averaging-timeout", "15", "--val-interval", "1000000",
            "--host-maddr", f"/ip4/{lab.address(i)}/tcp/0", "--log-dir", str(log_dir), *flags, *known,
        ], stdout=out, stderr=out))  # fmt: skip
        maddrs = log_dir / "maddrs.txt"
        address = wait_until(lambda m=maddrs: m.exists() and m.read_text().split(), timeout=120,
                             what=f"peer {i}'s address")[0]  # fmt: skip
        known += ["--initial-peer", address]
    return procs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.wanlab", description="Set up emulated internet links, measure them, tear down."
    )
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="per-peer cap, each direction")
    parser.add_argument("--down-mbit", type=float, default=None, help="download cap, if not --rate-mbit")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round trip each peer's link adds")
    parser.add_argument("--queue-ms", type=float, default=None, help="link buffer (default max(2 RTT, 50))")
    parser.add_argument("--seconds", type=float, default=1.5, help="measured part of each bulk transfer")
    parser.add_argument("--tolerance", type=float, default=0.2)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear down on `kill` as on Ctrl-C
    try:
        with WanLab(
            args.peers,
            rate_mbit=args.rate_mbit,
            down_mbit=args.down_mbit,
            rtt_ms=args.rtt_ms,
            queue_ms=args.queue_ms,
        ) as lab:
            lab.check(tolerance=args.tolerance, seconds=args.seconds, file=sys.stdout)
    except (WanLabError, ValueError) as e:
        print(f"wanlab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # torn down on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
