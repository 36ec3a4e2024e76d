"""The streaming data pipeline: a live feed of local shard files -> webdataset stages -> batches.

Peers claim shards one at a time while they train, so the pipeline's source is a *feed* that the main
process fills (an iterable of local shard paths; the trainer's feed turns DHT claims into verified cache
files) and that DataLoader workers take from through a queue: each shard is read by exactly one worker.

    main process                                  DataLoader workers (0, 1, 2, ...)
    feed -> feeder thread -> job queue ---------> read_shards (wds.tarfile_samples, one shard at a time)
                                                  -> wds.shuffle -> wds.map(decode) -> wds.batched
    tracker <- items: batch + shard reports <----

Every sample carries its shard's ticket. Workers report, per shard, how many samples the tar held and
which failed to decode; the main-side tracker counts the samples the training loop consumed and emits
`ShardDone` once the last sample of a shard is consumed, i.e. when the loop comes back for the next
item after the batch that held it. That event is what the trainer hands to the shard assigner.

A corrupt sample (undecodable image, bad or missing label) is skipped and counted; a shard that holds
fewer samples than the manifest says (a truncated tar: Python's tarfile stops silently at a cut header)
is reported with the shortfall as `missing`. Validation (`train=False`) reads a fixed list of shards in
order, without shuffle, split statically over workers so that every pass yields the same batches.

Where things live:
    types.py    the public records: ShardRef (feed item), Batch, ShardDone, StreamStats, LoaderOptions
    stream.py   ShardStream (main process: feeder thread, DataLoader, completion tracker) and the
                manifest helpers shard_refs, train_stream, val_stream
    worker.py   what runs in each DataLoader worker: the webdataset stages and per-shard reports
    hivetrain/transforms.py  per-dataset decode and torchvision.transforms.v2 recipes
"""

from .stream import ShardStream, shard_refs, train_stream, val_stream
from .types import Batch, LoaderOptions, ShardDone, ShardRef, StreamStats

__all__ = [
    "Batch",
    "LoaderOptions",
    "ShardDone",
    "ShardRef",
    "ShardStream",
    "StreamStats",
    "shard_refs",
    "train_stream",
    "val_stream",
]
