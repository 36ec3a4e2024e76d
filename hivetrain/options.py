"""The settings of a training peer, in one place: each field's default, help text and command-line flag.

The frozen dataclasses here are what `hivetrain.train.Peer` takes, and `click_options` turns their fields
into the options of `hivetrain run`, so a default or a help text is written once, the flag is the field's
name (`--cache-limit` is `cache_limit`), and values arrive parsed (`50GB` is an int of bytes).

    TrainOptions    what is trained and how: data, model recipe overrides, device, checkpoints, logs
    NetworkOptions  how the peer joins the run's DHT (addresses, NAT, identity)
    SyncOptions     how peers combine their work (see hivetrain.sync)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from shardtool.cliutil import SIZE

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"
"""Where a DHT node listens unless told otherwise: loopback, any free port (peers on this machine only)."""
MODELS = ("resnet18", "resnet34", "resnet50")
"""`--model` choices: torchvision ResNets (hivetrain.recipe.build_model)."""
OPTIMIZERS = ("sgd", "lars", "lamb")
"""`--optimizer` choices (hivetrain.recipe.optimizer)."""
SYNC_MODES = ("every-step", "diloco")
"""`--sync` choices, each a module of hivetrain.sync."""
COMPRESSIONS = ("none", "fp16", "8bit")
"""`--compression` choices (hivetrain.sync.base.compression)."""


def setting(default: Any, help: str, *, flag: str | None = None, **click_kw: Any) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the field's default (None: decided later, e.g. by the dataset's recipe; say so in `help`).
        help: the option's help text; the default is appended unless it is None.
        flag: the option's name when it is not the field's name with dashes (`--initial-peer` for
            `initial_peers`), or a click boolean pair such as `--flip/--no-flip`.
        click_kw: passed to `click.option` (`type`, `metavar`, ...). A tuple default makes the option
            repeatable, a bool default a flag.
    """
    return field(default=default, metadata={"cli": dict(help=help, flag=flag, **click_kw)})


def click_options(*classes: type) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per `setting` field of `classes`, in field order."""
    options = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            spec = dict(f.metadata.get("cli") or {})
            if not spec:
                continue
            flag = spec.pop("flag") or "--" + f.name.replace("_", "-")
            default = f.default
            kw: dict[str, Any] = dict(show_default=not (default is None or default is False or default == ()))
            kw.update(spec)
            if isinstance(default, bool) and "/" not in flag:
                kw["is_flag"] = True
            if isinstance(default, tuple):
                kw["multiple"] = True
            if default is dataclasses.MISSING:
                kw.update(required=True, show_default=False)
            else:
                kw["default"] = default
            options.append(click.option(flag, f.name, **kw))

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def from_values(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of `cls` from parsed option values (a click command's keyword arguments)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class NetworkOptions:
    """How this peer joins the run's DHT."""

    run_id: str = setting("hivetrain", "Name of the run; every peer of one run uses the same.")
    name: str | None = setting(None, "This peer's name on the monitor [host name].")
    initial_peers: tuple[str, ...] = setting(
        (),
        "Full multiaddr of a running peer (printed at its start); repeatable. None: start a run.",
        flag="--initial-peer",
        metavar="MADDR",
    )
    host_maddrs: tuple[str, ...] = setting(
        (LOOPBACK_MADDR,),
        "Where to listen; /ip4/0.0.0.0/tcp/PORT for peers on other machines.",
        flag="--host-maddr",
        metavar="MADDR",
    )
    announce_maddrs: tuple[str, ...] = setting(
        (), "The address others should dial (public IP and forwarded port).", flag="--announce-maddr",
        metavar="MADDR",
    )  # fmt: skip
    client_mode: bool = setting(False, "For peers behind NAT: dial out only, accept no connections.")
    use_auto_relay: bool = setting(False, "Be reachable through relays when behind NAT.")
    identity: str | None = setting(
        None,
        "Private key file that keeps this peer's id across restarts (created if missing).",
        type=click.Path(dir_okay=False),
    )


