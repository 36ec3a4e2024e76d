"""One training peer: stream claimed shards into a model that a synchronisation strategy keeps in step
with the run's other peers.

    with Peer.open(options, network, sync) as peer:   joins the DHT, builds the model and the strategy,
                                                      resumes a checkpoint or downloads the run's state,
                                                      opens the shard cache, assigner and feed
        summary = peer.run()                          claims shards (ShardAssigner) -> verified local
                                                      copies (ShardCache, ClaimFeed) -> batches
                                                      (ShardStream) -> forward/backward -> sync.step();
                                                      validates every `val_interval` global steps,
                                                      writes metrics.jsonl, saves `latest` at the end
    # leaving the block releases unfinished shard claims, stops the strategy, leaves the DHT

The global step counts global batches (`target_global_bsz` samples across all peers); the learning-rate
schedule, validation and the end of training follow it, so late joiners follow the same schedule and all
peers stop at the same step: `epochs` x train samples / `target_global_bsz` steps. (Peers may train more
than the target per step when several finish a batch at once, so the data epochs that the assigner hands
out, one pass over the shards each, can outnumber `epochs`.)
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.utils.multiaddr import Multiaddr
from torch import nn

from shardtool import manifest as manifest_io
from shardtool.manifest import Manifest

from . import checkpoint, sync
from . import recipe as recipes
from .accounting import Accounting
from .assign import ShardAssigner
from .cache import ShardCache
from .data import LoaderOptions, ShardDone, ShardRef, ShardStream, train_stream
from .dht import Rejoiner, make_dht, visible_addresses
from .errors import DataError, HivetrainError
from .feed import ClaimFeed
from .metrics import JsonLines, MetricsPublisher, MetricsRecords, Rate, describe_device
from .options import NetworkOptions, SyncOptions, TrainOptions
from .traffic import P2PTraffic
from .transforms import recipe_for as image_recipe_for

log = logging.getLogger(__name__)

FEED_DEPTH = 4
"""The least shards claimed and not yet read: the two the reader mixes at once (its shuffle buffer
holds two shards' samples) and two downloading ahead; the feed adds more while claim rounds are slow
(`hivetrain.feed.read_ahead`)."""


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


@dataclass(frozen=True)
class Plan:
    """What the options mean for this run, worked out before anything joins the network."""

    manifest: Manifest
    recipe: recipes.TrainingRecipe
    device: torch.device
    amp: bool
    total_steps: int
    val_interval: int
    has_val: bool
    identity: checkpoint.Identity

    @classmethod
    def of(cls, options: TrainOptions) -> Plan:
        """Read the manifest and choose the recipe, device and schedule; raises on bad input."""
        manifest = manifest_io.load(options.shards)
        samples = manifest.split(options.split).num_samples
        recipe = recipes.training_recipe(manifest, **options.recipe_overrides())
        device = _pick_device(options.device)
        amp = options.amp and device.type == "cuda"
        if options.amp and not amp:
            log.warning("--amp needs a CUDA device; training in float32 on %s", device)
        total = recipes.total_steps(recipe, samples)
        if options.max_steps is not None:
            total = min(total, options.max_steps)
        has_val = options.val_split in manifest.splits and manifest.split(options.val_split).labeled
        identity = checkpoint.Identity(
            manifest.dataset, manifest.fingerprint(), recipe.model, manifest.num_classes, recipe.image_size
        )
        return cls(
            manifest, recipe, device, amp, total,
            options.val_interval or max(1, samples // recipe.target_global_bsz), has_val, identity,
        )  # fmt: skip


class Peer:
    """A training peer, assembled from its parts by `Peer.open` (which also takes it apart)."""

    def __init__(
        self,
        *,
        options: TrainOptions,
        plan: Plan,
        addresses: list[str],
        model: nn.Module,
        synchronizer: sync.Synchronizer,
        cache: ShardCache,
        assigner: ShardAssigner,
        feed: ClaimFeed,
        metrics: JsonLines,
        publisher: MetricsPublisher,
        traffic: P2PTraffic | None = None,
        best_acc1: float = 0.0,
    ):
        self.options, self.plan, self.addresses = options, plan, addresses
        self.model, self.sync = model, synchronizer
        self.cache, self.assigner, self.feed = cache, assigner, feed
        self.metrics, self.publisher, self.traffic = metrics, publisher, traffic
        self.best_acc1 = best_acc1
        self.has_val = plan.has_val
        self.stop_event = threading.Event()
        self.summary = Summary()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=plan.recipe.label_smoothing)
        self._batchnorm = recipes.batchnorm_buffers(model, counters=True)  # on the device, as trained
        self._saved_at = time.monotonic()  # when `latest` was last written (or training began)

    # ---- assembly -------------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        options: TrainOptions,
        network: NetworkOptions | None = None,
        sync_options: SyncOptions | None = None,
    ) -> Iterator[Peer]:
        """Build a peer and its parts; on leaving, take them down in reverse order, each step's failure
        logged and the rest carried out (unfinished claims released, the strategy stopped, DHT left).

        Raises:
            HivetrainError, ShardtoolError: bad options, manifest or checkpoint; unreachable peers.
        """
        o, n, sync_options = options, network or NetworkOptions(), sync_options or SyncOptions()
        plan = Plan.of(o)
        log_dir = Path(o.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        resume = checkpoint.load(o.resume_from, expect=plan.identity) if o.resume_from else None
        if o.checkpoint_dir and (stale := checkpoint.remove_stale_temps(o.checkpoint_dir)):
            log.info("removed %d unfinished checkpoint file(s) from %s", len(stale), o.checkpoint_dir)
        train_shards = [s.name for s in plan.manifest.split(o.split).shards]

        with contextlib.ExitStack() as stack:

            def on_exit(what: str, step: Callable[[], object]) -> None:
                stack.callback(_carry_on, what, step)

            dht = make_dht(
                initial_peers=n.initial_peers, host_maddrs=n.host_maddrs, announce_maddrs=n.announce_maddrs,
                client_mode=n.client_mode, identity_path=n.identity, use_auto_relay=n.use_auto_relay,
                run_id=n.run_id, schemas=[MetricsRecords],
            )  # fmt: skip
            on_exit("leaving the DHT", dht.shutdown)
            on_exit("stopping the rejoin check", Rejoiner(dht, n.initial_peers).start().close)
            addresses = [] if n.client_mode else visible_addresses(dht)
            (log_dir / "maddrs.txt").write_text("".join(a + "\n" for a in addresses))
            if not n.client_mode:
                _warn_if_unreachable(addresses, n)
            publisher = MetricsPublisher(
                dht, n.run_id, peer_name=n.name or socket.gethostname(), address=addresses[0] if addresses else "",
                device=describe_device(plan.device), shards=train_shards, sync=sync_options.sync,
            )  # fmt: skip
            on_exit("closing the metrics publisher", publisher.close)
            traffic = P2PTraffic.of(dht)
            if traffic is not None:
                on_exit("stopping the traffic meter", traffic.close)

            model = _build_model(plan, o, resume)
            synchronizer = sync.make(_sync_context(plan, o, dht, n.run_id, model, sync_options))
            on_exit("stopping synchronisation", synchronizer.shutdown)
            if resume is not None:
                synchronizer.load_state_dict(resume)
                log.info("resumed from %s at global step %d", o.resume_from, synchronizer.global_step)
            synchronizer.catch_up()

            cache = ShardCache(
                plan.manifest, Path(o.cache_dir) if o.cache_dir else log_dir / "cache",
                limit_bytes=o.cache_limit, mirrors=o.mirrors, via=o.via,
            )  # fmt: skip
            on_exit("closing the shard cache", cache.close)
            assigner = ShardAssigner(
                train_shards, dht=dht, run_id=n.run_id, lease_s=o.lease, seed=o.seed, log_dir=log_dir,
                max_epochs=None, batch=FEED_DEPTH,  # claim the shards the feed reads ahead in one DHT round
                resume=None if resume is None else checkpoint.saved_position(resume, train_shards, path=o.resume_from),
            ).start()  # fmt: skip
            on_exit("releasing shard claims", assigner.close)
            feed = ClaimFeed(assigner, cache, split=o.split, depth=FEED_DEPTH)
            on_exit("stopping the feed", feed.stop)
            metrics = JsonLines(log_dir / "metrics.jsonl")
            on_exit("closing metrics", metrics.close)
            r = plan.recipe
            log.info(
                "training %s on %s (%d classes, %d train samples): %s at %d px, batch %d, global batch %d, "
                "%s peak lr %.3g, %d global steps, sync %s, device %s",
                plan.manifest.dataset, o.shards, plan.manifest.num_classes, plan.manifest.split(o.split).num_samples,
                r.model, r.image_size, r.batch, r.target_global_bsz, r.optimizer, r.peak_lr, plan.total_steps,
                synchronizer.mode, plan.device,
            )  # fmt: skip
            yield cls(
                options=o, plan=plan, addresses=addresses, model=model, synchronizer=synchronizer,
                cache=cache, assigner=assigner, feed=feed, metrics=metrics, publisher=publisher, traffic=traffic,
                best_acc1=float(resume.get("best_acc1", 0.0)) if resume is not None else 0.0,
            )  # fmt: skip

    # ---- training -------------------------------------------------------------------------------

    def run(self) -> Summary:
        """Train until the recipe's epochs or steps are done, or `stop_event` is set; save `latest`."""
        o, plan = self.options, self.plan
        shards = plan.manifest.split(o.split).shards
        # Shards are shuffled at build time; the buffer mixes a few of them, and no more, so that a
        # shard's completion (and its lease) does not lag far behind its reading.
        per_shard = max(1, sum(s.num_samples for s in shards) // len(shards))
        loader = LoaderOptions(
            batch_size=plan.recipe.batch, workers=o.workers, decode=o.decode, shuffle_buffer=min(2000, 2 * per_shard),
            device=str(plan.device),  # uint8 batches travel to the GPU and are normalised there
        )  # fmt: skip
        stream = train_stream(
            plan.manifest, self.feed, split=o.split, options=loader, image_size=plan.recipe.image_size,
            flip=o.flip,
        )  # fmt: skip
        try:
            self._train(stream)
        finally:
            stream.close()
            _carry_on("saving the checkpoint", self.save)
        return self.summary

    def _train(self, stream: ShardStream) -> None:
        rate, wait_total, busy_total = Rate(), 0.0, 0.0
        accounting = Accounting(time.monotonic())
        last_val = self.sync.global_step
        items = iter(stream)
        self.model.train()
        while not self.stop_event.is_set() and self.sync.global_step < self.plan.total_steps:
            started = time.perf_counter()
            item = next(items, None)
            waited = time.perf_counter() - started
            if item is None:
                log.warning("the shard feed ended before the last global step")
                break
            if isinstance(item, ShardDone):
                self.feed.finish(item)
                continue
            waited_on_sync = self.sync.stats.wait_s
            loss = self._step(item.images, item.labels)
            busy = time.perf_counter() - started - waited
            accounting.step(compute_s=busy - (self.sync.stats.wait_s - waited_on_sync), samples=len(item))
            wait_total, busy_total = wait_total + waited, busy_total + busy
            rate.add(len(item))
            self.summary.local_steps += 1
            self.summary.samples += len(item)
            record = dict(
                time=time.time(), step=self.summary.local_steps, global_step=self.sync.global_step,
                data_epoch=self.assigner.epoch, loss=loss, lr=self.sync.lr,
                samples_per_s=rate.per_second, data_wait=waited, data_wait_frac=wait_total / (wait_total + busy_total),
                shards_read=self.feed.shards_read, peers=self.sync.num_peers,
                fetch_mb_s=self.cache.stats.fetch_mb_s, corrupt=stream.stats.corrupt, missing=stream.stats.missing,
                skipped_steps=self.summary.skipped_steps, sync_rounds=self.sync.stats.rounds,
                sync_version=self.sync.stats.version, state_downloads=self.sync.stats.downloads,
                sync_failed_rounds=self.sync.stats.failed_rounds, sync_round_s=self.sync.stats.last_round_s,
                **accounting.fields(now=time.monotonic(), sync_wait_s=self.sync.stats.wait_s,
                                    traffic=self.traffic.totals() if self.traffic else None),
            )  # fmt: skip
            at_end = self.sync.global_step >= self.plan.total_steps  # validated after the last round
            if self.sync.global_step - last_val >= self.val_interval and not at_end:
                last_val = self.sync.global_step
                record.update(self._validate_and_save())
            elif self._checkpoint_due():
                self.save()
            self.metrics.write(record)
            self.publisher.update(
                **record, samples=self.summary.samples, shards_claimed=len(self.assigner.held())
            )
        self.summary.shards_read = self.feed.shards_read
        finished = not self.stop_event.is_set()  # a stop (Ctrl-C, SIGTERM) should not wait for a validation
        if finished:
            # the shards this peer holds go back first: a peer still training may need them to reach
            # the last round, which waits for it
            self.feed.stop()
            self.assigner.close()
            self.sync.finish()
        self.summary.global_step = self.sync.global_step
        if finished and (self.sync.global_step != last_val or not self.summary.val):
            final = dict(time=time.time(), global_step=self.sync.global_step, **self._validate_and_save())
            self.metrics.write(final)
            self.publisher.update(**final)

    @property
    def val_interval(self) -> int:
        return self.plan.val_interval

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        device = self.plan.device
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The forward pass updates BatchNorm's running statistics, which peers average: keep a copy to
        # restore if this batch turns out to be poisoned (a few kilobytes per layer).
        batchnorm = [b.clone() for b in self._batchnorm]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.plan.amp):
            loss = self.criterion(self.model(images), labels)
        if not torch.isfinite(loss):
            # A poisoned batch must reach neither this model nor, through averaging, the other peers:
            # no gradient is computed, and the running statistics it touched are put back.
            with torch.no_grad():
                for live, kept in zip(self._batchnorm, batchnorm, strict=True):
                    live.copy_(kept)
            self.summary.skipped_steps += 1
            log.warning("non-finite loss (%s): skipping this batch", loss.item())
            self.sync.zero_grad()
            return float("nan")
        loss.backward()
        self.sync.step(batch_size=len(labels))
        return loss.item()

    # ---- validation and checkpoints -------------------------------------------------------------

    def _validate_and_save(self) -> dict[str, float]:
        result = self.validate() if self.has_val else {}
        if result:
            self.summary.val = result
            log.info(
                "global step %d: val top-1 %.2f%%, top-5 %.2f%% (%d images)",
                self.sync.global_step, 100 * result["val_top1"], 100 * result["val_top5"], result["val_samples"],
            )  # fmt: skip
        improved = bool(result) and result["val_top1"] > self.best_acc1
        if improved:
            self.best_acc1 = result["val_top1"]
        self.summary.best_acc1 = self.best_acc1
        self.save(best=improved)
        return result

    def validate(self) -> dict[str, float]:
        """Top-1 and top-5 accuracy over the whole validation split, every sample once."""
        o, plan = self.options, self.plan
        split = plan.manifest.split(o.val_split)
        refs = [ShardRef(self.cache.get(s), s.name, s.num_samples) for s in split.shards]
        loader = LoaderOptions(batch_size=2 * plan.recipe.batch, workers=o.workers, decode=o.decode,
                               persistent_workers=False, device=str(plan.device))  # fmt: skip
        stream = ShardStream(
            refs, image_recipe_for(plan.manifest, plan.recipe.image_size), loader, train=False,
            num_classes=plan.manifest.num_classes,
        )  # fmt: skip
        correct1 = correct5 = seen = 0
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=plan.amp):
                for batch in stream.batches():
                    images = batch.images.to(plan.device, non_blocking=True)
                    if o.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    labels = batch.labels.to(plan.device)
                    top = self.model(images).topk(min(5, plan.manifest.num_classes), dim=1).indices
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
            raise DataError(f"{plan.manifest.origin}: the {o.val_split} split yielded no samples")
        return {"val_top1": correct1 / seen, "val_top5": correct5 / seen, "val_samples": seen}

    def _checkpoint_due(self) -> bool:
        """Whether `latest` is --checkpoint-every minutes old: a crash between validations (an ImageNet
        data epoch on a few peers is hours) should lose minutes of training, not an epoch."""
        every = self.options.checkpoint_every
        return bool(self.options.checkpoint_dir and every) and time.monotonic() - self._saved_at >= 60 * every

    def save(self, *, best: bool = False) -> None:
        """Write `latest` (and `best`) to --checkpoint-dir, atomically, with the run's data position."""
        if not self.options.checkpoint_dir:
            return
        self._saved_at = time.monotonic()
        shards = [s.name for s in self.plan.manifest.split(self.options.split).shards]
        state = dict(
            model=self.model.state_dict(), **self.sync.state_dict(), global_step=self.sync.global_step,
            best_acc1=self.best_acc1, data_position=checkpoint.position_state(self.assigner.position(), shards),
        )  # fmt: skip
        folder = Path(self.options.checkpoint_dir)
        checkpoint.save(folder / checkpoint.LATEST, identity=self.plan.identity, state=state)
        if best:
            checkpoint.save(folder / checkpoint.BEST, identity=self.plan.identity, state=state)


