"""wanlab.py and wanlink.py: emulated internet links that measure what they were asked to be.

The link model is tested everywhere; the namespaces (marked `wan`) need root, `ip` and /dev/net/tun.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests.wanlab import HUB, WanLab, sweep_leftovers, unavailable_reason
from tests.wanlink import Forwarder, Link, Port

REASON = unavailable_reason()


def wan(test):
    """Mark a test that needs network namespaces; skip it, saying why, where they cannot be made."""
    return pytest.mark.wan(pytest.mark.skipif(REASON is not None, reason=f"WanLab {REASON}")(test))


def packet(dst: str, size: int = 1000) -> bytes:
    """An IPv4-shaped packet to `dst` (the forwarder reads the version and the destination only)."""
    header = bytes([0x45]) + bytes(15) + socket.inet_aton(dst)
    return header + bytes(size - len(header))


def test_link_sends_at_its_rate_and_drops_past_its_queue():
    link = Link(rate_bps=8e6, queue_s=0.0025)  # a 1000-byte packet takes 1 ms
    assert [link.send(0.0, 1000) for _ in range(5)] == pytest.approx([0.001, 0.002, 0.003, None, None])
    assert link.send(0.0025, 1000) == pytest.approx(0.004)  # backlog 0.5 ms: queued
    assert link.send(1.0, 1000) == pytest.approx(1.001)  # idle again


def test_forwarder_adds_both_links_delays_and_drops_a_cut_peers_packets():
    pipes = [os.pipe() for _ in range(3)]
    ports = [
        Port("a", socket.inet_aton("10.0.0.1"), 0.025, Link(8e6, 1.0), Link(8e6, 1.0)),
        Port("b", socket.inet_aton("10.0.0.2"), 0.050, Link(8e6, 1.0), Link(8e6, 1.0)),
        Port("hub", socket.inet_aton("10.0.0.9")),
    ]
    for port, (reader, writer) in zip(ports, pipes):
        port.fd = writer
        os.set_blocking(reader, False)

    def delivered(index: int) -> int:
        try:
            return len(os.read(pipes[index][0], 65536))
        except BlockingIOError:
            return 0

    forwarder = Forwarder(ports)
    forwarder.receive(0, packet("10.0.0.2"), now=0.0)  # up 1 ms, 25 + 50 ms, down 1 ms: due at 77 ms
    forwarder.run_due(0.070)
    assert delivered(1) == 0
    forwarder.run_due(0.080)
    assert delivered(1) == 1000 and delivered(0) == delivered(2) == 0
    forwarder.receive(2, packet("10.0.0.1"), now=1.0)  # from the hub: 25 ms + 1 ms
    forwarder.run_due(1.020)
    assert delivered(0) == 0
    forwarder.run_due(1.030)
    assert delivered(0) == 1000
    assert forwarder.command("cut 1") == "ok"
    forwarder.receive(0, packet("10.0.0.2"), now=2.0)
    forwarder.receive(1, packet("10.0.0.9"), now=2.0)
    forwarder.run_due(3.0)
    assert delivered(1) == delivered(2) == 0
    assert forwarder.command("restore 1") == "ok"
    forwarder.receive(1, packet("10.0.0.9"), now=4.0)
    forwarder.run_due(5.0)
    assert delivered(2) == 1000
    stats = json.loads(forwarder.command("stats"))["ports"]
    assert stats["a"]["cut_drops"] + stats["b"]["cut_drops"] == 2
    assert forwarder.command("cut 7").startswith("error")


@pytest.fixture(scope="module")
def lab():
    with WanLab(4, rate_mbit=20, rtt_ms=50) as lab:
        yield lab


@wan
@pytest.mark.parametrize(("rate_mbit", "rtt_ms"), [(20, 50), (5, 100)])
def test_links_measure_within_20_percent_of_what_was_asked(rate_mbit, rtt_ms, capsys):
    with WanLab(4, rate_mbit=rate_mbit, rtt_ms=rtt_ms) as lab:
        result = lab.check(tolerance=0.2)  # raises WanLabError naming every figure that is off
    figures = result.figures()
    assert len(figures) == 4 * 3 + 1 and not result.problems(0.2)
    assert result.pair_rtt_ms.asked == 2 * rtt_ms
    assert all(p.rtt_ms.got >= rtt_ms for p in result.peers)  # a link can only add delay
    assert "RTT to hub" in capsys.readouterr().err


def connected_pair(lab: WanLab, peer: int, *, timeout: float = 5) -> tuple[socket.socket, socket.socket]:
    """(peer's socket, hub's socket) of one TCP connection from the peer to the hub."""
    with lab.inside(HUB), socket.create_server((lab.address(HUB), 0)) as listener:
        with lab.inside(peer):
            client = socket.create_connection(listener.getsockname(), timeout=timeout)
        server = listener.accept()[0]
    server.settimeout(timeout)
    return client, server


def transfer(sender: socket.socket, receiver: socket.socket, size: int) -> int:
    """Move `size` bytes and wait until both ends closed; the sender's retransmitted bytes."""
    thread = threading.Thread(target=lambda: (sender.sendall(bytes(size)), sender.shutdown(socket.SHUT_WR)))
    thread.start()
    got = 0
    while chunk := receiver.recv(1 << 16):
        got += len(chunk)
    thread.join()
    receiver.close()
    assert sender.recv(1) == b""  # the receiver's FIN: everything was acknowledged
    info = sender.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 216)
    retransmitted = struct.unpack_from("Q", info, 208)[0]  # struct tcp_info's tcpi_bytes_retrans
    sender.close()
    assert got == size
    return retransmitted


