"""`shardtool fetch` over HTTP and `fetch_shard`: verified, resumable, failing over between mirrors.

Real servers on loopback: our ShardServer, Python's http.server, and tests/faulty_http.FaultyMirror
for the faults (corrupt bytes, cut and stalled bodies, 5xx, ignored Range).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from shardtool.errors import FetchError, ShardtoolError
from shardtool.manifest import load
from shardtool.transport import FetchOptions, HttpOptions, fetch_shard, fetch_shards, select_shards
from shardtool.transport.http import HttpFetcher
from shardtool.transport.routes import order_routes
from shardtool.transport.serve import ShardServer
from tests.faulty_http import Faults, FaultyMirror
from tests.shardset import make_shard_set
from tests.util import BIN, cli, wait_until

FAST = HttpOptions(timeout=2.0, retries=3, backoff=0.05, max_backoff=0.2)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """4 train shards of ~330 KB and a small val shard."""
    root = tmp_path_factory.mktemp("fetch") / "shards"
    make_shard_set(root, {"train": (4, 8), "val": (1, 4)}, payload=40_000)
    return root


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> Path:
    """One 8 MB shard, for interruptions mid-file."""
    root = tmp_path_factory.mktemp("big") / "shards"
    make_shard_set(root, {"train": (1, 32)}, payload=250_000)
    return root


def same_files(a: Path, b: Path, names) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def shard_names(directory: Path) -> list[str]:
    return [s.name for _, s in load(directory).shards()]


def finals(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.tar")}


# ---- selection ---------------------------------------------------------------------------------


def test_select_shards_forms(shard_dir):
    shards = load(shard_dir).split("train").shards
    names = [s.name for s in shards]
    assert [s.name for s in select_shards(shards, None)] == names
    assert [s.name for s in select_shards(shards, "1-2")] == names[1:3]
    assert [s.name for s in select_shards(shards, "3,0")] == [names[0], names[3]]
    assert [s.name for s in select_shards(shards, "train-000002.tar,0")] == [names[0], names[2]]
    slices = [select_shards(shards, f"{k}/3") for k in range(3)]
    assert sorted(s.name for part in slices for s in part) == names  # N peers cover everything once
    assert all(len(part) in (1, 2) for part in slices)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0-9", "--shards 0-9: 0-9 is not a range within 0-3"),
        ("2-1", "2-1 is not a range within 0-3"),
        ("3/3", "--shards 3/3: K/N needs 0 <= K < N"),
        ("1/0", "K/N needs 0 <= K < N"),
        ("nope.tar", "no shard named 'nope.tar'"),
        ("seven", "cannot read 'seven'"),
    ],
)
def test_select_shards_errors(shard_dir, spec, message):
    shards = load(shard_dir).split("train").shards
    with pytest.raises(ShardtoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_shards(shards, spec)


# ---- the route order ---------------------------------------------------------------------------


def test_route_order():
    """auto: the swarm first for a selection, HTTP first for one shard on demand; only routes that exist."""
    assert order_routes("auto", http=True, torrent=True) == ("torrent", "http")
    assert order_routes("auto", http=True, torrent=True, on_demand=True) == ("http", "torrent")
    assert order_routes("auto", http=False, torrent=True, on_demand=True) == ("torrent",)
    assert order_routes("auto", http=True, torrent=False) == ("http",)
    assert order_routes("http", http=True, torrent=True) == ("http",)
    assert order_routes("torrent", http=True, torrent=True, on_demand=True) == ("torrent",)
    assert order_routes("torrent", http=True, torrent=False) == ()
    with pytest.raises(ValueError, match="via must be one of"):
        order_routes("ftp", http=True, torrent=True)


# ---- the CLI against real servers -------------------------------------------------------------


def test_fetch_from_serve_then_skip_present(shard_dir, tmp_path):
    with ShardServer(shard_dir) as server:
        out = tmp_path / "out"
        proc = cli("shardtool", "fetch", server.url + "manifest.json", "--out", out, "--json", "--progress")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        names = shard_names(shard_dir)
        assert summary["ok"] and summary["fetched"] == len(names) and summary["failed"] == {}
        assert summary["sources"] == {n: server.url + n for n in names}
        assert finals(out) == set(names) and same_files(shard_dir, out, names)
        assert "5/5 shards" in proc.stderr  # the progress bar
        assert load(out).fingerprint() == load(shard_dir).fingerprint()  # the manifest came along

    # a second run needs no server at all: every shard is present and verified by size
    proc = cli("shardtool", "fetch", out / "manifest.json", "--out", out, "--from", "http://127.0.0.1:9/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("5 shards requested: 0 fetched") and "5 already present" in proc.stdout


def test_fetch_from_python_http_server(shard_dir, tmp_path):
    """A plain static server (no Range support): a manifest URL is all a peer needs."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/manifest.json"
        proc = cli(
            "shardtool", "fetch", url, "--out", tmp_path, "--split", "train", "--shards", "1/2", "-j", "2"
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert finals(tmp_path) == {"train-000002.tar", "train-000003.tar"}
    assert same_files(shard_dir, tmp_path, finals(tmp_path))


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT back to its default in the child: a suite started in the background (`make test &`)
    passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def fetch_from_a_slow_mirror(directory: Path, out: Path, rate: float, **popen):
    """A `shardtool fetch` process reading `directory` from a mirror that sends `rate` bytes a second;
    killed on the way out if it is still running."""
    with FaultyMirror(directory, Faults(rate=rate)) as slow:
        proc = subprocess.Popen(
            [BIN / "shardtool", "fetch", directory / "manifest.json", "--out", out, "--from", slow.url],
            preexec_fn=_ctrl_c_as_in_a_terminal,
            **popen,
        )
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait()


def test_resume_after_fetch_killed_mid_file(big_dir, tmp_path):
    """Kill -9 during a download; the next fetch asks for the rest with Range and verifies the whole."""
    name = shard_names(big_dir)[0]
    size = (big_dir / name).stat().st_size
    part = tmp_path / ".shardtool-partial" / f"{name}.part"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with fetch_from_a_slow_mirror(big_dir, tmp_path, 2e6, **quiet):
        wait_until(
            lambda: part.exists() and part.stat().st_size > 1_000_000, timeout=30, what="a partial file"
        )
    kept = part.stat().st_size
    assert 1_000_000 < kept < size and not (tmp_path / name).exists()

    with FaultyMirror(big_dir) as good:
        proc = cli(
            "shardtool", "fetch", big_dir / "manifest.json", "--out", tmp_path, "--from", good.url, "--json"
        )
        assert proc.returncode == 0, proc.stderr
        assert [r.range for r in good.gets(name)] == [f"bytes={kept}-"]
    assert json.loads(proc.stdout)["bytes"] == size - kept
    assert same_files(big_dir, tmp_path, [name]) and not part.exists()


def test_ctrl_c_stops_at_once_and_keeps_the_partial_file(big_dir, tmp_path):
    name = shard_names(big_dir)[0]
    part = tmp_path / ".shardtool-partial" / f"{name}.part"
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with fetch_from_a_slow_mirror(big_dir, tmp_path, 1e6, **piped) as proc:
        wait_until(lambda: part.exists() and part.stat().st_size > 0, timeout=30, what="a partial file")
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        assert proc.wait(timeout=10) == 130
    assert time.monotonic() - stopped < 5  # not after the 8 s the download would still take
    assert proc.stderr.read().strip().endswith("interrupted")
    assert part.exists() and not (tmp_path / name).exists()


def test_server_ignoring_range_restarts_the_file(big_dir, tmp_path):
    name = shard_names(big_dir)[0]
    part = tmp_path / ".shardtool-partial" / f"{name}.part"
    part.parent.mkdir()
    part.write_bytes((big_dir / name).read_bytes()[:3_000_000])
    with FaultyMirror(big_dir, Faults(ignore_range=True)) as mirror:
        report = HttpFetcher(FAST).fetch(load(big_dir).split("train").shards[0], [mirror.url], tmp_path)
        assert [(r.range, r.status) for r in mirror.gets(name)] == [("bytes=3000000-", 200)]
    assert report.resumed_from == 3_000_000 and report.problems == ()
    assert same_files(big_dir, tmp_path, [name])


def test_bad_partial_from_an_earlier_source_is_refetched_whole(shard_dir, tmp_path):
    """A stale prefix fails the hash; the mirror is asked once more for the whole file, not blamed."""
    shard = load(shard_dir).split("train").shards[0]
    part = tmp_path / ".shardtool-partial" / f"{shard.name}.part"
    part.parent.mkdir()
    part.write_bytes(b"\0" * 5000)
    with FaultyMirror(shard_dir) as mirror:
        report = HttpFetcher(FAST).fetch(shard, [mirror.url], tmp_path)
        assert [r.range for r in mirror.gets(shard.name)] == ["bytes=5000-", None]
    assert report.source == mirror.url + shard.name and report.problems == ()
    assert same_files(shard_dir, tmp_path, [shard.name])


def test_corrupt_mirror_next_to_a_good_one(shard_dir, tmp_path):
    """Every shard on one mirror is corrupt; shards spread over both mirrors all arrive intact and each
    bad answer is reported with the mirror's URL."""
    names = shard_names(shard_dir)
    with (
        FaultyMirror(shard_dir, Faults(corrupt=set(names))) as bad,
        FaultyMirror(shard_dir, host="127.0.0.2") as good,
    ):
        proc = cli(
            "shardtool", "fetch", shard_dir / "manifest.json", "--out", tmp_path,
            "--from", bad.url, "--from", good.url, "--json",
        )  # fmt: skip
        tried_bad = {r.path.lstrip("/") for r in bad.requests}
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sources"] == {n: good.url + n for n in names}
    assert len(tried_bad) >= 2  # shards are spread over the mirrors, so the bad one got its share
    sha = {s.name: s.sha256 for _, s in load(shard_dir).shards()}
    assert sorted(summary["problems"]) == sorted(
        f"{n}: {bad.url}{n}: sha256 mismatch (expected {sha[n][:12]}…)" for n in tried_bad
    )
    assert same_files(shard_dir, tmp_path, names)


def test_mirror_dropping_connections_mid_body(shard_dir, tmp_path):
    """Every response is cut after 100 KB: each retry resumes where the last one stopped."""
    shard = load(shard_dir).split("train").shards[2]
    with FaultyMirror(shard_dir, Faults(drop_after=100_000)) as mirror:
        report = HttpFetcher(FAST).fetch(shard, [mirror.url], tmp_path)
        ranges = [r.range for r in mirror.gets(shard.name)]
    assert ranges == [None] + [f"bytes={k * 100_000}-" for k in range(1, len(ranges))]
    assert len(ranges) == -(-shard.size // 100_000)
    assert report.problems == () and same_files(shard_dir, tmp_path, [shard.name])


def test_retries_5xx_with_backoff(shard_dir, tmp_path):
    shard = load(shard_dir).split("val").shards[0]
    with FaultyMirror(shard_dir, Faults(fail_first=3)) as mirror:
        HttpFetcher(FAST).fetch(shard, [mirror.url], tmp_path)
        assert [r.status for r in mirror.requests] == [503, 503, 503, 200]
    assert same_files(shard_dir, tmp_path, [shard.name])


def test_stalled_mirror_times_out_and_fails_over(shard_dir, tmp_path):
    shard = load(shard_dir).split("train").shards[0]
    options = HttpOptions(timeout=0.5, retries=1, backoff=0.05)
    with FaultyMirror(shard_dir, Faults(stall_after=50_000)) as stuck, FaultyMirror(shard_dir) as good:
        report = HttpFetcher(options).fetch(shard, [stuck.url, good.url], tmp_path)
        assert len(stuck.gets(shard.name)) == 2  # one try and one retry, each resuming
        assert good.gets(shard.name)[0].range == "bytes=100000-"  # the good mirror resumes the same file
    assert report.source == good.url + shard.name
    assert "timed out" in report.problems[0] and "gave up after 2 tries" in report.problems[0]
    assert same_files(shard_dir, tmp_path, [shard.name])


def test_no_good_source_fails_with_every_reason(shard_dir, tmp_path):
    with (
        FaultyMirror(shard_dir, Faults(corrupt={"val-000000.tar"})) as bad,
        FaultyMirror(shard_dir, Faults(missing={"val-000000.tar"})) as empty,
    ):
        proc = cli(
            "shardtool", "fetch", shard_dir / "manifest.json", "--out", tmp_path, "--split", "val",
            "--from", bad.url, "--from", empty.url,
        )  # fmt: skip
        manifest = load(shard_dir)
        with pytest.raises(FetchError) as err:
            fetch_shard(manifest, manifest.split("val").shards[0], tmp_path, mirrors=[bad.url, empty.url])
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("Error: 1 of 1 shards not fetched (val-000000.tar: ")
    )
    assert "failed: val-000000.tar:" in proc.stdout
    message = str(err.value)
    assert "\n" not in message and message.startswith("val-000000.tar: ")
    assert f"{bad.url}val-000000.tar: sha256 mismatch" in message
    assert f"{empty.url}val-000000.tar: HTTP 404" in message
    assert not (tmp_path / "val-000000.tar").exists()  # never an unverified file under the final name
    # the same, for programs: no need to take the message apart
    assert err.value.shard == "val-000000.tar" and message == f"val-000000.tar: {err.value.reason}"
    assert [(f.source, f.reason.split(" (")[0]) for f in err.value.failures] == [
        (f"{bad.url}val-000000.tar", "sha256 mismatch"),
        (f"{empty.url}val-000000.tar", "HTTP 404"),
    ]


# ---- fetch_shard, the API the shard cache uses --------------------------------------------------


def test_fetch_shard_from_a_manifest_url_in_threads(shard_dir, tmp_path):
    with ShardServer(shard_dir) as server:
        manifest = load(server.url + "manifest.json")
        assert manifest.sources.http == [server.url]
        shards = [s for _, s in manifest.shards()]
        results, errors = {}, []

        def get(shard):
            try:
                results.setdefault(shard.name, []).append(fetch_shard(manifest, shard, tmp_path, via="http"))
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=get, args=(s,)) for s in shards + shards[:2]]  # two fetched twice
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert all(paths == [tmp_path / name] * len(paths) for name, paths in results.items())
    assert same_files(shard_dir, tmp_path, [s.name for s in shards])

    # present: returned without any server; a damaged copy is caught with trust_existing=False only
    shard = shards[0]
    assert fetch_shard(manifest, shard, tmp_path, mirrors=["http://127.0.0.1:9/"]) == tmp_path / shard.name
    data = bytearray((tmp_path / shard.name).read_bytes())
    data[1000] ^= 1
    (tmp_path / shard.name).write_bytes(data)
    with ShardServer(shard_dir) as server:
        fetch_shard(manifest, shard, tmp_path, mirrors=[server.url], trust_existing=False, via="http")
    assert same_files(shard_dir, tmp_path, [shard.name])


