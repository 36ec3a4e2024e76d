"""hivetrain: decentralized training peers over shardtool shards and the hivemind DHT.

Where things live:
    data.py        WebDataset pipeline: shard paths -> decode -> torchvision transforms -> batches
    cache.py       bounded, locked local shard cache with background prefetch (uses shardtool.transport)
    assign.py      dividing each epoch's shards among peers with signed leases in the DHT
    train.py       model, hivemind.Optimizer, schedule, validation, checkpoints
    metrics.py     JSON-lines logs and the signed metric records peers publish to the DHT
    monitor/       `hivetrain monitor`: aggregation of the run's metrics and its web page
    cli.py         the `hivetrain` command
"""

__version__ = "0.1.0"
