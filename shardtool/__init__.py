"""shardtool: reproducible WebDataset shards and their verified distribution.

Where things live:
    manifest.py     the one reader, writer and validator of manifest.json (hivetrain uses it too)
    definitions     known datasets (top-level manifests/ folder): class counts and expected sizes
    sources/        one module per input layout, each yielding records (key, image bytes, class, meta),
                    and the layout table (layouts.py) that detection and `--layout` read
    images.py       checking and normalising one image (keep valid JPEG bytes, convert the rest)
    check.py        checking a split's records in worker processes, in a fixed order
    writer.py       reproducible tar shards (fixed headers, hashed while written)
    build.py        shuffle, pack into shards by size, report; the `build` entry point
    journal.py      the finished shards of a build in progress, so that a rerun resumes it
    verify.py       size, sha256 and sample-count checks of shards against the manifest
    transport/      HTTP and BitTorrent: serve, fetch, torrent, seed
    fsutil.py       crash-safe writes and hashing shared by all of the above
    cli.py          the `shardtool` command (thin: parse, call, report)
"""

__version__ = "0.1.0"
