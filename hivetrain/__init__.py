"""hivetrain: decentralized training peers over shardtool shards and the hivemind DHT.

Where things live:
    options.py     every setting of a peer (default, help, flag): the CLI's options come from it
    dht.py         joining a run's DHT: signed, schema-checked records; start-up failures explained;
                   rejoining the initial peers after a link outage
    assign/        dividing each epoch's shards among peers with signed leases in the DHT
    leases.py      the lease decision itself, pure: records + time -> next shard, epoch state
    cache.py       bounded local shard cache: verified copies, on-demand fetch (shardtool.transport)
    feed.py        claims -> cached shard files, a few shards ahead: what the training stream reads
    data/          WebDataset pipeline: shard files -> decode -> torchvision transforms -> batches
    transforms.py  per-dataset decode and augmentation recipes
    recipe.py      per-dataset training recipes: model, optimizer settings, learning-rate schedule
    checkpoint.py  latest/best checkpoints, written atomically, checked against the run
    sync/          how peers combine their work: every-step (hivemind.Optimizer), diloco (local steps,
                   outer step, averaged in the background); the round rules pure in sync/rounds.py
    train.py       one training peer, assembled from the pieces above: training loop, validation
    accounting.py  where a peer's time goes (computing, waiting), its traffic per second and per sample
    traffic.py     bytes sent and received, from the kernel's TCP counters of the p2p daemon
    metrics.py     JSON-lines logs and the signed metric records peers publish to the DHT
    monitor/       `hivetrain monitor`: aggregation of the run's metrics and its web page
    demo.py        `make demo`: the whole system on one machine
    cli.py         the `hivetrain` command
"""

__version__ = "0.1.0"
