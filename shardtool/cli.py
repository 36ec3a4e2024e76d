"""The `shardtool` command: build, inspect, serve and fetch WebDataset shards.

Each subcommand only parses options, calls the library, and reports; the work lives in the modules
named in the package docstring.
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from . import __version__
from .cliutil import friendly_group, on_signals, setup_logging, stop_on_signals, with_verbosity
from .errors import ShardtoolError
from .sources.layouts import LAYOUTS


@click.group(cls=friendly_group(ShardtoolError), context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shardtool")
@with_verbosity
def cli(verbose: int, quiet: int) -> None:
    """Turn datasets into reproducible WebDataset shards and move them between peers, verified.

    \b
    Typical use:
      shardtool build ~/data/ILSVRC2012 --out shards/imagenet --workers 8
      shardtool serve shards/imagenet --port 8080
      shardtool fetch http://host:8080/manifest.json --out shards/imagenet --jobs 8
    """
    setup_logging(verbose, quiet)


# ---- build and inspect: build, synth, verify, info ----------------------------------------------

_LAYOUT_HELP = "\b\nLayouts (--layout), in the order detection tries them:\n" + "\n".join(
    f"  {layout.name:<18} {layout.expects}" for layout in LAYOUTS
)


@cli.command(epilog=_LAYOUT_HELP)
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder."
)
@click.option(
    "--layout",
    type=click.Choice([layout.name for layout in LAYOUTS]),
    help="Force a layout instead of detecting it (see below).",
)
@click.option(
    "--split", "splits", multiple=True, help="Build only this split (repeatable); 'test' for Tiny-ImageNet."
)
@click.option("--seed", default=0, show_default=True, help="Shuffle seed.")
@click.option(
    "--shard-size", default="256MB", show_default=True, help="Target shard size (256MB, 1GiB, bytes)."
)
@click.option("--max-per-shard", type=click.IntRange(min=1), help="At most this many samples per shard.")
@click.option(
    "--workers", "-j", type=click.IntRange(min=0), default=None, help="Check processes [CPUs - 1, max 8]."
)
@click.option(
    "--resize", type=click.IntRange(min=8), help="Re-encode so the shorter side is at most N pixels."
)
@click.option(
    "--quality",
    type=click.IntRange(1, 100),
    default=90,
    show_default=True,
    help="JPEG quality of re-encodes.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N shuffled samples of each split.")
@click.option(
    "--val-labels",
    type=click.Path(dir_okay=False, path_type=Path),
    help="One wnid per line, val image order.",
)
@click.option("--name", help="Dataset name in the manifest [known dataset, else folder name].")
@click.option("--strict", is_flag=True, help="Stop at the first bad file instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier build in --out.")
def build(
    src,
    out,
    layout,
    splits,
    seed,
    shard_size,
    max_per_shard,
    workers,
    resize,
    quality,
    limit,
    val_labels,
    name,
    strict,
    overwrite,
):
    """Build WebDataset shards and manifest.json from the dataset folder SRC.

    Rerunning the same command after an interruption keeps the finished shards (checked) and writes
    the rest.
    """
    from .build import BuildOptions, parse_size
    from .build import build as run_build
    from .images import ImageOptions
    from .manifest import human_bytes
    from .sources import SourceOptions

    options = BuildOptions(
        seed=seed,
        shard_size=parse_size(shard_size),
        max_per_shard=max_per_shard,
        image=ImageOptions(resize=resize, quality=quality),
        limit=limit,
        splits=tuple(splits) or None,
        layout=layout,
        source=SourceOptions(val_labels=val_labels),
        name=name,
        strict=strict,
        **({} if workers is None else {"workers": workers}),
    )
    with _sigterm_as_exit():
        report = run_build(src, out, options, overwrite=overwrite)
    total_bytes = sum(s.bytes for s in report.splits)
    for s in report.splits:
        extra = f", {s.converted:,} converted" if s.converted else ""
        resumed = f", {s.resumed_shards} kept from before" if s.resumed_shards else ""
        click.echo(
            f"{s.name}: {s.samples:,} samples in {s.shards} shards ({human_bytes(s.bytes)}), "
            f"{s.skipped:,} skipped{extra}{resumed}",
            err=True,
        )
    samples = sum(s.samples for s in report.splits)
    if all(s.resumed_shards == s.shards for s in report.splits):
        click.echo(
            f"nothing left to build: {report.manifest.origin} is complete and its shards check out", err=True
        )
        click.echo(report.manifest.origin)
        return
    rate = f"{samples / report.seconds:,.0f} samples/s, {total_bytes / 1e6 / report.seconds:,.1f} MB/s"
    click.echo(f"built {report.manifest.dataset} in {report.seconds:.1f} s ({rate})", err=True)
    if report.manifest.skipped:
        click.echo(
            f"{len(report.manifest.skipped)} files skipped: listed with reasons in the manifest", err=True
        )
    click.echo(report.manifest.origin)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--train-per-class", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--val-per-class", type=click.IntRange(min=0), default=50, show_default=True)
@click.option(
    "--size", type=click.IntRange(min=16), default=64, show_default=True, help="Image side in pixels."
)
@click.option("--seed", default=0, show_default=True)
def synth(out, classes, train_per_class, val_per_class, size, seed):
    """Generate a small learnable dataset in the Tiny-ImageNet-200 layout into OUT (offline)."""
    from .sources.synth import generate

    written = generate(
        out,
        classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        size=size,
        seed=seed,
    )
    total = classes * (train_per_class + val_per_class)
    what = "wrote" if written else "already there:"
    click.echo(f"{what} {total:,} images of {classes} classes in {out}", err=True)


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST")
@click.option("--no-count", is_flag=True, help="Skip counting samples (size and sha256 only).")
def verify(manifest_path, no_count):
    """Check every shard beside MANIFEST: size, sha256 and sample count. Exit 1 listing the bad ones."""
    from .errors import VerifyError
    from .manifest import human_bytes, load
    from .verify import verify_manifest

    manifest = load(manifest_path)
    if manifest.base_dir is None:
        raise VerifyError(f"{manifest_path}: verify needs a local manifest with its shards beside it")
    bad = verify_manifest(manifest, count=not no_count)
    shards = [s for _, s in manifest.shards()]
    for name, problem in bad:
        click.echo(f"{manifest.base_dir / name}: {problem}")
    if bad:
        raise VerifyError(f"{len(bad)} of {len(shards)} shards failed verification (listed above)")
    click.echo(f"ok: {len(shards)} shards, {human_bytes(sum(s.size for s in shards))} verified", err=True)


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def info(manifest_path, as_json):
    """Summarise a manifest (file, folder or URL): dataset, classes, splits, sources."""
    import json

    from .manifest import human_bytes, load

    m = load(manifest_path)
    summary = {
        "dataset": m.dataset,
        "layout": m.layout,
        "num_classes": m.num_classes,
        "fingerprint": m.fingerprint(),
        "splits": {
            name: {
                "num_samples": s.num_samples,
                "num_bytes": s.num_bytes,
                "num_shards": len(s.shards),
                "labeled": s.labeled,
            }
            for name, s in m.splits.items()
        },
        "skipped": len(m.skipped),
        "build": m.build,
        "sources": {"http": m.sources.http, "torrents": sorted(m.sources.torrents)},
    }
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    examples = ", ".join(f"{c.id} ({c.name})" if c.name != c.id else c.id for c in m.classes[:3])
    lines = [
        f"dataset      {m.dataset} (layout {m.layout}, fingerprint {summary['fingerprint']})",
        f"classes      {m.num_classes}: {examples}{', ...' if m.num_classes > 3 else ''}",
    ]
    for name, s in m.splits.items():
        label = "" if s.labeled else ", unlabeled"
        lines.append(
            f"{name:<12} {s.num_samples:,} samples in {len(s.shards)} shards, {human_bytes(s.num_bytes)}{label}"
        )
    lines.append(f"skipped      {len(m.skipped)} files")
    lines.append("build        " + " ".join(f"{k}={v}" for k, v in m.build.items()))
    if m.sources.http or m.sources.torrents:
        lines.append(
            f"sources      http: {len(m.sources.http)}, torrents: {', '.join(sorted(m.sources.torrents)) or 'none'}"
        )
    click.echo("\n".join(lines))


def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit while long work runs, so `finally` blocks clean up temp files."""

    def handler(signum: int) -> None:
        raise SystemExit(128 + signum)

    return on_signals(handler, (signal.SIGTERM,))


