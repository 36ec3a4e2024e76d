"""Dividing each epoch's shards among the peers of a run through signed leases in the hivemind DHT.

No coordinator. Each epoch's order (a permutation seeded by run id, seed and epoch that all peers compute
alike) is cut into buckets of 32 shards, and each bucket has its own DHT key, `<run_id>_shards_e<E>_b<B>`,
where every peer that claims from it keeps one record (`hivetrain.dht.PeerRecord`) in a subkey signed
with its own key, rewritten whole on every change:

* its claims there, `(epoch, shard index, claim time)`, valid until `lease_until`; it renews them every
  `lease_s / 3`, so a dead peer's shards come free within `lease_s`;
* the shards it finished there; that record lives for hours, so finishing a shard (claims -> done) is
  one atomic write and counts after the peer is gone.

A claim round reads one bucket (a peer alone: the first one not done, so it reads the order exactly;
otherwise the one it last claimed from while that is open, else one at random among the first few open,
about a bucket per four peers: `leases.front`), picks at random among the first few free shards,
publishes its claim, re-reads after a short settle and backs off if an earlier claim (then the lower key)
holds the same shard: the DHT has no compare-and-swap. A bucket found with nothing to claim is left
alone, except that each round also re-reads the one found so longest ago (after `lease_s / 3`), which is
how lapsed claims are found. A peer that finished shards in a bucket and then finds it complete marks it
under `<run_id>_shards_e<E>`, and the last bucket of an epoch marks the epoch under
`<run_id>_shards_epochs`, where a joiner learns where the run is. So a claim reads and writes a bucket's
records, a few tens however many peers the run has; the marks key still holds a record per marking peer,
which grows with the swarm (`bench/swarm_sim.py`). When the current epoch has nothing left to claim,
peers start the next one rather than idle (at most two epochs are open at once). Work is taken, never
pre-assigned, so a faster peer reads more shards. Once no bucket of the current epoch has a free shard, a
peer of ordinary speed reads a second copy of a shard another peer has held for three times the run's
median hold (a straggler); the straggler, finding its claim backed up before it began the shard, gives it
up (`ShardAssigner.taken_elsewhere`), so the shard is read once, by the faster peer.

The decision itself (`hivetrain.leases`: `Board`, `current_epoch`, `choose`, `confirmed`) is pure and is
tested without a DHT. Around it, one file per concern:

    assigner.py   `ShardAssigner`: the claim protocol (claim rounds, renewal thread) and the public API
    holdings.py   `Holdings`: this peer's own claims and finished shards, the authority for its record
    store.py      `RecordStore`: how records are kept in the DHT; `BucketStore`, a key per bucket
    observer.py   `BoardObserver`: what changed between reads (epoch, peers, clocks, malformed and
                  abandoned records), logged once each

A checkpoint keeps the run's data position (`ShardAssigner.position()`). A peer started with one
(`resume=`) takes it only when the DHT holds no record of the run (every peer stopped): the run goes on in
that epoch without reading its done shards again. A peer restarted under its old key keeps the shards its
old record lists as finished.

Finished shards also go to `shards.jsonl` (`hivetrain.metrics.JsonLines`), one line each.
"""

from .assigner import LeaseTiming, ShardAssigner
from .holdings import Claim

__all__ = ["Claim", "LeaseTiming", "ShardAssigner"]
