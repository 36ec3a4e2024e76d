"""The training feed: shard claims from the DHT turned into verified local files, a few shards ahead.

`ClaimFeed` is the iterable a `ShardStream` reads. It claims the next shard from the `ShardAssigner`,
starts its download in the shard cache at once, and yields `ShardRef`s (tagged with the claim) in
claim order, keeping shards claimed and downloading ahead so that reading never waits on the network
when the bandwidth allows: at least `depth`, and as many more as the reader gets through during one
claim round (`read_ahead`, from the measured claim rounds and shard reads). A shard that cannot be fetched from any source is released for others (their mirrors
may serve it) and counted; once this peer has failed to fetch it `max_failures` times it is recorded as
read with 0 samples and reported in `unavailable`, so that an epoch never waits forever for bytes that
no source has.
When the stream reports a shard finished, `finish` records it with the assigner and unpins it. A claimed
shard that another peer finished first, or holds as a backup reader of this peer's straggler, is given
back unread.
"""

from __future__ import annotations

import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from shardtool.errors import FetchError

from .assign import Claim, ShardAssigner
from .cache import ShardCache
from .data import ShardDone, ShardRef

log = logging.getLogger(__name__)

_Ahead = tuple[Claim, Future[Path]]
"""A claim and its download."""

MAX_READ_AHEAD = 16
"""The most shards held claimed ahead of the reader, whatever the claim rounds cost: each one is a
shard the others cannot read until this peer does (at an epoch's end, or if this peer dies)."""


def read_ahead(*, least: int, claim_s: float | None, read_s: float | None, most: int = MAX_READ_AHEAD) -> int:
    """Shards to hold claimed ahead of the reader: `least`, and as many more as it reads during one
    claim round, so that the next claims land before it runs dry.

    A claim round is a DHT round (publish, settle, re-read) of a second or so, but many seconds on a
    volunteer's link that an averaging round fills (14 s measured on a 10 Mbit/s emulated link, where a
    shard took 4.5 s to read): with a fixed read-ahead of two the reader waited a third of its time.

    Args:
        least: the floor (what the reader mixes at once, and one more).
        claim_s: the slowest recent claim round (None: none measured yet).
        read_s: the time the reader takes per shard, recently (None: not measured yet).
    """
    if not claim_s or not read_s:
        return least
    return max(least, min(most, least + math.ceil(claim_s / read_s)))