# ---- transport: serve, fetch, torrent, seed -----------------------------------------------------
# Imports are local so that `shardtool build` never loads libtorrent or the HTTP stack.


def _until_stopped(tick=None, interval: float = 1.0) -> None:
    """Block until Ctrl-C or SIGTERM, calling `tick()` every `interval` seconds."""
    import threading

    stop = threading.Event()
    with stop_on_signals(stop):
        while not stop.wait(interval):
            if tick:
                tick()


def _torrent_options(listen, dht, lsd, upnp, trackers, peers, **kw):
    from .transport.torrent import TorrentOptions, parse_hostport

    parse_hostport(listen, "--listen")
    for peer in peers:
        parse_hostport(peer, "--peer")
    return TorrentOptions(
        listen=listen, dht=dht, lsd=lsd, port_mapping=upnp, trackers=tuple(trackers), peers=tuple(peers), **kw
    )


_swarm_options = [
    click.option(
        "--peer", "peers", multiple=True, metavar="HOST:PORT", help="A BitTorrent peer to connect to."
    ),
    click.option("--tracker", "trackers", multiple=True, metavar="URL", help="Extra tracker announce URL."),
    click.option("--dht/--no-dht", default=False, show_default=True, help="Find peers through the DHT."),
    click.option("--lsd/--no-lsd", default=False, show_default=True, help="Local peer discovery."),
    click.option("--upnp/--no-upnp", default=False, show_default=True, help="Map the port (UPnP, NAT-PMP)."),
]


