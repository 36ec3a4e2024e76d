"""hivetrain: decentralized training peers over shardtool shards and the hivemind DHT.

Where things live:
    dht.py         joining a run's DHT: signed, schema-checked records; start-up failures explained
    assign/        dividing each epoch's shards among peers with signed leases in the DHT
    leases.py      the lease decision itself, pure: records + time -> next shard, epoch state
    cache.py       bounded local shard cache: verified copies, on-demand fetch (shardtool.transport)
    feed.py        claims -> cached shard files, a few shards ahead: what the training stream reads
    data/          WebDataset pipeline: shard files -> decode -> torchvision transforms -> batches
    transforms.py  per-dataset decode and augmentation recipes
    recipe.py      per-dataset training recipes: model, optimizer settings, learning-rate schedule
    checkpoint.py  latest/best checkpoints, written atomically, checked against the run
    train.py       one training peer: the pieces above + hivemind.Optimizer, validation, shutdown
    metrics.py     JSON-lines logs and the signed metric records peers publish to the DHT
    monitor/       `hivetrain monitor`: aggregation of the run's metrics and its web page
    demo.py        `make demo`: the whole system on one machine
    cli.py         the `hivetrain` command
"""

__version__ = "0.1.0"
