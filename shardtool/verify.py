"""THE shard check: size, sha256, and sample count against the manifest.

`verify_shard` is the check every consumer runs (build on resume, fetch and seed, the hivetrain cache):
size first (free, and it catches the usual failure, a cut-off download), then sha256, which a caller that
trusts a file under a final name (it was verified before it was renamed there) leaves out with
`sha256=False`. `count_samples` reads the tar's headers (not its data) and counts samples the way
webdataset groups them; `shardtool verify` runs both (`check_shard`).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .fsutil import sha256_file
from .manifest import Manifest, Shard


def verify_shard(path: str | os.PathLike, shard: Shard, *, sha256: bool = True) -> str | None:
    """None if the file at `path` has the shard's size and sha256, else what is wrong (one short phrase).

    Args:
        sha256: hash the file too; False checks the size only (for files that were verified before they
            got their final name, where a size check catches what usually goes wrong: a truncated copy).
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot read ({e.strerror})"
    if size != shard.size:
        return f"size {size} bytes, expected {shard.size}"
    if not sha256:
        return None
    try:
        digest = sha256_file(path)
    except OSError as e:
        return f"cannot read ({e.strerror})"
    if digest != shard.sha256:
        return "sha256 differs from the manifest"
    return None


def sample_keys(path: str | os.PathLike) -> Iterator[str]:
    """The sample keys of a tar in order, grouped as webdataset does (member path up to the first dot of its
    file name; consecutive members sharing it form one sample)."""
    last = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            key = f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]
            if key != last:
                yield key
                last = key


def count_samples(path: str | os.PathLike) -> int:
    """Number of samples in a tar (headers only; the data is skipped)."""
    return sum(1 for _ in sample_keys(path))


def check_shard(path: str | os.PathLike, shard: Shard, *, count: bool = True) -> str | None:
    """`verify_shard`, then (if that passes and `count`) the sample count."""
    problem = verify_shard(path, shard)
    if problem is None and count:
        try:
            n = count_samples(path)
        except (tarfile.TarError, OSError) as e:
            return f"not a readable tar ({e})"
        if n != shard.num_samples:
            problem = f"{n} samples, expected {shard.num_samples}"
    return problem


def verify_manifest(
    manifest: Manifest, folder: str | os.PathLike | None = None, *, count: bool = True, progress: bool = True
) -> list[tuple[str, str]]:
    """Check every shard of `manifest` in `folder` (default: beside the manifest); [(shard name, problem)]."""
    base = Path(folder) if folder is not None else manifest.base_dir
    if base is None:
        raise ValueError("a manifest loaded from a URL needs the folder holding its shards")
    shards = [shard for _, shard in manifest.shards()]
    bad = []
    with tqdm(
        total=sum(s.size for s in shards),
        unit="B",
        unit_scale=True,
        desc="verify",
        disable=not progress or None,
    ) as bar:
        for shard in shards:
            problem = check_shard(base / shard.name, shard, count=count)
            if problem:
                bad.append((shard.name, problem))
            bar.update(shard.size)
    return bad