@dataclass(frozen=True)
class TrainOptions:
    """What and how this peer trains; None fields take the dataset's recipe default."""

    shards: str = setting(
        dataclasses.MISSING, "The run's manifest.json: a path, a folder holding it, or an http(s) URL.",
        metavar="MANIFEST",
    )  # fmt: skip
    split: str = setting("train", "The manifest split to train on.")
    val_split: str = setting("val", "The split to validate on (skipped when absent or unlabeled).")
    model: str | None = setting(None, "[by dataset: resnet50 for ImageNet]", type=click.Choice(MODELS))
    batch: int | None = setting(None, "Samples per local step [by dataset].", type=click.IntRange(min=1))
    optimizer: str = setting(
        "sgd",
        "The local optimizer: sgd (Nesterov momentum), or for large global batches lars (LARC: SGD with "
        "layer-wise trust ratios, clipped) or lamb.",
        type=click.Choice(OPTIMIZERS),
    )
    lr: float | None = setting(
        None, "Peak learning rate [sgd, lars: 0.1 x global batch / 256; lamb: 0.004 x sqrt(global batch / 1024)].",
        type=float,
    )  # fmt: skip
    epochs: int | None = setting(
        None,
        "Training length in passes over the data: epochs x samples / global batch steps [by dataset].",
        type=click.IntRange(min=1),
    )
    target_global_bsz: int | None = setting(
        None, "Samples across all peers per global step [by dataset].", type=click.IntRange(min=1)
    )
    image_size: int | None = setting(None, "Training resolution [by dataset].", type=click.IntRange(min=8))
    flip: bool = setting(
        True,
        "Random horizontal flips in training; --no-flip where mirroring changes the class (digits, text).",
        flag="--flip/--no-flip",
    )
    val_interval: int | None = setting(
        None, "Validate every N global steps [once per data epoch].", type=click.IntRange(min=1)
    )
    max_steps: int | None = setting(
        None, "Stop at this global step (short trials).", type=click.IntRange(min=1)
    )
    checkpoint_dir: str | None = setting(
        None, "Where latest.pt and best.pt go.", type=click.Path(file_okay=False)
    )
    checkpoint_every: float = setting(
        10.0,
        "Minutes between writes of latest.pt besides those at validation (0: at validation only).",
        type=click.FloatRange(min=0),
    )
    resume_from: str | None = setting(
        None, "A checkpoint file or folder to continue from.", type=click.Path()
    )
    weights: str | None = setting(None, "Initial weights from a local file.", type=click.Path(dir_okay=False))
    device: str = setting("auto", "Where to train.", type=click.Choice(["auto", "cpu", "cuda"]))
    amp: bool = setting(False, "bfloat16 autocast (CUDA only).")
    channels_last: bool = setting(False, "NHWC memory format (faster convolutions on GPUs).")
    workers: int = setting(2, "Data loader processes.", type=click.IntRange(min=0))
    decode: str = setting(
        "cpu", "JPEG decoding: PIL in the workers, or nvJPEG on the GPU.", type=click.Choice(["cpu", "gpu"])
    )
    cache_dir: str | None = setting(
        None, "Where fetched shards go [LOG_DIR/cache].", type=click.Path(file_okay=False)
    )
    cache_limit: int | None = setting(
        None, "Evict least recently used shards beyond this size (e.g. 50GB).", type=SIZE
    )
    log_dir: str = setting(
        "logs", "metrics.jsonl, shards.jsonl, maddrs.txt.", type=click.Path(file_okay=False)
    )
    mirrors: tuple[str, ...] = setting(
        (), "Extra HTTP base URL for shards; repeatable.", flag="--mirror", metavar="URL"
    )
    via: str = setting(
        "auto", "How missing shards are fetched.", type=click.Choice(["auto", "http", "torrent"])
    )
    lease: float = setting(
        30.0, "Seconds before an unrenewed shard claim passes to other peers.", type=click.FloatRange(min=1)
    )
    seed: int = setting(0, "Seed of the shard order and of the initial weights (the same on all peers).")

    def recipe_overrides(self) -> dict[str, Any]:
        """The fields that override the dataset's `hivetrain.recipe.TrainingRecipe`."""
        return dict(
            model=self.model, optimizer=self.optimizer, batch=self.batch, lr=self.lr, epochs=self.epochs,
            target_global_bsz=self.target_global_bsz, image_size=self.image_size,
        )  # fmt: skip


@dataclass(frozen=True)
class SyncOptions:
    """How the peers of a run combine their work (`hivetrain.sync`)."""

    sync: str = setting(
        "diloco",
        "diloco: local steps, then an averaged outer step in the background (internet links); every-step: "
        "average gradients every global step (hivemind.Optimizer; fast links only).",
        type=click.Choice(SYNC_MODES),
    )
    compression: str = setting(
        "fp16",
        "What averaging sends: none (float32), fp16, or 8bit (quantised; fp16 for small tensors).",
        type=click.Choice(COMPRESSIONS),
    )

    local_steps: int | None = setting(
        None,
        "diloco: local steps per peer between averaging rounds (swarm average) [a fortieth of the run's "
        "global steps, 8 to 128].",
        type=click.IntRange(min=1),
    )
    outer_lr: float = setting(
        1.0, "diloco: learning rate of the outer optimizer (1 with no momentum: averaging the local models).",
        type=click.FloatRange(min=0, min_open=True),
    )  # fmt: skip
    outer_momentum: float = setting(
        0.0, "diloco: Nesterov momentum of the outer optimizer (DiLoCo's own: --outer-lr 0.7 --outer-momentum 0.9).",
        type=click.FloatRange(0, 1, max_open=True),
    )  # fmt: skip
    matchmaking_time: float = setting(
        15.0, "Seconds to gather peers for each averaging round.", type=click.FloatRange(min=0.5)
    )
    averaging_timeout: float = setting(
        60.0, "Seconds before an averaging round is abandoned.", type=click.FloatRange(min=1)
    )
