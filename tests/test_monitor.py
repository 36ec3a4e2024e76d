"""hivetrain monitor over real hivemind DHTs on loopback: fake consumers claim shards (ShardAssigner) and
publish metrics (MetricsPublisher); the monitor joins, aggregates and serves /api/state and /metrics.

Hostile nodes plant records straight into their own DHT storage (bypassing every check, as modified
code would) and serve them to whoever asks: the monitor must refuse them, count them, and carry on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from functools import partial

import httpx
import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from prometheus_client.parser import text_string_to_metric_families

from hivetrain.assign import LeaseTiming, ShardAssigner
from hivetrain.dht import ensure_run_validators, make_dht, signing_key, visible_addresses
from hivetrain.metrics import MAX_RECORD_BYTES, MetricsPublisher, MetricsRecord, MetricsRecords, metrics_key
from hivetrain.monitor import MonitorOptions
from hivetrain.monitor.aggregate import History
from hivetrain.monitor.app import monitoring
from tests.shardset import make_shard_set
from tests.util import BIN, cli, free_port, loopback_dhts, wait_until

FAST = LeaseTiming(settle_s=0.05, poll_s=0.05, request_timeout_s=5)
POLL = MonitorOptions(poll_s=0.25, grace_s=1.0)
INTERVAL = 0.25


def names(n: int) -> list[str]:
    return [f"train-{i:06d}.tar" for i in range(n)]


def join_run(dht, run_id: str) -> None:
    """Make a running DHT validate `run_id`'s records (shard leases and metrics) as a peer of the run does."""
    ensure_run_validators(dht, run_id)
    dht.add_validators([SchemaValidator(MetricsRecords, prefix=run_id)])


def new_peer(initial_peers=()):
    return make_dht(private_key=RSAPrivateKey(), initial_peers=list(initial_peers))


@pytest.fixture(scope="module")
def swarm():
    """Three DHT peers on loopback with their own signing keys, shared by this module's tests."""
    with loopback_dhts(3) as peers:
        yield peers


@pytest.fixture
def run_id(request, swarm):
    run = f"m{os.getpid()}_{request.node.name}"[:60]
    for dht in swarm:
        join_run(dht, run)
    return run


@pytest.fixture
def closing():
    """Objects with a close() method, closed (last first) when the test ends."""
    with contextlib.ExitStack() as stack:

        def close_later(thing):
            stack.callback(thing.close)
            return thing

        yield close_later


def publisher(dht, run_id, name, shards, **values) -> MetricsPublisher:
    p = MetricsPublisher(
        dht, run_id, peer_name=name, address=visible_addresses(dht)[0], device="cpu", shards=shards,
        interval_s=INTERVAL,
    )  # fmt: skip
    p.update(**values)
    return p


