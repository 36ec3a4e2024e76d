"""The manifest: the one description of a shard set, read and written only here.

`manifest.json` lists, per split, every shard's name, size, sha256 and sample count, the class list
(index = position), the build options, the files skipped during the build, and where the shards can be
fetched (HTTP base URLs and a torrent per split). It is versioned; loading validates everything that
could hurt a consumer, because manifests travel between strangers: shard names must be plain file names
(no `/`, `..`, NUL or absolute paths), numbers must be sane, hashes well formed.

Example (abridged)::

    {"format": "shardtool-manifest", "version": 1, "dataset": "tiny-imagenet-200", "layout": "tiny-imagenet",
     "classes": [{"id": "n01443537", "name": "goldfish"}, ...],
     "build": {"seed": 0, "shard_size": 268435456, ...},
     "splits": {"train": {"num_samples": 100000, "num_bytes": 254000000, "labeled": true,
                          "shards": [{"name": "train-000000.tar", "size": 254000000,
                                      "sha256": "…", "num_samples": 100000}]}},
     "skipped": [{"path": "train/n01443537/images/bad.JPEG", "reason": "truncated JPEG"}],
     "sources": {"http": ["http://127.0.0.1:8080/"], "torrents": {"train": {"infohash": "…", ...}}}}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .fsutil import atomic_write_text

FORMAT = "shardtool-manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"

MAX_MANIFEST_BYTES = 64 << 20
MAX_SHARD_BYTES = 1 << 40
MAX_SHARD_SAMPLES = 50_000_000
MAX_SHARDS_PER_SPLIT = 1_000_000
MAX_CLASSES = 1_000_000
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.tar")
_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INFOHASH = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Shard:
    """One tar file of a split."""

    name: str
    size: int
    sha256: str
    num_samples: int


@dataclass(frozen=True)
class ClassInfo:
    """A class: its id (wnid or folder name) and a human-readable name. Its index is its list position."""

    id: str
    name: str


@dataclass
class Split:
    """The shards of one split, in order. `labeled` is false for splits without labels (Tiny-ImageNet test)."""

    shards: list[Shard]
    labeled: bool = True

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.size for s in self.shards)


@dataclass
class TorrentInfo:
    """The torrent of one split: its v1 info-hash, magnet link, and .torrent file next to the manifest."""

    infohash: str
    magnet: str
    file: str
    name: str


@dataclass
class Sources:
    """Where shards can be fetched: HTTP base URLs (shard URL = base + name) and per-split torrents."""

    http: list[str] = field(default_factory=list)
    torrents: dict[str, TorrentInfo] = field(default_factory=dict)


@dataclass
class Manifest:
    """A validated manifest. `origin` (not serialised) is where it was loaded from: a path or URL."""

    dataset: str
    layout: str
    classes: list[ClassInfo]
    splits: dict[str, Split]
    build: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sources: Sources = field(default_factory=Sources)
    origin: str | None = field(default=None, compare=False)

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        """The named split, or a ManifestError listing the ones that exist."""
        try:
            return self.splits[name]
        except KeyError:
            have = ", ".join(sorted(self.splits)) or "none"
            raise ManifestError(f"{self.origin or 'manifest'}: no split {name!r} (it has: {have})") from None

    def shards(self, split: str | None = None) -> Iterator[tuple[str, Shard]]:
        """(split name, shard) pairs, of one split or of all splits in manifest order."""
        names = [split] if split is not None else list(self.splits)
        for name in names:
            for shard in self.split(name).shards:
                yield name, shard

    def find_shard(self, name: str) -> tuple[str, Shard]:
        """Look a shard up by file name."""
        for split, shard in self.shards():
            if shard.name == name:
                return split, shard
        raise ManifestError(f"{self.origin or 'manifest'}: no shard named {name!r}")

    @property
    def base_dir(self) -> Path | None:
        """The local folder the manifest was loaded from (shards sit beside it), if it is local."""
        if self.origin is None or is_url(self.origin):
            return None
        return Path(self.origin).parent

    def fingerprint(self) -> str:
        """A short hash of what the data *is* (dataset, classes, shard hashes), not where it comes from.

        Checkpoints record it so that training never resumes on a different dataset by mistake.
        """
        body = {
            "dataset": self.dataset,
            "classes": [c.id for c in self.classes],
            "splits": {k: [s.sha256 for s in v.shards] for k, v in sorted(self.splits.items())},
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "dataset": self.dataset,
            "layout": self.layout,
            "classes": [{"id": c.id, "name": c.name} for c in self.classes],
            "build": self.build,
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "num_bytes": split.num_bytes,
                    "labeled": split.labeled,
                    "shards": [
                        {"name": s.name, "size": s.size, "sha256": s.sha256, "num_samples": s.num_samples}
                        for s in split.shards
                    ],
                }
                for name, split in self.splits.items()
            },
            "skipped": self.skipped,
            "sources": {
                "http": list(self.sources.http),
                "torrents": {
                    name: {"infohash": t.infohash, "magnet": t.magnet, "file": t.file, "name": t.name}
                    for name, t in self.sources.torrents.items()
                },
            },
        }

    def to_json(self) -> str:
        """Canonical text: the same manifest always gives the same bytes."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file, then rename)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, origin: str | None = None) -> Manifest:
        """Validate a decoded manifest; any problem is a ManifestError naming `origin` and the field."""
        return _Parser(origin or "manifest").manifest(data)

    @classmethod
    def from_json(cls, text: str | bytes, origin: str | None = None) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{origin or 'manifest'}: not valid JSON ({e})") from None
        except RecursionError:  # `[[[[...` a few thousand deep: no manifest is nested like that
            raise ManifestError(f"{origin or 'manifest'}: not valid JSON (nested too deeply)") from None
        return cls.from_dict(data, origin)


