"""--compression: what two real hivemind averagers on loopback get from a round, in every codec."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from hivemind.averaging import DecentralizedAverager

from hivetrain.dht import make_dht, visible_addresses
from hivetrain.options import COMPRESSIONS
from hivetrain.sync.base import compression

SIZES = (1 << 17, 1000)  # one tensor in 8 bits, one small enough for its fp16 fallback
TOLERANCE = {"none": 1e-6, "fp16": 1e-2, "8bit": 0.1}


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_a_round_averages_both_peers_in_every_codec(name):
    generator = torch.Generator().manual_seed(0)
    mine = [torch.randn(n, generator=generator) for n in SIZES]
    theirs = [torch.randn(n, generator=generator) + 1 for n in SIZES]
    first = make_dht()
    second = make_dht(initial_peers=visible_addresses(first))

    def averager(dht, tensors) -> DecentralizedAverager:
        return DecentralizedAverager(
            [t.clone() for t in tensors], dht=dht, prefix=f"codec-{name}", target_group_size=2,
            min_matchmaking_time=2.0, request_timeout=1.0, compression=compression(name), start=True,
        )  # fmt: skip

    averagers = [averager(first, mine), averager(second, theirs)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            groups = list(pool.map(lambda a: a.step(timeout=30), averagers))
        assert all(g is not None and len(g) == 2 for g in groups), groups  # both peers in the round
        for averager in averagers:
            with averager.get_tensors() as tensors:
                for got, a, b in zip(tensors, mine, theirs):
                    error = (got - (a + b) / 2).abs()
                    # 8-bit clips beyond 3 sigma: the median is the fair measure there
                    assert error.median() < TOLERANCE[name] and error.mean() < 2 * TOLERANCE[name], name
    finally:
        for averager in averagers:
            averager.shutdown()
        second.shutdown()
        first.shutdown()