def _with_swarm_options(f):
    for option in reversed(_swarm_options):
        f = option(f)
    return f


@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port."
)
def serve(directory, host, port):
    """Serve DIR's manifest, shards and torrents over HTTP until Ctrl-C.

    Range and HEAD requests; each shard also at /<torrent name>/<shard>, where BitTorrent clients look
    for web seeds. Prints the base URL to hand out.
    """
    from .transport.serve import ShardServer

    with ShardServer(directory, host, port) as server:
        click.echo(server.url, nl=True)
        click.echo(f"fetch with: shardtool fetch {server.url}manifest.json --out DIR", err=True)
        _until_stopped()


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST")
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Shard folder."
)
@click.option("--via", type=click.Choice(["auto", "http", "torrent"]), default="auto", show_default=True)
@click.option("--from", "mirrors", multiple=True, metavar="URL", help="Extra HTTP mirror (base URL).")
@click.option("--split", "splits", multiple=True, help="Only this split (repeatable) [all].")
@click.option("--shards", "spec", metavar="SPEC", help="Subset: 0-99,120 | train-000007.tar | K/N [all].")
@click.option(
    "--jobs", "-j", default=4, show_default=True, type=click.IntRange(1, 256), help="Parallel downloads."
)
@click.option("--recheck", is_flag=True, help="Hash shards already present instead of trusting their size.")
@click.option("--fsync", is_flag=True, help="Flush each shard to disk before renaming it into place.")
@click.option("--timeout", default=30.0, show_default=True, help="HTTP connect/read timeout, seconds.")
@click.option("--retries", default=4, show_default=True, type=click.IntRange(0, 100), help="Per mirror.")
@click.option(
    "--stall-timeout", default=60.0, show_default=True, help="Give up on the swarm after this long idle."
)
@click.option(
    "--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT", help="BitTorrent port."
)
@_with_swarm_options
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [when a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def fetch(manifest_path, out, via, mirrors, splits, spec, jobs, recheck, fsync, timeout, retries, stall_timeout,
          listen, peers, trackers, dht, lsd, upnp, progress, as_json):  # fmt: skip
    """Fetch a manifest's shards into --out, each verified by sha256; exit 0 only if all are there.

    MANIFEST is a path or an http(s) URL. Sources: the manifest's HTTP mirrors and --from, and its
    torrents (auto: the swarm with the mirrors as web seeds, then HTTP for anything left).
    """
    import json

    from .errors import FetchError
    from .manifest import load
    from .transport.fetch import FetchOptions, fetch_shards, prepare_destination, select_shards
    from .transport.http import HttpOptions

    manifest = load(manifest_path, timeout=timeout)
    chosen_splits = list(splits) or list(manifest.splits)
    pool = [(split, shard) for split in chosen_splits for _, shard in manifest.shards(split)]
    names = {shard.name for shard in select_shards([s for _, s in pool], spec)}
    selection: dict = {}
    for split, shard in pool:
        if shard.name in names:
            selection.setdefault(split, []).append(shard)
    torrent = None
    if via != "http":
        torrent = _torrent_options(listen, dht, lsd, upnp, trackers, peers, stall_timeout=stall_timeout)
    options = FetchOptions(
        via=via,
        mirrors=tuple(mirrors),
        jobs=jobs,
        recheck=recheck,
        progress=progress,
        http=HttpOptions(timeout=timeout, retries=retries, fsync=fsync),
        torrent=torrent,
    )
    prepare_destination(manifest, out)
    summary = fetch_shards(manifest, selection, out, options)
    click.echo(json.dumps(summary.to_dict(), indent=1) if as_json else summary.text())
    if not summary.ok:
        first = next(iter(summary.failed.items()))
        raise FetchError(
            f"{len(summary.failed)} of {summary.requested} shards not fetched ({first[0]}: {first[1]})"
        )


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST")
@click.option("--split", "splits", multiple=True, help="Only this split (repeatable) [all].")
@click.option("--web-seed", "web_seeds", multiple=True, metavar="URL", help="HTTP mirror base URL (BEP 19).")
@click.option("--tracker", "trackers", multiple=True, metavar="URL", help="Tracker announce URL.")
def torrent(manifest_path, splits, web_seeds, trackers):
    """Create each split's torrent beside MANIFEST and record it (info-hash, magnet, file) there.

    Deterministic: the same shards give the same info-hash on any machine (v1, sorted files, fixed
    piece-size rule, no creation date).
    """
    from .transport.torrent import write_torrents

    for split, info in write_torrents(
        manifest_path, splits=splits, web_seeds=web_seeds, trackers=trackers
    ).items():
        click.echo(f"{split}\t{info.infohash}\t{info.file}\t{info.magnet}")


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST")
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help="Shard folder [MANIFEST's]."
)
@click.option("--split", "splits", multiple=True, help="Only this split (repeatable) [all with a torrent].")
@click.option("--listen", default="127.0.0.1:6881", show_default=True, metavar="HOST:PORT",
              help="Where peers connect (0.0.0.0:6881 for the internet).")  # fmt: skip
