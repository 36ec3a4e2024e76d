"""Shard-assignment peers in processes of their own, for the swarm fault tests, started in about a second.

Importing hivemind takes ~5 s on this machine, which a loop that kills a peer twenty times cannot pay
each time. `python -m tests.faults.swarm_peer zygote` imports it once, then reads one JSON line per
peer on stdin and forks that peer (in a new session, so that killing its process group also kills its
DHT process and p2p daemon), answering with the peer's pid. Each peer is the fake consumer of
tests/test_assign_dht.py (claim, "read" for a set time, complete) over a real DHT, logging its claims and
finished shards in its log folder.

`Zygote` is the test side: `spawn(...)` returns the pid (= process group) of a running peer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from tests.util import REPO


def _peer(args: dict) -> None:
    from hivetrain.assign import LeaseTiming, ShardAssigner
    from hivetrain.dht import make_dht
    from tests.test_assign_dht import consume, names

    log_dir = Path(args["log_dir"])
    dht = make_dht(run_id=args["run_id"], initial_peers=[args["initial_peer"]])
    timing = LeaseTiming(
        settle_s=0.05, poll_s=0.05, request_timeout_s=5, max_hold_s=args.get("max_hold", 1800.0)
    )
    assigner = ShardAssigner(
        names(args["shards"]),
        dht=dht,
        run_id=args["run_id"],
        lease_s=args["lease"],
        max_epochs=1,
        log_dir=log_dir,
        timing=timing,
    ).start()
    consume(assigner, args["read"], prefetch=args.get("prefetch", 2), claims_log=log_dir / "claims.jsonl")
    assigner.close()
    dht.shutdown()
    (log_dir / "finished").write_text("ok\n")


def _zygote() -> None:
    import hivemind  # noqa: F401  (the point: import once, fork many)

    import hivetrain.assign  # noqa: F401
    import tests.test_assign_dht  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they exit
    print("ready", flush=True)
    for line in sys.stdin:
        args = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            Path(args["log_dir"]).mkdir(parents=True, exist_ok=True)
            out = os.open(Path(args["log_dir"]) / "peer.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            code = 0
            try:
                _peer(args)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


class Zygote:
    """The test side of the zygote: start it once, spawn peers, kill whatever is left at the end."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.swarm_peer", "zygote"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.pids: list[int] = []
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the swarm peer zygote did not start")

    def spawn(self, **args) -> int:
        self.proc.stdin.write(
            json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in args.items()}) + "\n"
        )
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        self.pids.append(pid)
        return pid

    def close(self) -> None:
        for pid in [*self.pids, self.proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGCONT)
                os.killpg(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    _zygote()
