"""Training recipes: per-dataset defaults, the model, and the learning-rate schedule.

After torchvision's classification reference (`references/classification/train.py`): SGD with Nesterov
momentum 0.9, weight decay without decay on norms and biases, label smoothing 0.1, linear warm-up then
cosine decay, learning rate scaled linearly with the global batch (0.1 per 256 samples). The schedule is
a function of the optimizer's global step (`hivemind.Optimizer.local_epoch`, one step per
`target_global_bsz` samples across all peers), so a peer that joins late follows the same schedule.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torchvision
from torch import nn

from shardtool.datasets import known_datasets
from shardtool.manifest import Manifest

from .errors import HivetrainError
from .options import MODELS, OPTIMIZERS


@dataclass(frozen=True)
class TrainingRecipe:
    """How a dataset is trained. Every field has a command-line flag that overrides it."""

    model: str = "resnet18"
    image_size: int = 224
    optimizer: str = "sgd"
    batch: int = 64
    target_global_bsz: int = 1024
    lr: float | None = None  # None: 0.1 * target_global_bsz / 256
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    epochs: int = 90
    warmup_epochs: float = 5.0

    @property
    def peak_lr(self) -> float:
        """The given lr, else the linear scaling rule for SGD and LARS, the square-root rule for LAMB."""
        if self.lr is not None:
            return self.lr
        if self.optimizer == "lamb":
            return 0.004 * math.sqrt(self.target_global_bsz / 1024)
        return 0.1 * self.target_global_bsz / 256

    @property
    def stem(self) -> str:
        """The ResNet's first layers, chosen by the training resolution (`STEMS`)."""
        return next(name for name, largest in STEMS if self.image_size <= largest)


STEMS = (("cifar", 32), ("small", 64), ("imagenet", 1 << 30))
"""ResNet stems by the largest image side they serve. ImageNet's stem (7x7 stride-2 convolution and a
stride-2 max-pool) shrinks the input 4x before the first block, which suits 224 px but leaves 1x1 feature
maps at 32 px; below 64 px the first convolution is 3x3 with stride 1 ("small": the max-pool stays, 64 px
-> 32 px at the first block), and up to 32 px the max-pool goes too ("cifar", as in the CIFAR ResNets),
so that the last block always sees at least 4x4."""


_SMALL_IMAGES = TrainingRecipe(
    "resnet18", 32, batch=128, target_global_bsz=512, weight_decay=5e-4, epochs=60, warmup_epochs=2
)
RECIPES = {
    "imagenet-1k": TrainingRecipe(
        "resnet50", 224, batch=64, target_global_bsz=1024, epochs=90, warmup_epochs=5
    ),
    "tiny-imagenet-200": replace(_SMALL_IMAGES, image_size=64),
    "cifar-10": _SMALL_IMAGES,
}
LAYOUT_SIZES = {"tiny-imagenet": 64, "cifar10": 32}


def training_recipe(manifest: Manifest, **overrides) -> TrainingRecipe:
    """The recipe for a manifest's dataset, with the given fields (those not None) overridden.

    Unknown datasets train a ResNet-18 at the image size their layout suggests (224 by default).
    """
    recipe = RECIPES.get(manifest.dataset)
    if recipe is None:
        size = LAYOUT_SIZES.get(manifest.layout, 224)
        recipe = TrainingRecipe("resnet18", size, batch=64, target_global_bsz=256, epochs=10, warmup_epochs=1)
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.model not in MODELS:
        raise HivetrainError(f"unknown model {recipe.model!r}; choose one of {', '.join(MODELS)}")
    if recipe.batch < 1 or recipe.target_global_bsz < recipe.batch:
        raise HivetrainError(
            f"--target-global-bsz ({recipe.target_global_bsz}) must be at least --batch ({recipe.batch})"
        )
    known = known_datasets().get(manifest.dataset)
    if known is not None and known.num_classes != manifest.num_classes:
        raise HivetrainError(
            f"{manifest.origin}: {manifest.dataset} should have {known.num_classes} classes, "
            f"the manifest lists {manifest.num_classes}"
        )
    return recipe


def build_model(recipe: TrainingRecipe, num_classes: int, *, seed: int = 0) -> nn.Module:
    """A torchvision ResNet with random weights (never a download), its stem fitted to the resolution.

    The weights are drawn from `seed` (the global random state is left as it was): every peer of a run
    starts from the same model, as averaging needs. Peers that started apart would keep their starting
    difference for ever, since each round moves every peer's copy by the same average."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, recipe.model)(weights=None, num_classes=num_classes)
        if recipe.stem in ("small", "cifar"):
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    if recipe.stem == "cifar":
        model.maxpool = nn.Identity()
    return model


def optimizer(recipe: TrainingRecipe):
    """A factory of the recipe's local optimizer over parameter groups (`hivetrain.sync` builds it).

    sgd: Nesterov momentum 0.9, the reference recipe. lars: timm's LARS with clipped trust ratios
    (LARC, trust coefficient 0.02): SGD whose per-layer step never exceeds what the layer's weights
    bear, for global batches of many thousands. lamb: timm's LAMB (Adam with layer-wise trust ratios).
    """
    if recipe.optimizer == "sgd":
        return functools.partial(torch.optim.SGD, lr=recipe.peak_lr, momentum=0.9, nesterov=True)
    from timm.optim import Lamb, Lars

    if recipe.optimizer == "lars":
        return functools.partial(Lars, lr=recipe.peak_lr, momentum=0.9, trust_coeff=0.02, trust_clip=True)
    if recipe.optimizer == "lamb":
        return functools.partial(Lamb, lr=recipe.peak_lr)
    raise HivetrainError(f"unknown optimizer {recipe.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on normalisation weights and biases (the reference's --norm-weight-decay 0)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batchnorm_buffers(model: nn.Module, *, counters: bool = False) -> list[torch.Tensor]:
    """BatchNorm running statistics: averaged across peers with the parameters (hivemind's
    `extra_tensors`), because hivemind averages only what the optimizer updates; with `counters`, also
    each layer's `num_batches_tracked` (everything a forward pass in training mode changes)."""
    return [
        buf
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        for buf in (module.running_mean, module.running_var, *([module.num_batches_tracked] * counters))
    ]


def total_steps(recipe: TrainingRecipe, train_samples: int) -> int:
    """Global optimizer steps in `recipe.epochs` passes over `train_samples`."""
    return max(1, math.ceil(recipe.epochs * train_samples / recipe.target_global_bsz))


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at global step `step`: linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(recipe: TrainingRecipe, train_samples: int) -> int:
    return round(recipe.warmup_epochs * train_samples / recipe.target_global_bsz)