@_with_swarm_options
def seed(manifest_path, directory, splits, listen, peers, trackers, dht, lsd, upnp):
    """Check the local shards and seed them until Ctrl-C, with a live status line."""
    import sys

    from .manifest import human_bytes, load
    from .transport.seed import Seeder

    manifest = load(manifest_path)
    directory = directory or manifest.base_dir
    if directory is None:
        raise ShardtoolError(f"{manifest_path}: a manifest fetched by URL needs --dir (the shard folder)")
    options = _torrent_options(listen, dht, lsd, upnp, trackers, peers)
    seeder = Seeder(manifest, directory, options, splits=splits)
    try:
        seeder.start()
        for split, magnet in seeder.magnets.items():
            click.echo(f"{split} {magnet}")
        click.echo(f"listening on {seeder.address} (peers can add it with --peer {seeder.address})")
        last_line = [0.0]

        def tick():
            import time

            seeder.poll()
            st = seeder.status()
            line = (
                f"seeding: {st.peers} peers, up {human_bytes(st.upload_rate)}/s, "
                f"uploaded {human_bytes(st.uploaded)}, ratio {st.ratio:.2f}"
            )
            if sys.stderr.isatty():
                click.echo(f"\r{line}\033[K", err=True, nl=False)
            elif time.monotonic() - last_line[0] > 30:
                last_line[0] = time.monotonic()
                click.echo(line, err=True)

        _until_stopped(tick)
    finally:
        seeder.close()
    click.echo("stopped", err=True)


def main() -> None:
    cli(prog_name="shardtool")


if __name__ == "__main__":
    main()
