"""The Debian tools the test suite needs beside the venv, in one table: installed by `make test`, and
named by the tests that skip without them.

    python tests/system_tools.py --install    # what `make test` runs first: apt-get install what is missing

Installing needs root (or sudo) and apt-get; elsewhere it prints one line saying what is missing and how
to install it, and the tests that need those tools skip with the same line. When every tool is present
it does nothing (no apt-get call), so a second `make test` starts at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

TOOLS = {
    # executable: (Debian package, what needs it)
    "curl": ("curl", "interop tests (HTTP client)"),
    "aria2c": ("aria2", "interop tests (stock BitTorrent/HTTP client)"),
    "opentracker": ("opentracker", "interop tests (stock BitTorrent tracker)"),
    "mktorrent": ("mktorrent", "interop tests (stock torrent maker)"),
    "chromium": ("chromium", "browser tests of the monitor page"),
    "chromedriver": ("chromium-driver", "browser tests of the monitor page"),
    "ip": ("iproute2", "emulated internet links (network namespaces)"),
    "tc": ("iproute2", "emulated internet links (bandwidth shaping)"),
}


def missing(tools: list[str] | None = None) -> list[str]:
    """The executables of `tools` (default: all) that are not on PATH (or in /usr/sbin, /sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [t for t in (tools or TOOLS) if shutil.which(t, path=path) is None]


def how_to_install(tools: list[str]) -> str:
    packages = sorted({TOOLS[t][0] for t in tools})
    return f"`apt-get install {' '.join(packages)}` (as root), or run `make test` as root"


def skip_unless(*tools: str) -> None:
    """Skip the calling test with one line naming the missing tools' packages and the command."""
    import pytest

    absent = missing(list(tools))
    if absent:
        pytest.skip(f"needs {', '.join(absent)}: install with {how_to_install(absent)}")


def install() -> int:
    """apt-get install the packages of missing tools when root (or sudo) and apt-get allow; else say so."""
    absent = missing()
    if not absent:
        return 0
    packages = sorted({TOOLS[t][0] for t in absent})
    if shutil.which("apt-get") is None:
        print(f"system tools missing ({', '.join(absent)}) and no apt-get: the tests that need them skip")
        return 0
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        print(f"system tools missing ({', '.join(absent)}); not root: install with {how_to_install(absent)}")
        return 0
    print(f"installing Debian packages for the tests: {' '.join(packages)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = [*sudo, "apt-get", "-q", "-o", "Dpkg::Use-Pty=0"]
    for command in ([*apt, "update"], [*apt, "install", "-y", "--no-install-recommends", *packages]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"`{' '.join(command)}` failed: the tests that need {', '.join(absent)} skip")
            return 0
    still = missing()
    if still:
        print(f"still missing after apt-get: {', '.join(still)}; the tests that need them skip")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit(__doc__)
    sys.exit(install())
