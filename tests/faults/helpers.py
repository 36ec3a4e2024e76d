"""What several fault tests share: reading shards back, waiting for process groups, measuring peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from shardtool.manifest import load
from shardtool.verify import verify_shard
from tests.util import REPO, wait_until


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    """Wait until every process of the group (workers, DHT daemons) has exited."""
    wait_until(lambda: not group_alive(pgid), timeout=timeout, what=f"process group {pgid} to exit")


def shard_map(manifest_dir: Path) -> dict[str, object]:
    """Shard name -> Shard entry of a manifest."""
    return {s.name: s for _, s in load(manifest_dir / "manifest.json").shards()}


def bad_finals(directory: Path, reference: dict[str, object]) -> list[str]:
    """Files under a final shard name in `directory` that do not match the reference build."""
    bad = []
    for path in sorted(directory.glob("*.tar")):
        expected = reference.get(path.name)
        if expected is None or verify_shard(path, expected) is not None:
            bad.append(path.name)
    return bad


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.tmp"))


def samples_by_source(manifest_dir: Path) -> dict[str, bytes]:
    """Every stored sample of every shard: its source name (from its .json) -> its image bytes."""
    out: dict[str, bytes] = {}
    for _, shard in load(manifest_dir / "manifest.json").shards():
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(manifest_dir / shard.name) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for fields in members.values():
            meta = json.loads(fields["json"])
            out[meta["source"]] = fields.get("jpg", fields.get("png"))
    return out


def peak_rss_mb(
    code: str, *, limit_as: int | None = None, timeout: float = 120
) -> tuple[int, float, str, str]:
    """Run `code` in a fresh Python (optionally under RLIMIT_AS); (exit code, peak RSS in MB, stdout, stderr).

    The peak is VmHWM, the high-water mark of this process image: ru_maxrss would include the RSS of the
    parent it was forked from.
    """
    wrapper = (
        "import resource, sys\n"
        + (f"resource.setrlimit(resource.RLIMIT_AS, ({limit_as}, {limit_as}))\n" if limit_as else "")
        + "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "finally:\n"
        + "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0].split()[1]\n"
        + "    print('PEAK', hwm, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    peaks = [line for line in proc.stderr.splitlines() if line.startswith("PEAK ")]
    peak = int(peaks[-1].split()[1]) / 1024 if peaks else float("nan")
    return proc.returncode, peak, proc.stdout, proc.stderr