def test_recheck_repairs_a_damaged_shard(shard_dir, tmp_path):
    with ShardServer(shard_dir) as server:
        url = server.url + "manifest.json"
        cli("shardtool", "fetch", url, "--out", tmp_path, "--split", "val", check=True)
        damaged = tmp_path / "val-000000.tar"
        data = bytearray(damaged.read_bytes())
        data[-2000] ^= 0xFF
        damaged.write_bytes(data)
        quick = cli("shardtool", "fetch", url, "--out", tmp_path, "--split", "val", "--json", check=True)
        assert json.loads(quick.stdout)["present"] == 1  # trusted by size
        full = cli(
            "shardtool", "fetch", url, "--out", tmp_path, "--split", "val", "--recheck", "--json", check=True
        )
        assert json.loads(full.stdout)["fetched"] == 1
    assert same_files(shard_dir, tmp_path, ["val-000000.tar"])


def test_fetch_shards_library_summary(shard_dir, tmp_path):
    manifest = load(shard_dir)
    with FaultyMirror(shard_dir) as mirror:
        summary = fetch_shards(
            manifest,
            {"train": manifest.split("train").shards[:2]},
            tmp_path,
            FetchOptions(via="http", mirrors=(mirror.url,), jobs=2, progress=False, http=FAST),
        )
    assert summary.ok and summary.requested == 2 and len(summary.fetched) == 2
    assert summary.bytes == sum(s.size for s in manifest.split("train").shards[:2])
    assert "2 shards requested: 2 fetched" in summary.text()


