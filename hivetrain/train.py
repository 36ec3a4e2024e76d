"""One training peer: stream claimed shards into a model trained with `hivemind.Optimizer`.

    Peer.start()  joins the DHT (prints the addresses others pass as --initial-peer), builds the model
                  and optimizer, resumes a checkpoint or downloads the current state from peers
    Peer.run()    claims shards (ShardAssigner) -> verified local copies (ShardCache, ClaimFeed) ->
                  batches (ShardStream) -> forward/backward -> opt.step(); validates every
                  `val_interval` global steps, writes metrics.jsonl and checkpoints
    Peer.close()  releases unfinished shard claims, saves `latest`, leaves the DHT

The global step is hivemind's `local_epoch` (one step per `target_global_bsz` samples across all peers);
the learning-rate schedule, validation and the end of training follow it, so late joiners follow the
same schedule and all peers stop at the same step: `epochs` x train samples / `target_global_bsz` steps.
(hivemind may average more than the target per step when several peers finish a batch at once, so
the data epochs that the assigner hands out, one pass over the shards each, can outnumber `epochs`.)
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import torch
from hivemind.compression import Float16Compression
from hivemind.utils.multiaddr import Multiaddr
from torch import nn

from shardtool import manifest as manifest_io

from . import checkpoint
from . import recipe as recipes
from .assign import ShardAssigner
from .cache import ShardCache
from .data import LoaderOptions, ShardDone, ShardRef, ShardStream, train_stream
from .dht import make_dht, visible_addresses
from .errors import DataError, HivetrainError
from .feed import ClaimFeed
from .metrics import JsonLines, MetricsPublisher, MetricsRecords, Rate, describe_device
from .transforms import recipe_for as image_recipe_for

log = logging.getLogger(__name__)

FEED_DEPTH = 2
"""Shards claimed and downloading ahead of the one being read."""


@dataclass(frozen=True)
class NetworkOptions:
    """How this peer joins the run (see `hivetrain run --help`)."""

    run_id: str = "hivetrain"
    name: str | None = None  # shown by the monitor; default: the host name
    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    client_mode: bool = False
    identity: str | None = None
    use_auto_relay: bool = False
    lease_s: float = 30.0
    matchmaking_time: float = 15.0
    averaging_timeout: float = 60.0


@dataclass(frozen=True)
class TrainOptions:
    """What and how this peer trains; None fields take the dataset's recipe default."""

    shards: str
    split: str = "train"
    val_split: str = "val"
    model: str | None = None
    batch: int | None = None
    lr: float | None = None
    epochs: int | None = None
    target_global_bsz: int | None = None
    image_size: int | None = None
    val_interval: int | None = None
    max_steps: int | None = None
    checkpoint_dir: str | None = None
    resume_from: str | None = None
    weights: str | None = None
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    workers: int = 2
    decode: str = "cpu"
    cache_dir: str | None = None
    cache_limit: int | None = None
    log_dir: str = "logs"
    mirrors: tuple[str, ...] = ()
    via: str = "auto"
    seed: int = 0


@dataclass
class Summary:
    """What a peer did, for the CLI's last lines and for tests."""

    global_step: int = 0
    local_steps: int = 0
    samples: int = 0
    shards_read: int = 0
    skipped_steps: int = 0
    val: dict[str, float] = field(default_factory=dict)
    best_acc1: float = 0.0