def load(location: str | os.PathLike, *, timeout: float = 30.0) -> Manifest:
    """Load and validate a manifest from a file, a folder holding manifest.json, or an http(s) URL.

    A manifest fetched by URL with no HTTP sources of its own gets the URL's folder as its HTTP source,
    so `hivetrain run --shards http://host:8080/manifest.json` streams from the server that served it.
    """
    location = os.fspath(location)
    if is_url(location):
        return _load_url(location, timeout)
    path = Path(location)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    return Manifest.from_json(data, origin=str(path))


def is_url(location: str) -> bool:
    """Is `location` an http(s) URL (rather than a local path)? The one test every module uses."""
    return location.startswith(("http://", "https://"))


def _load_url(url: str, timeout: float) -> Manifest:
    # urllib rather than httpx: one small GET, and no SSL context or async imports at every CLI start.
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(MAX_MANIFEST_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ManifestError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ManifestError(f"{url}: cannot fetch ({reason})") from None
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{url}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    manifest = Manifest.from_json(body, origin=url)
    if not manifest.sources.http:
        manifest.sources.http.append(url.rsplit("/", 1)[0] + "/")
    return manifest


def validate_shard_name(name: Any, where: str = "manifest") -> str:
    """Accept only plain shard file names: no path separators, `..`, NUL, or absolute paths."""
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or ".." in name:
        raise ManifestError(f"{where}: unsafe or malformed shard name {name!r:.80}")
    return name


class _Parser:
    """Validation of untrusted manifest data, with error messages that say where the problem is."""

    def __init__(self, origin: str):
        self.origin = origin

    def fail(self, problem: str) -> ManifestError:
        return ManifestError(f"{self.origin}: {problem}")

    def obj(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be an object")
        return value

    def integer(self, value: Any, what: str, maximum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise self.fail(f"{what} must be an integer between 0 and {maximum}, not {value!r:.40}")
        return value

    def text(self, value: Any, what: str, max_len: int = 4096) -> str:
        if not isinstance(value, str) or len(value) > max_len or "\x00" in value:
            raise self.fail(f"{what} must be a string of at most {max_len} characters")
        return value

    def manifest(self, data: Any) -> Manifest:
        data = self.obj(data, "the manifest")
        if data.get("format") != FORMAT:
            raise self.fail(
                f"not a shardtool manifest (format is {data.get('format')!r:.40}, expected {FORMAT!r})"
            )
        version = data.get("version")
        if version != VERSION:
            raise self.fail(
                f"manifest version {version!r:.20} is not supported (this shardtool reads {VERSION})"
            )
        classes_raw = data.get("classes")
        if not isinstance(classes_raw, list) or len(classes_raw) > MAX_CLASSES:
            raise self.fail(f"classes must be a list of at most {MAX_CLASSES} classes")
        classes = []
        for i, c in enumerate(classes_raw):
            c = self.obj(c, f"classes[{i}]")
            classes.append(
                ClassInfo(
                    self.text(c.get("id"), f"classes[{i}].id", 256),
                    self.text(c.get("name"), f"classes[{i}].name", 1024),
                )
            )
        splits_raw = self.obj(data.get("splits"), "splits")
        splits = {}
        seen: set[str] = set()
        for name, raw in splits_raw.items():
            if not _SPLIT_NAME.fullmatch(name):
                raise self.fail(f"bad split name {name!r:.40}")
            splits[name] = self.split(name, self.obj(raw, f"splits.{name}"), seen)
        build = self.obj(data.get("build", {}), "build")
        skipped_raw = data.get("skipped", [])
        if not isinstance(skipped_raw, list):
            raise self.fail("skipped must be a list")
        skipped = []
        for i, s in enumerate(skipped_raw):
            s = self.obj(s, f"skipped[{i}]")
            skipped.append(
                {
                    "path": self.text(s.get("path"), f"skipped[{i}].path"),
                    "reason": self.text(s.get("reason"), f"skipped[{i}].reason"),
                }
            )
        return Manifest(
            dataset=self.text(data.get("dataset"), "dataset", 256),
            layout=self.text(data.get("layout"), "layout", 64),
            classes=classes,
            splits=splits,
            build=build,
            skipped=skipped,
            sources=self.sources(data.get("sources", {}), splits),
            origin=self.origin,
        )

    def split(self, name: str, raw: dict[str, Any], seen: set[str]) -> Split:
        shards_raw = raw.get("shards")
        if not isinstance(shards_raw, list) or len(shards_raw) > MAX_SHARDS_PER_SPLIT:
            raise self.fail(f"splits.{name}.shards must be a list of at most {MAX_SHARDS_PER_SPLIT} shards")
        shards = []
        for i, s in enumerate(shards_raw):
            where = f"splits.{name}.shards[{i}]"
            s = self.obj(s, where)
            shard_name = validate_shard_name(s.get("name"), f"{self.origin}: {where}")
            if shard_name in seen:
                raise self.fail(f"{where}: shard name {shard_name!r} appears twice")
            seen.add(shard_name)
            sha = s.get("sha256")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise self.fail(f"{where}.sha256 must be 64 lowercase hex digits")
            shards.append(
                Shard(
                    shard_name,
                    self.integer(s.get("size"), f"{where}.size", MAX_SHARD_BYTES),
                    sha,
                    self.integer(s.get("num_samples"), f"{where}.num_samples", MAX_SHARD_SAMPLES),
                )
            )
        split = Split(shards, labeled=bool(raw.get("labeled", True)))
        for key, actual in (("num_samples", split.num_samples), ("num_bytes", split.num_bytes)):
            if key in raw and raw[key] != actual:
                raise self.fail(f"splits.{name}.{key} is {raw[key]!r:.40} but its shards add up to {actual}")
        return split

    def sources(self, raw: Any, splits: dict[str, Split]) -> Sources:
        raw = self.obj(raw, "sources")
        http = raw.get("http", [])
        if not isinstance(http, list):
            raise self.fail("sources.http must be a list of URLs")
        for url in http:
            if not isinstance(url, str) or not is_url(url):
                raise self.fail(f"sources.http: {url!r:.80} is not an http(s) URL")
        torrents = {}
        for split, t in self.obj(raw.get("torrents", {}), "sources.torrents").items():
            if split not in splits:
                raise self.fail(f"sources.torrents names unknown split {split!r:.40}")
            t = self.obj(t, f"sources.torrents.{split}")
            infohash = t.get("infohash")
            if not isinstance(infohash, str) or not _INFOHASH.fullmatch(infohash):
                raise self.fail(f"sources.torrents.{split}.infohash must be 40 lowercase hex digits")
            file = t.get("file")
            if (
                not isinstance(file, str)
                or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.torrent", file)
                or ".." in file
            ):
                raise self.fail(f"sources.torrents.{split}.file: unsafe or malformed name {file!r:.80}")
            torrents[split] = TorrentInfo(
                infohash,
                self.text(t.get("magnet"), f"sources.torrents.{split}.magnet"),
                file,
                self.text(t.get("name"), f"sources.torrents.{split}.name", 256),
            )
        return Sources(http=list(http), torrents=torrents)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as download tools show them)."""
    if n < 1000:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1000)), 4)
    return f"{n / 1000**exp:.1f} {'KMGT'[exp - 1]}B"
