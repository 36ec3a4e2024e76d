"""dht.py: real hivemind DHTs on loopback with the run's validators, and set-up failures in one line."""

from __future__ import annotations

import logging
import time
from functools import partial

import hivemind
import hivemind.dht.protocol
import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from hivetrain.dht import (
    Rejoiner,
    add_epoch_keys,
    bucket_key,
    clock_offset,
    ensure_run_validators,
    make_dht,
    signing_key,
    visible_addresses,
)
from hivetrain.errors import PeerError
from tests.util import wait_until

RUN = "dhttest"
KEY = bucket_key(RUN, 0, 0)


@pytest.fixture(scope="module")
def first():
    dht = make_dht(run_id=RUN, private_key=RSAPrivateKey())
    yield dht
    dht.shutdown()


def record(peer="p", claims=()):
    now = get_dht_time()
    return dict(peer=peer, fp="f", time=now, lease_until=now + 5, claims=list(claims), complete=-1, done=[])


def test_peers_join_and_only_owners_write_their_records(first):
    second = make_dht(run_id=RUN, private_key=RSAPrivateKey(), initial_peers=visible_addresses(first))
    try:
        for dht in (first, second):  # what a peer's shard assigner does for each epoch it reaches
            add_epoch_keys(dht, RUN, [0], buckets=1)
        mine, theirs = signing_key(first), signing_key(second)
        assert mine.startswith(b"[owner:ssh-rsa ") and mine != theirs
        expiration = get_dht_time() + 30
        assert first.store(KEY, record(claims=[dict(e=0, i=1, t=1.5)]), expiration, subkey=mine)
        # the other peer's subkey: the signature check refuses it on every node
        assert not first.store(KEY, record("forged"), expiration + 1, subkey=theirs)
        # the right owner but the wrong shape (an int where the schema wants a float): refused
        assert not first.store(KEY, dict(record(), time=1), expiration + 1, subkey=mine)
        seen = second.get(KEY, latest=True).value
        assert list(seen) == [mine] and seen[mine].value["claims"] == [dict(e=0, i=1, t=1.5)]
    finally:
        second.shutdown()


async def _forget_everyone(_dht, node) -> int:
    table = node.protocol.routing_table
    known = list(table.uid_to_peer_id)
    for node_id in known:
        del table[node_id]
    return len(known)


async def _knows(_dht, node, peer_id) -> bool:
    return peer_id in node.protocol.routing_table


def test_rejoiner_finds_initial_peers_again_after_both_forgot_each_other():
    """What a link cut of a minute leaves behind: each node dropped the other from its routing table.
    Two nodes of their own: a third (the module's, known to other tests' nodes) could bridge them."""
    first = make_dht(run_id=RUN, private_key=RSAPrivateKey())
    second = make_dht(run_id=RUN, private_key=RSAPrivateKey(), initial_peers=visible_addresses(first))
    rejoiner = Rejoiner(second, visible_addresses(first), period_s=0.2)
    try:
        assert second.run_coroutine(_forget_everyone) >= 1 and first.run_coroutine(_forget_everyone) >= 1
        key = signing_key(first)
        assert first.store(KEY, record("after-the-cut"), get_dht_time() + 30, subkey=key)
        assert second.get(KEY, latest=True) is None  # the halves no longer find each other
        rejoiner.start()
        wait_until(lambda: rejoiner.rejoined >= 1, timeout=20, what="the rejoin")
        assert second.run_coroutine(partial(_knows, peer_id=first.peer_id))
        assert first.run_coroutine(partial(_knows, peer_id=second.peer_id))  # the ping put it back there too
        seen = second.get(KEY, latest=True).value
        assert seen[key].value["peer"] == "after-the-cut"
        rejoined = rejoiner.rejoined
        time.sleep(1.0)
        assert rejoiner.rejoined == rejoined  # nothing missing: no more pings
    finally:
        rejoiner.close()
        second.shutdown()
        first.shutdown()


def test_validators_are_added_to_a_plain_dht():
    plain = hivemind.DHT(start=True)
    try:
        key = ensure_run_validators(plain, RUN)
        assert key == signing_key(plain) and key.startswith(b"[owner:")
        assert ensure_run_validators(plain, RUN) == key  # idempotent
        mark, marks = dict(peer="p", fp="f", complete=3), f"{RUN}_shards_epochs"
        assert plain.store(marks, mark, get_dht_time() + 30, subkey=key)
        assert not plain.store(marks, dict(mark, complete="all"), get_dht_time() + 31, subkey=key)
        add_epoch_keys(plain, RUN, [0], buckets=1)
        assert plain.store(KEY, record(), get_dht_time() + 30, subkey=key)
        assert not plain.store(KEY, {"claims": "all"}, get_dht_time() + 31, subkey=key)
        assert not plain.store(KEY, record(), get_dht_time() + 32, subkey=b"no owner")
    finally:
        plain.shutdown()


@pytest.mark.parametrize(
    "address", ["127.0.0.1:31337", "/ip4/127.0.0.1/tcp/31337", "/dns/peer/tcp/1/p2p/not-a-peer-id"]
)
def test_malformed_initial_peer_is_one_clear_error(address):
    with pytest.raises(PeerError, match=r"is not a full multiaddr: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID"):
        make_dht(initial_peers=[address])


def test_unreachable_initial_peers_are_retried_then_explained(caplog):
    gone = make_dht()
    address = visible_addresses(gone)[0]
    gone.shutdown()
    caplog.set_level(logging.WARNING, logger="hivetrain.dht")
    with pytest.raises(PeerError, match="could not reach any initial peer") as info:
        make_dht(initial_peers=[address], tries=2, retry_delay_s=0.1)
    assert address in str(info.value) and "\n" not in str(info.value)
    assert "try 1 of 2" in caplog.text


def test_identity_file_is_kept_and_bad_ones_are_explained(tmp_path):
    path = tmp_path / "peer.id"
    dht = make_dht(identity_path=path)
    peer_id = dht.peer_id
    dht.shutdown()
    dht = make_dht(identity_path=path)
    assert dht.peer_id == peer_id  # the same peer after a restart
    dht.shutdown()
    path.write_bytes(b"not a key")
    with pytest.raises(PeerError, match=r"peer\.id: cannot use this identity file .*point identity_path at"):
        make_dht(identity_path=path)
    with pytest.raises(PeerError, match=r"x\.id: cannot use this identity file .*does not exist"):
        make_dht(identity_path=tmp_path / "missing" / "x.id")


def test_clock_skew_is_refused_with_the_fix(first, monkeypatch):
    real = hivemind.dht.protocol.get_dht_time
    monkeypatch.setattr(hivemind.dht.protocol, "get_dht_time", lambda: real() + 30.0)
    with pytest.raises(PeerError, match=r"clock differs .* by more than 3 s .*synchronize the clock"):
        make_dht(initial_peers=visible_addresses(first), tries=1)


def test_clock_offset_estimates():
    assert clock_offset(100.0, now=100.0, max_age=10) is None
    assert clock_offset(95.0, now=100.0, max_age=10) is None
    assert clock_offset(110.0, now=100.0, max_age=10) == pytest.approx(10.0)
    assert clock_offset(80.0, now=100.0, max_age=10) == pytest.approx(-10.0)
