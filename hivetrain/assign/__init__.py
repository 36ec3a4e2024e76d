"""Dividing each epoch's shards among the peers of a run through signed leases in the hivemind DHT.

No coordinator. Every peer publishes one record (`hivetrain.dht.PeerRecord`) under the key
`<run_id>_shards`, in a subkey signed with its own key, and rewrites it whole on every change:

* its claims, `(epoch, shard index, claim time)`, valid until `lease_until`; it renews them every
  `lease_s / 3`, so a dead peer's shards come free within `lease_s`;
* the shards it finished in the epochs still open and the last epoch it saw complete; the record
  lives for hours, so a joining peer learns the current epoch and what is left, and finishing a shard
  (claims -> done) is one atomic write.

A peer reads all records with one `get`, picks at random among the first few free shards of the epoch's
order (a permutation seeded by run id, seed and epoch that all peers compute alike), publishes its claim,
re-reads after a short settle and backs off if an earlier claim (then the lower key) holds the same
shard: the DHT has no compare-and-swap. When the current epoch has no free shard left, peers start the
next one rather than idle (at most two epochs are open at once), and shards of the older epoch whose
leases expire are taken first. Work is taken, never pre-assigned, so a faster peer reads more shards.

The decision itself (`hivetrain.leases`: `Board`, `current_epoch`, `choose`, `confirmed`) is pure and is
tested without a DHT. Around it, one file per concern:

    assigner.py   `ShardAssigner`: the claim protocol (claim rounds, renewal thread) and the public API
    holdings.py   `Holdings`: this peer's own claims and finished shards, the authority for its record
    store.py      `RecordStore`: how records are kept in the DHT; `SingleKeyStore`, all under one key
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