@wan
def test_counters_count_the_bytes_moved(lab):
    size, ip_per_payload = 2_000_000, 1500 / 1448  # full segments: 52 bytes of IP and TCP headers each
    before = lab.counters(2)
    client, server = connected_pair(lab, 2)
    resent = transfer(client, server, size)
    middle = lab.counters(2)
    sent = middle.sent_bytes - before.sent_bytes
    assert (size + resent) * ip_per_payload <= sent <= (size + resent) * ip_per_payload * 1.01 + 2000
    assert middle.received_bytes - before.received_bytes < 0.05 * size  # ACKs only
    client, server = connected_pair(lab, 2)
    resent = transfer(server, client, size)
    received = lab.counters(2).received_bytes - middle.received_bytes
    # every byte arrived at least once; a retransmission may have been dropped on the way
    assert size * ip_per_payload <= received <= (size + resent) * ip_per_payload * 1.01 + 2000


@wan
def test_cut_link_stalls_its_connections_and_they_resume_after_restore(lab):
    client, server = connected_pair(lab, 1)
    client.sendall(b"a")
    assert server.recv(1) == b"a"
    lab.cut(1)
    try:
        client.sendall(b"b")  # accepted locally: a cut is silent, as on the internet
        server.settimeout(1.5)
        with pytest.raises(TimeoutError):
            server.recv(1)
        with lab.inside(HUB), socket.create_server((lab.address(HUB), 0)) as listener:
            with lab.inside(1), pytest.raises(TimeoutError):
                socket.create_connection(listener.getsockname(), timeout=1)
            with lab.inside(0):  # other peers' links are untouched
                socket.create_connection(listener.getsockname(), timeout=2).close()
    finally:
        lab.restore(1)
    server.settimeout(15)
    assert server.recv(1) == b"b"  # TCP's retransmission gets through once the link is back
    client.close()
    server.close()
    assert lab.forwarder_stats()["ports"]["wan1"]["cut_drops"] > 0


DHT_NODE = """
import json, sys, time
import hivemind
from hivemind.utils import get_dht_time
dht = hivemind.DHT(host_maddrs=[f"/ip4/{sys.argv[1]}/tcp/0"], initial_peers=sys.argv[2:], start=True)
print(json.dumps([str(a) for a in dht.get_visible_maddrs()]), flush=True)
for line in sys.stdin:
    verb, key, *value = line.split()
    begin = time.perf_counter()
    if verb == "store":
        result = dht.store(key, value[0], get_dht_time() + 60)
    else:
        found = dht.get(key, latest=True)
        result = None if found is None else found.value
    print(json.dumps({"result": result, "seconds": time.perf_counter() - begin}), flush=True)
"""


def reply(proc: subprocess.Popen, log, timeout: float = 60):
    if not select.select([proc.stdout], [], [], timeout)[0]:
        log.seek(0)
        raise AssertionError(f"no answer from the DHT process within {timeout} s:\n{log.read()[-3000:]}")
    return json.loads(proc.stdout.readline())


@wan
def test_dht_stores_and_gets_across_links_and_pays_their_round_trip(lab, tmp_path):
    logs = [open(tmp_path / f"dht{peer}.log", "w+") for peer in (0, 3)]  # noqa: SIM115 (closed below)

    def start(peer: int, log, initial_peers: list[str]) -> subprocess.Popen:
        args = [sys.executable, "-c", DHT_NODE, lab.address(peer), *initial_peers]
        return lab.popen(peer, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    nodes = [start(0, logs[0], [])]
    try:
        visible = reply(nodes[0], logs[0])
        assert visible and all(f"/ip4/{lab.address(0)}/tcp/" in a for a in visible)
        nodes.append(start(3, logs[1], visible))
        first, second = nodes
        reply(second, logs[1])  # joined through peer 0's link
        first.stdin.write("store wan_key across\n")
        first.stdin.flush()
        assert reply(first, logs[0])["result"] is True
        second.stdin.write("get wan_key\n")
        second.stdin.flush()
        got = reply(second, logs[1])
        assert got["result"] == "across"
        # the lookup crossed both links at least once: their round trips add up
        assert got["seconds"] >= 0.9 * lab.expected_rtt_ms(0, 3) / 1000
    finally:
        for node in nodes:
            node.stdin.close()
            node.kill()
            node.wait()
        for log in logs:
            log.close()


@wan
def test_namespaces_are_removed_after_a_failure_and_leftovers_are_swept():
    def namespaces() -> set[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    with pytest.raises(RuntimeError, match="a failing test"), WanLab(2, rate_mbit=10) as lab:
        names = {lab.namespace(HUB), lab.namespace(0), lab.namespace(1)}
        sleeper = lab.popen(1, ["sleep", "60"])
        assert names <= namespaces()
        raise RuntimeError("a failing test")
    assert not names & namespaces() and sleeper.poll() is not None

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that died without cleaning up after itself
    leftover = f"wanlab-{gone.pid}-0-hub"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    stray = subprocess.Popen(["ip", "netns", "exec", leftover, "sleep", "60"])
    try:
        assert leftover in sweep_leftovers()
        assert leftover not in namespaces() and stray.wait(timeout=10) != 0
    finally:
        stray.kill()
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)