# ---- user errors -------------------------------------------------------------------------------


def test_user_errors(shard_dir, tmp_path):
    manifest = str(shard_dir / "manifest.json")
    cases = [
        (["--shards", "7-9"], "--shards 7-9: 7-9 is not a range within 0-4 (5 shards to choose from)"),
        (["--split", "test"], f"{manifest}: no split 'test' (it has: train, val)"),
        ([], f"{manifest}: no HTTP source and no torrent (pass a mirror with --from URL)"),
        (["--via", "torrent"], f"{manifest}: no torrent for split 'train'; fetch with --via http"),
        (["--from", "ftp://x/"], "--from ftp://x/: not an http(s) URL"),
        (["--peer", "nohost"], "--peer 'nohost' is not HOST:PORT"),
    ]
    for args, message in cases:
        proc = cli("shardtool", "fetch", manifest, "--out", tmp_path / "out", *args)
        assert proc.returncode == 1, args
        assert proc.stderr.strip().splitlines() == [f"Error: {message}"], args

    other = tmp_path / "other"
    make_shard_set(other, {"train": (1, 2)}, num_classes=2)
    proc = cli("shardtool", "fetch", manifest, "--out", other, "--from", "http://127.0.0.1:9/")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"Error: {other / 'manifest.json'}: describes other data (testset); choose another --out"
    )