class ClaimFeed:
    """Claims -> local shard files, for one split.

    Args:
        assigner: hands out this peer's shards (DHT leases, or all shards when alone).
        cache: obtains verified local copies.
        split: the manifest split the assigner's shard names belong to.
        depth: the least shards claimed and downloading ahead of the one being read.
    """

    def __init__(
        self,
        assigner: ShardAssigner,
        cache: ShardCache,
        *,
        split: str = "train",
        depth: int = 2,
        max_failures: int = 3,
    ):
        self.assigner, self.cache, self.depth = assigner, cache, max(1, depth)
        self.max_failures = max_failures
        self._shards = {s.name: s for s in cache.manifest.split(split).shards}
        self._stop = threading.Event()
        self._failures: dict[str, int] = {}
        self.fetch_failures = 0
        self.unavailable: list[str] = []
        self.shards_read = 0
        self.samples_read = 0
        self._room = threading.Condition()
        self._outstanding = 0  # claims taken and not yet finished, released or failed
        self._finished_at: deque[float] = deque(maxlen=9)  # when recent shards were finished (monotonic)

    @property
    def depth_now(self) -> int:
        """The read-ahead the feed keeps now (`read_ahead` of what it measured)."""
        with self._room:
            claim_s = max(self.assigner.claim_rounds_s, default=None)
            gaps = [b - a for a, b in zip(self._finished_at, list(self._finished_at)[1:])]
        return read_ahead(least=self.depth, claim_s=claim_s, read_s=statistics.median(gaps) if gaps else None)

    def __iter__(self) -> Iterator[ShardRef]:
        """The claimed shards, in claim order, once each is downloaded and verified.

        A thread claims ahead: a claim is a DHT round (publish, settle, re-read) of a second or more,
        many seconds on a link busy with an averaging round, and the reader must not wait on it while
        a claimed shard is ready. `depth_now` claims are held ahead of the reader at a time."""
        ahead: queue.Queue[_Ahead | None] = queue.Queue()
        done = threading.Event()
        threading.Thread(
            target=self._claim_ahead, args=(ahead, done), name="claim-ahead", daemon=True
        ).start()
        try:
            while (entry := self._take(ahead)) is not None:
                claim, future = entry
                shard = self._shards[claim.shard]
                if self.assigner.taken_elsewhere(claim):  # a backup reader took it over
                    log.info(
                        "%s of epoch %d was taken over by another peer (read, or being read): skipping it",
                        claim.shard,
                        claim.epoch,
                    )
                    self._release(claim, future)
                    continue
                try:
                    path = future.result()
                except FetchError as e:
                    self._failed(claim, e)
                    continue
                yield ShardRef(path, shard.name, shard.num_samples, tag=claim)
        finally:
            done.set()
            self._give_back(ahead)

    def _claim_ahead(self, ahead: queue.Queue[_Ahead | None], done: threading.Event) -> None:
        """The claiming thread: claim, start the download, queue; None queued once the run is over."""
        try:
            while not (done.is_set() or self._stop.is_set()):
                with self._room:
                    while (room := self.depth_now - self._outstanding) <= 0 and not (
                        done.is_set() or self._stop.is_set()
                    ):
                        self._room.wait(0.2)
                claim = self.assigner.next_claim(batch=room)  # None: the run is over, or the assigner closed
                with self._room:
                    self._outstanding += claim is not None
                entry = None if claim is None else (claim, self.cache.prefetch(self._shards[claim.shard]))
                if done.is_set() or self._stop.is_set():
                    if entry is not None:
                        self._release(*entry)
                    return
                ahead.put(entry)
                if entry is None:
                    return
        finally:
            if done.is_set() or self._stop.is_set():
                self._give_back(ahead)  # what it queued after the reader left

    def _take(self, ahead: queue.Queue[_Ahead | None]) -> _Ahead | None:
        while not self._stop.is_set():
            try:
                return ahead.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def _give_back(self, ahead: queue.Queue[_Ahead | None]) -> None:
        while True:
            try:
                entry = ahead.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                self._release(*entry)

    def _settled(self, *, read: bool) -> None:
        """A claim is over (read, given back or failed): room for another."""
        with self._room:
            self._outstanding -= 1
            if read:
                self._finished_at.append(time.monotonic())
            self._room.notify_all()

    def _release(self, claim: Claim, _download) -> None:
        self.cache.unpin(claim.shard)
        self.assigner.release(claim)
        self._settled(read=False)

    def _failed(self, claim: Claim, e: FetchError) -> None:
        """A shard no source served: back to the run, or after `max_failures` recorded as read, empty."""
        self.fetch_failures += 1
        self.cache.unpin(claim.shard)
        self._settled(read=False)
        failures = self._failures[claim.shard] = self._failures.get(claim.shard, 0) + 1
        if failures < self.max_failures:
            log.warning("giving %s back to the run (failure %d): %s", claim.shard, failures, e.reason)
            self.assigner.release(claim)
        else:
            log.error(
                "skipping %s in epoch %d: no source has good bytes: %s", claim.shard, claim.epoch, e.reason
            )
            self.unavailable.append(claim.shard)
            self.assigner.complete(claim, 0)

    def finish(self, done: ShardDone) -> None:
        """The stream consumed every sample of a shard: record it as read and let the cache evict it."""
        self.cache.unpin(done.shard)
        if done.error or done.missing:
            log.warning(
                "%s: %s (error: %s)", done.shard, done, done.error or "fewer samples than the manifest"
            )
        self.assigner.complete(done.tag, done.samples)
        self.shards_read += 1
        self.samples_read += done.samples
        self._settled(read=True)

    def stop(self) -> None:
        """Stop claiming; the shards claimed ahead are released."""
        self._stop.set()