def _build_model(plan: Plan, options: TrainOptions, resume: dict | None) -> nn.Module:
    model = recipes.build_model(plan.recipe, plan.manifest.num_classes, seed=options.seed)
    if options.weights:
        checkpoint.load_weights(model, options.weights)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(plan.device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _sync_context(
    plan: Plan, options: TrainOptions, dht, run_id: str, model: nn.Module, sync_options: SyncOptions
) -> sync.SyncContext:
    r = plan.recipe
    warmup = recipes.warmup_steps(r, plan.manifest.split(options.split).num_samples)
    return sync.SyncContext(
        dht=dht, run_id=run_id, model=model, param_groups=recipes.param_groups(model, r.weight_decay),
        inner_optimizer=recipes.optimizer(r),
        lr_schedule=functools.partial(recipes.lr_factor, warmup=warmup, total=plan.total_steps),
        batchnorm=recipes.batchnorm_buffers(model), batch=r.batch, target_global_bsz=r.target_global_bsz,
        total_steps=plan.total_steps, options=sync_options,
    )  # fmt: skip


def _carry_on(what: str, step: Callable[[], object]) -> None:
    """Run one shutdown step; a failure is reported and the remaining steps still run."""
    log.debug("shutdown: %s", what)
    try:
        step()
    except Exception as e:
        log.warning("while %s: %s: %s", what, type(e).__name__, e)


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
            maddr = Multiaddr(address)
            host = maddr.value_for_protocol("ip4") or maddr.value_for_protocol("ip6")
            public |= ipaddress.ip_address(host).is_global
    if not public and any(not a.startswith(("/ip4/127.", "/ip6/::1")) for a in network.host_maddrs):
        log.warning(
            "this peer has no public address: peers outside this network cannot reach it. Behind NAT, "
            "use --client-mode (or --use-auto-relay), or forward a port and pass --announce-maddr"
        )