class Peer:
    """A training peer. Use as `with Peer(options, network) as peer: peer.run()`."""

    def __init__(self, options: TrainOptions, network: NetworkOptions = NetworkOptions()):
        self.options, self.network = options, network
        self.stop_event = threading.Event()
        self.summary = Summary()
        self._closed = False
        self.dht = self.opt = self.assigner = self.feed = self.cache = self.metrics = self._stream = None
        self.publisher: MetricsPublisher | None = None

    # ---- set-up ---------------------------------------------------------------------------------

    def start(self) -> Peer:
        o = self.options
        self.log_dir = Path(o.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest_io.load(o.shards)
        train_split = self.manifest.split(o.split)
        self.has_val = o.val_split in self.manifest.splits and self.manifest.split(o.val_split).labeled
        self.recipe = recipes.training_recipe(
            self.manifest, model=o.model, batch=o.batch, lr=o.lr, epochs=o.epochs,
            target_global_bsz=o.target_global_bsz, image_size=o.image_size,
        )  # fmt: skip
        self.device = _pick_device(o.device)
        self.amp = o.amp and self.device.type == "cuda"
        if o.amp and not self.amp:
            log.warning("--amp needs a CUDA device; training in float32 on %s", self.device)
        samples = train_split.num_samples
        self.total_steps = recipes.total_steps(self.recipe, samples)
        if o.max_steps is not None:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.val_interval = o.val_interval or max(1, samples // self.recipe.target_global_bsz)
        self.identity = checkpoint.Identity(
            self.manifest.dataset, self.manifest.fingerprint(), self.recipe.model,
            self.manifest.num_classes, self.recipe.image_size,
        )  # fmt: skip
        resume = checkpoint.load(o.resume_from, expect=self.identity) if o.resume_from else None
        if o.checkpoint_dir and (stale := checkpoint.remove_stale_temps(o.checkpoint_dir)):
            log.info("removed %d unfinished checkpoint file(s) from %s", len(stale), o.checkpoint_dir)

        self._join()
        self.model = recipes.build_model(self.recipe, self.manifest.num_classes)
        if o.weights:
            checkpoint.load_weights(self.model, o.weights)
        if resume is not None:
            self.model.load_state_dict(resume["model"])
        self.model.to(self.device)
        if o.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.opt = self._optimizer()
        self._batchnorm = recipes.batchnorm_buffers(self.model, counters=True)  # on the device, as trained
        self.best_acc1 = 0.0
        if resume is not None:
            self.opt.load_state_dict(resume["optimizer"])
            self.best_acc1 = float(resume.get("best_acc1", 0.0))
            log.info("resumed from %s at global step %d", o.resume_from, self.opt.local_epoch)
        self._catch_up()

        cache_dir = Path(o.cache_dir) if o.cache_dir else self.log_dir / "cache"
        self.cache = ShardCache(
            self.manifest, cache_dir, limit_bytes=o.cache_limit, mirrors=o.mirrors, via=o.via
        )
        self.assigner = ShardAssigner(
            [s.name for s in train_split.shards], dht=self.dht, run_id=self.network.run_id,
            lease_s=self.network.lease_s, seed=o.seed, log_dir=self.log_dir, max_epochs=None,
            batch=FEED_DEPTH,  # claim the shards the feed reads ahead in one DHT round
        )  # fmt: skip
        self.feed = ClaimFeed(self.assigner, self.cache, split=o.split, depth=FEED_DEPTH)
        self.metrics = JsonLines(self.log_dir / "metrics.jsonl")
        log.info(
            "training %s on %s (%d classes, %d train samples): %s at %d px, batch %d, global batch %d, "
            "peak lr %.3g, %d global steps, device %s",
            self.manifest.dataset, o.shards, self.manifest.num_classes, samples, self.recipe.model,
            self.recipe.image_size, self.recipe.batch, self.recipe.target_global_bsz, self.recipe.peak_lr,
            self.total_steps, self.device,
        )  # fmt: skip
        return self

    def _join(self) -> None:
        n = self.network
        self.dht = dht = make_dht(
            initial_peers=n.initial_peers, host_maddrs=n.host_maddrs, announce_maddrs=n.announce_maddrs,
            client_mode=n.client_mode, identity_path=n.identity, use_auto_relay=n.use_auto_relay,
            run_id=n.run_id, schemas=[MetricsRecords],
        )  # fmt: skip
        addresses = [] if n.client_mode else visible_addresses(dht)
        self.publisher = MetricsPublisher(
            dht, n.run_id, peer_name=n.name or socket.gethostname(), address=addresses[0] if addresses else "",
            device=describe_device(self.device), shards=[s.name for s in self.manifest.split(self.options.split).shards],
        )  # fmt: skip
        (self.log_dir / "maddrs.txt").write_text("".join(a + "\n" for a in addresses))
        if n.client_mode:
            print("joined in client mode: this peer dials others and cannot be an --initial-peer", flush=True)
        else:
            print("other peers join this run with:", flush=True)
            for address in addresses:
                print(f"  --initial-peer {address}", flush=True)
            _warn_if_unreachable(addresses, n)

    def _optimizer(self) -> hivemind.Optimizer:
        r, n = self.recipe, self.network
        warmup = recipes.warmup_steps(r, self.manifest.split(self.options.split).num_samples)
        schedule = functools.partial(recipes.lr_factor, warmup=warmup, total=self.total_steps)
        return _Optimizer(
            dht=self.dht,
            run_id=n.run_id,
            target_batch_size=r.target_global_bsz,
            batch_size_per_step=r.batch,
            params=recipes.param_groups(self.model, r.weight_decay),
            optimizer=functools.partial(torch.optim.SGD, lr=r.peak_lr, momentum=0.9, nesterov=True),
            scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule),
            matchmaking_time=n.matchmaking_time,
            averaging_timeout=n.averaging_timeout,
            extra_tensors=recipes.batchnorm_buffers(self.model),
            # matchmaking wants its requests to time out well within one matchmaking round
            averager_opts=dict(request_timeout=min(3.0, n.matchmaking_time / 2)),
            grad_compression=Float16Compression(),
            state_averaging_compression=Float16Compression(),
            load_state_compression=Float16Compression(),
            verbose=False,
        )

    def _catch_up(self) -> None:
        """A late joiner downloads the run's current state before it computes a single gradient."""
        tracker = self.opt.tracker
        tracker.fetched_global_progress_this_epoch.wait(timeout=10.0)
        progress = tracker.global_progress  # its epoch is the most advanced peer's (ours when alone)
        if progress.epoch > self.opt.local_epoch:
            log.info("the run is at global step %d: downloading its state from peers", progress.epoch)
            self.opt.load_state_from_peers()
            log.info("loaded state from peers: now at global step %d", self.opt.local_epoch)

    # ---- training -------------------------------------------------------------------------------

    def run(self) -> Summary:
        """Train until the recipe's epochs or steps are done, or `stop_event` is set."""
        o, r = self.options, self.recipe
        shards = self.manifest.split(o.split).shards
        # Shards are shuffled at build time; the buffer mixes a few of them, and no more, so that a
        # shard's completion (and its lease) does not lag far behind its reading.
        per_shard = max(1, sum(s.num_samples for s in shards) // len(shards))
        loader = LoaderOptions(
            batch_size=r.batch, workers=o.workers, decode=o.decode, shuffle_buffer=min(2000, 2 * per_shard),
            device=str(self.device),  # uint8 batches travel to the GPU and are normalised there
        )  # fmt: skip
        stream = train_stream(
            self.manifest, self.feed, split=o.split, options=loader, image_size=r.image_size
        )
        self._stream = stream
        rate, wait_total, busy_total = Rate(), 0.0, 0.0
        last_val = self.opt.local_epoch
        items = iter(stream)
        self.model.train()
        while not self.stop_event.is_set() and self.opt.local_epoch < self.total_steps:
            started = time.perf_counter()
            item = next(items, None)
            waited = time.perf_counter() - started
            if item is None:
                log.warning("the shard feed ended before the last global step")
                break
            if isinstance(item, ShardDone):
                self.feed.finish(item)
                continue
            loss = self._step(item.images, item.labels)
            busy = time.perf_counter() - started - waited
            wait_total, busy_total = wait_total + waited, busy_total + busy
            rate.add(len(item))
            self.summary.local_steps += 1
            self.summary.samples += len(item)
            record = dict(
                time=time.time(), step=self.summary.local_steps, global_step=self.opt.local_epoch,
                data_epoch=self.assigner.epoch, loss=loss, lr=self.opt.param_groups[0]["lr"],
                samples_per_s=rate.per_second, data_wait=waited, data_wait_frac=wait_total / (wait_total + busy_total),
                shards_read=self.feed.shards_read, peers=self.opt.tracker.global_progress.num_peers,
                fetch_mb_s=self.cache.stats.fetch_mb_s, corrupt=stream.stats.corrupt, missing=stream.stats.missing,
                skipped_steps=self.summary.skipped_steps,
            )  # fmt: skip
            if self.opt.local_epoch - last_val >= self.val_interval:
                last_val = self.opt.local_epoch
                record.update(self._validate_and_save())
            self.metrics.write(record)
            self.publisher.update(
                **record, samples=self.summary.samples, shards_claimed=len(self.assigner.held())
            )
        self.summary.global_step = self.opt.local_epoch
        self.summary.shards_read = self.feed.shards_read
        finished = not self.stop_event.is_set()  # a stop (Ctrl-C, SIGTERM) should not wait for a validation
        if finished and (self.opt.local_epoch != last_val or not self.summary.val):
            final = dict(time=time.time(), global_step=self.opt.local_epoch, **self._validate_and_save())
            self.metrics.write(final)
            self.publisher.update(**final)
        return self.summary

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The forward pass updates BatchNorm's running statistics, which peers average: keep a copy to
        # restore if this batch turns out to be poisoned (a few kilobytes per layer).
        batchnorm = [b.clone() for b in self._batchnorm]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.criterion(self.model(images), labels)
        if not torch.isfinite(loss):
            # A poisoned batch must reach neither this model nor, through averaging, the other peers:
            # no gradient is computed, and the running statistics it touched are put back.
            with torch.no_grad():
                for live, kept in zip(self._batchnorm, batchnorm, strict=True):
                    live.copy_(kept)
            self.summary.skipped_steps += 1
            log.warning("non-finite loss (%s): skipping this batch", loss.item())
            self.opt.zero_grad()
            return float("nan")
        loss.backward()
        self.opt.step(batch_size=len(labels))
        self.opt.zero_grad()
        return loss.item()

    # ---- validation and checkpoints -------------------------------------------------------------

    def _validate_and_save(self) -> dict[str, float]:
        result = self.validate() if self.has_val else {}
        if result:
            self.summary.val = result
            log.info(
                "global step %d: val top-1 %.2f%%, top-5 %.2f%% (%d images)",
                self.opt.local_epoch, 100 * result["val_top1"], 100 * result["val_top5"], result["val_samples"],
            )  # fmt: skip
        improved = bool(result) and result["val_top1"] > self.best_acc1
        if improved:
            self.best_acc1 = result["val_top1"]
        self.summary.best_acc1 = self.best_acc1
        self.save(best=improved)
        return result

    def validate(self) -> dict[str, float]:
        """Top-1 and top-5 accuracy over the whole validation split, every sample once."""
        split = self.manifest.split(self.options.val_split)
        refs = [ShardRef(self.cache.get(s), s.name, s.num_samples) for s in split.shards]
        loader = LoaderOptions(batch_size=2 * self.recipe.batch, workers=self.options.workers,
                               decode=self.options.decode, persistent_workers=False, device=str(self.device))  # fmt: skip
        stream = ShardStream(
            refs, image_recipe_for(self.manifest, self.recipe.image_size), loader, train=False,
            num_classes=self.manifest.num_classes,
        )  # fmt: skip
        correct1 = correct5 = seen = 0
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                for batch in stream.batches():
                    images = batch.images.to(self.device, non_blocking=True)
                    if self.options.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    labels = batch.labels.to(self.device)
                    top = self.model(images).topk(min(5, self.manifest.num_classes), dim=1).indices
                    hits = top == labels[:, None]
                    correct1 += hits[:, 0].sum().item()
                    correct5 += hits.any(dim=1).sum().item()
                    seen += len(labels)
        finally:
            stream.close()
            self.model.train()
            for s in split.shards:
                self.cache.unpin(s.name)
        if seen == 0:
            raise DataError(f"{self.manifest.origin}: the {self.options.val_split} split yielded no samples")
        return {"val_top1": correct1 / seen, "val_top5": correct5 / seen, "val_samples": seen}

    def save(self, *, best: bool = False) -> None:
        """Write `latest` (and `best`) to --checkpoint-dir, atomically."""
        if not self.options.checkpoint_dir:
            return
        state = dict(
            model=self.model.state_dict(), optimizer=self.opt.state_dict(),
            scheduler=self.opt.state_averager.scheduler.state_dict(), global_step=self.opt.local_epoch,
            best_acc1=self.best_acc1, data_epoch=self.assigner.epoch,
        )  # fmt: skip
        folder = Path(self.options.checkpoint_dir)
        checkpoint.save(folder / checkpoint.LATEST, identity=self.identity, state=state)
        if best:
            checkpoint.save(folder / checkpoint.BEST, identity=self.identity, state=state)

    # ---- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading, release unfinished shard claims, save `latest`, leave the DHT. Idempotent."""
        if self._closed:
            return
        self._closed = True
        steps = [
            ("stopping the feed", self.feed and self.feed.stop),
            ("stopping the loader", self._stream and self._stream.close),
            ("releasing shard claims", self.assigner and self.assigner.close),
            ("saving the checkpoint", self.opt and self.save),
            ("closing metrics", self.metrics and self.metrics.close),
            ("closing the metrics publisher", self.publisher and self.publisher.close),
            ("closing the shard cache", self.cache and self.cache.close),
            ("stopping the optimizer", self.opt and self.opt.shutdown),
            ("leaving the DHT", self.dht and self.dht.shutdown),
        ]
        for what, step in steps:
            if not step:
                continue
            log.debug("shutdown: %s", what)
            try:
                step()
            except Exception as e:  # shutting down: report and carry on with the rest
                log.warning("while %s: %s: %s", what, type(e).__name__, e)

    def __enter__(self) -> Peer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class _Optimizer(hivemind.Optimizer):
    """hivemind.Optimizer that does not look for averaging partners while no other peer is training.

    hivemind pre-schedules matchmaking for every global step, alone or not; a lone peer then spends a
    good share of a small machine's CPU in its averager processes on rounds that are cancelled for lack
    of partners (measured: 36% fewer samples/s on 2 cores). The schedule resumes as soon as the progress
    tracker sees a second peer. Overrides two internal hooks of hivemind 1.1.12 (pinned in pyproject).
    """

    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HivetrainError(f"--device cuda: no CUDA device is available (torch {torch.__version__})")
    if name not in ("cpu", "cuda"):
        raise HivetrainError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def _warn_if_unreachable(addresses: list[str], network: NetworkOptions) -> None:
    """Peers on other networks cannot dial private addresses: say what to do about it."""
    if network.announce_maddrs or network.use_auto_relay:
        return
    public = False
    for address in addresses:
        with contextlib.suppress(Exception):
            host = Multiaddr(address).value_for_protocol("ip4") or Multiaddr(address).value_for_protocol(
                "ip6"
            )
            public |= ipaddress.ip_address(host).is_global
    if not public and any(not a.startswith(("/ip4/127.", "/ip6/::1")) for a in network.host_maddrs):
        log.warning(
            "this peer has no public address: peers outside this network cannot reach it. Behind NAT, "
            "use --client-mode (or --use-auto-relay), or forward a port and pass --announce-maddr"
        )