def get_state(url: str) -> dict:
    response = httpx.get(url + "api/state", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def scrape(url: str) -> dict[tuple, float]:
    """`/metrics` as {(name, sorted labels): value}."""
    response = httpx.get(url + "metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def peer_rows(state: dict) -> dict[str, dict]:
    return {p["name"]: p for p in state["peers"]}


def grid(state: dict, shards: list[str] | None = None) -> dict[str, dict] | None:
    """The monitor's shard grid in the form of `ShardAssigner.epoch_state()` (`shards`: the names of a
    grid the monitor shows by index, having no manifest)."""
    epoch = state["epoch"]
    if epoch is None:
        return None
    labels = epoch["names"] or shards
    return {n: {"state": s, "holder": h} for n, s, h in zip(labels, epoch["states"], epoch["holders"])}


ALPHA = dict(
    samples_per_s=120.5, loss=2.25, lr=0.05, global_step=7, data_epoch=0, data_wait_frac=0.125, fetch_mb_s=33.5,
    val_top1=0.375, val_top5=0.875, samples=4096, time=123.0, data_wait=0.01,  # the last two are not published
)  # fmt: skip
BRAVO = dict(samples_per_s=60.25, loss=2.75, lr=0.05, global_step=6, data_epoch=0, samples=2048)


def test_monitor_shows_what_the_peers_publish(swarm, run_id, closing):
    shards = names(6)
    a, b, c = swarm
    # a peer that published and left before the monitor started
    charlie = publisher(c, run_id, "charlie", shards, samples_per_s=10.0, global_step=2)
    wait_until(lambda: charlie.published >= 1, what="charlie's first record")
    charlie.close()
    # two peers at work: claims and completed shards in the DHT, metrics published
    alpha_shards = closing(ShardAssigner(shards, dht=a, run_id=run_id, timing=FAST).start())
    bravo_shards = closing(ShardAssigner(shards, dht=b, run_id=run_id, timing=FAST).start())
    first = alpha_shards.next_claim(timeout=10)
    alpha_shards.complete(first, samples=8)
    alpha_shards.next_claim(timeout=10)
    bravo_shards.next_claim(timeout=10)
    alpha = closing(publisher(a, run_id, "alpha", shards, **ALPHA, shards_read=1, shards_claimed=1))
    bravo = closing(publisher(b, run_id, "bravo", shards, **BRAVO, shards_read=0, shards_claimed=1))

    with monitoring(run_id=run_id, initial_peers=visible_addresses(a), port=0, options=POLL) as running:
        url = running.server.url
        assert url.startswith("http://127.0.0.1:") and running.addresses == ()  # client mode
        # (a publisher's thread sends its first record at once, before the test's update() fills it in)
        state = wait_until(
            lambda: (
                (s := get_state(url))["totals"]["peers"] == 2
                and len(s["peers"]) == 3
                and all(row["samples_per_s"] is not None for row in s["peers"])
                and s
            ),
            what="both working peers and the one that left, with the values they published",
        )
        rows = peer_rows(state)
        assert {name: row["state"] for name, row in rows.items()} == {
            "alpha": "live", "bravo": "live", "charlie": "left",
        }  # fmt: skip
        assert rows["charlie"]["samples_per_s"] == 10.0 and rows["charlie"]["global_step"] == 2
        for name, published, dht, shards_read in (("alpha", ALPHA, a, 1), ("bravo", BRAVO, b, 0)):
            row = rows[name]
            assert row["peer"] == dht.peer_id.to_base58()
            assert row["address"] == visible_addresses(dht)[0] and row["device"] == "cpu"
            for field in ("samples_per_s", "loss", "lr", "global_step", "data_epoch", "samples"):
                assert row[field] == published[field], field
            assert (row["shards_read"], row["shards_claimed"]) == (shards_read, 1)
            assert row["val_top1"] == published.get("val_top1") and row["val_top5"] == published.get(
                "val_top5"
            )
            assert row["data_wait_frac"] == published.get("data_wait_frac")
            assert row["fetch_mb_s"] == published.get("fetch_mb_s")
            assert row["uptime"] > 0 and row["age_s"] < 5
        totals = state["totals"]
        assert totals["samples_per_s"] == pytest.approx(120.5 + 60.25)  # live peers only
        assert totals["loss"] == pytest.approx((2.25 + 2.75) / 2)
        assert (totals["global_step"], totals["lr"]) == (7, 0.05)
        assert (totals["val_top1"], totals["val_top5"]) == (0.375, 0.875)
        assert (
            state["refused"] == {"forged": 0, "malformed": 0, "oversized": 0} and state["dht_error"] is None
        )

        # the shard grid is the assigners' own view of the epoch
        def grids_agree():
            seen = grid(get_state(url), shards)
            return seen if seen == alpha_shards.epoch_state() == bravo_shards.epoch_state() else None

        seen = wait_until(grids_agree, what="the monitor's grid to match the assigners' epoch_state")
        assert [v["state"] for v in seen.values()].count("done") == 1
        assert [v["state"] for v in seen.values()].count("claimed") == 2
        state = get_state(url)
        assert state["epoch"]["epoch"] == 0 and state["totals"]["data_epoch"] == 0
        holder_names = state["epoch"]["holder_names"]
        assert holder_names == {a.peer_id.to_base58(): "alpha", b.peer_id.to_base58(): "bravo"}

        metrics = scrape(url)
        assert metrics[("hivetrain_samples_per_second", ())] == pytest.approx(180.75)
        assert metrics[("hivetrain_peers", ())] == 2
        assert metrics[("hivetrain_global_step", ())] == 7
        for name, published, dht in (("alpha", ALPHA, a), ("bravo", BRAVO, b)):
            labels = (("name", name), ("peer", dht.peer_id.to_base58()))
            assert metrics[("hivetrain_peer_samples_per_second", labels)] == published["samples_per_s"]
            assert metrics[("hivetrain_peer_loss", labels)] == published["loss"]
            assert metrics[("hivetrain_peer_up", labels)] == 1
        charlie_labels = (("name", "charlie"), ("peer", c.peer_id.to_base58()))
        assert metrics[("hivetrain_peer_up", charlie_labels)] == 0
        for status in ("done", "claimed", "free"):
            expected = sum(v["state"] == status for v in seen.values())
            assert metrics[("hivetrain_epoch_shards", (("state", status),))] == expected
        assert metrics[("hivetrain_refused_records_total", (("reason", "forged"),))] == 0

        # values move: the monitor follows
        alpha.update(samples_per_s=200.0, loss=1.5)
        wait_until(
            lambda: get_state(url)["totals"]["samples_per_s"] == pytest.approx(260.25), what="new rate"
        )
        # a peer that leaves cleanly says so; one that dies (DHT gone, no last record) fades to stale
        bravo.close()
        delta = new_peer(visible_addresses(a))
        join_run(delta, run_id)
        try:
            dying = publisher(delta, run_id, "delta", shards, samples_per_s=5.0)
            wait_until(
                lambda: peer_rows(get_state(url)).get("delta", {}).get("state") == "live", what="delta"
            )
        finally:
            delta.shutdown()
        dying.close()  # its DHT is gone: nothing is published
        state = wait_until(
            lambda: (s := get_state(url)) and peer_rows(s).get("delta", {}).get("state") == "stale" and s,
            timeout=15,
            what="the dead peer to fade to stale",
        )
        assert peer_rows(state)["bravo"]["state"] == "left"
        assert state["totals"]["peers"] == 1 and state["totals"]["samples_per_s"] == 200.0
        history = state["history"]
        assert len(history["t"]) >= 3 and history["t"] == sorted(history["t"])
        assert 180.75 in history["samples_per_s"] and 260.25 in history["samples_per_s"]


def test_monitor_started_before_the_peers(swarm, run_id, tmp_path, closing):
    manifest = make_shard_set(tmp_path / "shards", {"train": (5, 1), "val": (1, 1)})
    shards = [s.name for s in manifest.split("train").shards]
    with monitoring(run_id=run_id, port=0, shards=str(tmp_path / "shards"), options=POLL) as running:
        # its own DHT: the address training peers join with
        assert running.addresses and all("/p2p/" in a for a in running.addresses)
        state = get_state(running.server.url)
        assert state["peers"] == [] and state["totals"]["peers"] == 0
        assert grid(state) == {name: {"state": "free", "holder": None} for name in shards}
        peer = new_peer(running.addresses)
        try:
            join_run(peer, run_id)
            assigner = closing(ShardAssigner(shards, dht=peer, run_id=run_id, timing=FAST).start())
            claim = assigner.next_claim(timeout=10)
            closing(publisher(peer, run_id, "late", shards, samples_per_s=42.0))
            state = wait_until(
                lambda: (
                    (s := get_state(running.server.url))["totals"]["samples_per_s"] == 42.0
                    and grid(s)[claim.shard]["state"] == "claimed"
                    and s
                ),
                what="the peer that joined through the monitor",
            )
            assert [(p["name"], p["state"]) for p in state["peers"]] == [("late", "live")]
            assert state["epoch"]["names"] == shards
        finally:
            assigner.close()
            peer.shutdown()


async def _plant(_dht, node, *, key: str, subkey: bytes, value, expiration: float, sign: bool) -> bool:
    """Put a record into this node's own storage, past every validator (as a modified peer could)."""
    key_id = DHTID.generate(source=key)
    value_bytes = DHTProtocol.serializer.dumps(value)
    if sign:
        record = DHTRecord(key_id.to_bytes(), DHTProtocol.serializer.dumps(subkey), value_bytes, expiration)
        value_bytes = node.protocol.record_validator.sign_value(record)
    return node.protocol.storage.store(key_id, value_bytes, expiration, subkey=subkey)


def test_hostile_records_are_refused_and_counted(swarm, run_id, closing):
    a = swarm[0]
    honest = closing(publisher(a, run_id, "honest", names(2), samples_per_s=75.0))
    wait_until(lambda: honest.published >= 1, what="the honest record")
    good = honest.record()
    key, expiration = metrics_key(run_id), get_dht_time() + 120
    hostile = [new_peer(visible_addresses(a)) for _ in range(4)]
    try:
        for dht in hostile:
            join_run(dht, run_id)
        own = [signing_key(dht) for dht in hostile]
        plants = [
            dict(subkey=own[0], value={"peer": 5, "name": ["not", "text"]}, sign=True),  # malformed
            dict(subkey=own[1], value=dict(good, name="x" * 5000), sign=True),  # oversized
            dict(subkey=signing_key(a), value=dict(good, samples_per_s=1e9), sign=True),  # forged: a's key
            dict(subkey=own[3], value=dict(good, time=get_dht_time() + 3600), sign=True),  # from the future
        ]
        for dht, plant in zip(hostile, plants):
            assert dht.run_coroutine(partial(_plant, key=key, expiration=expiration, **plant))
        # the honest swarm's own validators refuse the same records
        assert not a.store(key, plants[0]["value"], expiration + 1, subkey=signing_key(a) + b"x")

        with monitoring(run_id=run_id, initial_peers=visible_addresses(a), port=0, options=POLL) as running:
            expected = {"forged": 1, "malformed": 2, "oversized": 1}
            state = wait_until(
                lambda: (s := get_state(running.server.url))["refused"] == expected and s,
                timeout=20,
                what=f"the monitor to refuse and count {expected}",
            )
            assert [(p["name"], p["samples_per_s"]) for p in state["peers"]] == [("honest", 75.0)]
            assert state["dht_error"] is None
            metrics = scrape(running.server.url)
            for reason, count in expected.items():
                assert metrics[("hivetrain_refused_records_total", (("reason", reason),))] == count
            # counted once each, however often they are served
            time.sleep(3 * POLL.poll_s)
            assert get_state(running.server.url)["refused"] == expected
    finally:
        for dht in hostile:
            dht.shutdown()


def test_records_of_the_largest_allowed_shape_fit_the_size_limit(swarm, run_id, closing):
    dht = swarm[1]
    p = closing(
        MetricsPublisher(
            dht, run_id, peer_name="名" * 200, address="/ip4/" + "9" * 300, device="🚀" * 200, interval_s=60
        )
    )
    record = p.record()
    assert len(record["name"]) == 128 and len(record["address"]) == 256 and len(record["device"]) == 128
    MetricsRecord.parse_obj(record)
    subkey = signing_key(dht)
    signed = DHTRecord(b"k", DHTProtocol.serializer.dumps(subkey), DHTProtocol.serializer.dumps(record), 0.0)
    assert len(signed.value) + 512 < MAX_RECORD_BYTES  # room for the RSA signature
    # non-finite and out-of-range values never reach the DHT (which would refuse the record)
    p.update(loss=float("nan"), samples_per_s=-1.0, val_top1=1.5, data_wait_frac=float("inf"), lr=None)
    record = p.record()
    assert (record["loss"], record["samples_per_s"], record["val_top1"]) == (None, 0.0, 1.0)
    assert record["data_wait_frac"] is None and record["lr"] is None
    MetricsRecord.parse_obj(record)


def test_history_keeps_the_whole_run_at_a_coarser_resolution():
    history = History(8)
    for t in range(100):
        history.append(dict(t=float(t), samples_per_s=float(t)))
    columns = history.columns()
    assert len(history) <= 8 and columns["t"][0] == 0.0 and columns["t"][-1] == 99.0
    assert columns["t"] == sorted(columns["t"]) and columns["loss"] == [None] * len(history)


# ---- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_monitor_command_serves_until_interrupted(swarm, run_id, tmp_path, closing):
    make_shard_set(tmp_path / "shards", {"train": (3, 1)})
    shard_names = [f"train-{i:06d}.tar" for i in range(3)]
    a = swarm[0]
    closing(publisher(a, run_id, "alpha", shard_names, samples_per_s=12.5, loss=1.0, val_top1=0.5))
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "hivetrain"), "monitor", "--run-id", run_id, "--initial-peer", visible_addresses(a)[0],
         "--port", str(port), "--shards", str(tmp_path / "shards" / "manifest.json"),
         "--tensorboard", str(tmp_path / "tb")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"

        def ready():
            with contextlib.suppress(httpx.HTTPError):
                state = get_state(url)
                return state["peers"] and state["epoch"] and state["epoch"]["names"] and state
            assert proc.poll() is None, proc.communicate()[1]
            return None

        state = wait_until(ready, timeout=60, what="the monitor command to serve the peer")
        assert state["epoch"]["names"] == shard_names and state["peers"][0]["name"] == "alpha"
        page = httpx.get(url)
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(url + "static/app.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "static/../pyproject.toml").status_code == 404
        assert httpx.post(url + "api/state").status_code == 405  # read-only
        wait_until(lambda: len(get_state(url)["history"]["t"]) >= 3, what="a few history points")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert f"monitoring run {run_id} at http://127.0.0.1:{port}/" in out and "monitor stopped" in out
    assert "Traceback" not in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"run/samples_per_s", "run/loss", "run/val_top1", "run/peers"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("run/samples_per_s")][-1] == pytest.approx(12.5)


@pytest.mark.slow
def test_monitor_command_user_errors(tmp_path):
    busy = free_port()
    with contextlib.closing(__import__("socket").create_server(("127.0.0.1", busy))):
        cases = [
            (["--initial-peer", "127.0.0.1:31337"], "is not a full multiaddr"),
            (["--shards", str(tmp_path / "missing.json")], str(tmp_path / "missing.json")),
            (["--port", str(busy)], f"cannot listen on 127.0.0.1:{busy}"),
        ]
        for args, message in cases:
            proc = cli("hivetrain", "monitor", *args, timeout=120)
            assert proc.returncode == 1, (args, proc.stderr)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr
