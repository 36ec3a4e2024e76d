"""Per-peer accounting: time computing and waiting, and traffic measured from the kernel's TCP counters."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from hivetrain.accounting import Accounting
from hivetrain.traffic import P2PTraffic, Traffic, parse_ss
from tests.system_tools import skip_unless
from tests.util import wait_until


def test_fractions_rates_and_bytes_per_sample():
    a = Accounting(started=100.0, window_s=10.0)
    for _ in range(10):
        a.step(compute_s=0.5, samples=32)
    out = a.fields(now=110.0, sync_wait_s=2.0, traffic=Traffic(sent=3_200, received=6_400))
    assert out["compute_frac"] == pytest.approx(0.5) and out["sync_wait_frac"] == pytest.approx(0.2)
    assert (out["sent_per_sample"], out["received_per_sample"]) == (10.0, 20.0)
    assert out["sent_per_s"] is None  # one reading: no rate yet
    out = a.fields(now=115.0, sync_wait_s=2.0, traffic=Traffic(sent=8_200, received=6_400))
    assert out["sent_per_s"] == pytest.approx(1000.0) and out["received_per_s"] == 0.0
    # the rate covers the last window only
    a.fields(now=130.0, sync_wait_s=2.0, traffic=Traffic(sent=8_200, received=6_400))
    out = a.fields(now=131.0, sync_wait_s=2.0, traffic=Traffic(sent=9_200, received=6_400))
    assert out["sent_per_s"] == pytest.approx(1000.0 / 16)
    silent = a.fields(now=131.0, sync_wait_s=0.0, traffic=None)
    assert silent["sent_bytes"] is None and silent["compute_frac"] == pytest.approx(5.0 / 31.0)


SS_OUTPUT = """\
ESTAB 0      0      127.0.0.1:39681 127.0.0.1:32775 users:(("p2pd",pid=13052,fd=13))
\t bbr wscale:10,10 rto:204 bytes_sent:55490 bytes_acked:55491 bytes_received:12784 segs_out:247
ESTAB 0      30     127.0.0.1:32775 127.0.0.1:39681 users:(("p2pd",pid=13043,fd=14))
\t bbr wscale:10,10 rto:204 bytes_sent:12784 bytes_acked:12754 bytes_received:55490 segs_out:299
ESTAB 0      0      [::1]:22 [::1]:5555
\t cubic bytes_sent:7 bytes_received:9
"""


def test_ss_output_is_read_per_socket_of_the_process():
    assert parse_ss(SS_OUTPUT, 13052) == {("127.0.0.1:39681", "127.0.0.1:32775"): Traffic(55490, 12784)}
    assert parse_ss(SS_OUTPUT, 1) == {}


def test_meter_counts_what_really_crossed_a_tcp_connection_even_after_it_closed():
    """This process's own sockets: 3 MB one way, 1 MB back, on a real loopback connection."""
    skip_unless("ip")  # ss comes with iproute2
    server = socket.create_server(("127.0.0.1", 0))
    meter = P2PTraffic(os.getpid(), interval_s=0.1)
    try:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()

        def drain(sock, n):
            got = 0
            while got < n:
                got += len(sock.recv(1 << 16))

        reader = threading.Thread(target=drain, args=(peer, 3_000_000))
        reader.start()
        client.sendall(b"x" * 3_000_000)
        reader.join()
        peer.sendall(b"y" * 1_000_000)
        drain(client, 1_000_000)
        # both ends are this process's: each direction counts once as sent, once as received
        wait_until(lambda: meter.totals().sent >= 4_000_000, timeout=10, what="the meter to see the bytes")
        open_totals = meter.totals()
        client.close()
        peer.close()
        meter.sample()
        closed_totals = meter.totals()
    finally:
        meter.close()
        server.close()
    assert 4_000_000 <= open_totals.sent < 4_100_000 and 4_000_000 <= open_totals.received < 4_100_000
    assert closed_totals.sent >= open_totals.sent  # sockets that closed keep their count
