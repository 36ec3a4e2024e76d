"""The training feed: shard claims from the DHT turned into verified local files, a few shards ahead.

`ClaimFeed` is the iterable a `ShardStream` reads. It claims the next shard from the `ShardAssigner`,
starts its download in the shard cache at once, and yields `ShardRef`s (tagged with the claim) in
claim order, keeping `depth` downloads in flight so that reading never waits on the network when the
bandwidth allows. A shard that cannot be fetched from any source is released for others (their mirrors
may serve it) and counted; once this peer has failed to fetch it `max_failures` times it is recorded as
read with 0 samples and reported in `unavailable`, so that an epoch never waits forever for bytes that
no source has.
When the stream reports a shard finished, `finish` records it with the assigner and unpins it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator

from shardtool.errors import FetchError

from .assign import Claim, ShardAssigner
from .cache import ShardCache
from .data import ShardDone, ShardRef

log = logging.getLogger(__name__)


class ClaimFeed:
    """Claims -> local shard files, for one split.

    Args:
        assigner: hands out this peer's shards (DHT leases, or all shards when alone).
        cache: obtains verified local copies.
        split: the manifest split the assigner's shard names belong to.
        depth: shards claimed and downloading ahead of the one being read.
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

    def __iter__(self) -> Iterator[ShardRef]:
        pending: deque[tuple[Claim, object]] = deque()
        exhausted = False
        while not self._stop.is_set():
            while not exhausted and len(pending) < self.depth and not self._stop.is_set():
                # With downloads in flight, only take a shard that is free now; else wait for one.
                claim = self.assigner.next_claim(timeout=0.0 if pending else None)
                if claim is None:
                    exhausted = not pending  # a blocking call returned None: the run is over
                    break
                pending.append((claim, self.cache.prefetch(self._shards[claim.shard])))
            if not pending:
                if exhausted:
                    return
                continue
            claim, future = pending.popleft()
            shard = self._shards[claim.shard]
            try:
                path = future.result()
            except FetchError as e:
                self.fetch_failures += 1
                self.cache.unpin(claim.shard)
                failures = self._failures[claim.shard] = self._failures.get(claim.shard, 0) + 1
                if failures < self.max_failures:
                    log.warning("giving %s back to the run (failure %d): %s", claim.shard, failures, e.reason)
                    self.assigner.release(claim)
                else:
                    log.error(
                        "skipping %s in epoch %d: no source has good bytes: %s",
                        claim.shard,
                        claim.epoch,
                        e.reason,
                    )
                    self.unavailable.append(claim.shard)
                    self.assigner.complete(claim, 0)
                continue
            yield ShardRef(path, shard.name, shard.num_samples, tag=claim)
        for claim, _ in pending:
            self.cache.unpin(claim.shard)
            self.assigner.release(claim)

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

    def stop(self) -> None:
        """Stop claiming; the shards claimed ahead are released."""
        self._stop.set()
