"""Per-dataset image recipes: decode (PIL with JPEG draft mode, or nvJPEG on the GPU) and augment.

The transforms follow torchvision's classification reference (`references/classification/presets.py`,
PIL backend): train = RandomResizedCrop + RandomHorizontalFlip, eval = Resize(size * 256/224) +
CenterCrop, both then PILToTensor/ToImage, ToDtype(float32, scale) and Normalize. CIFAR-10 uses its own
classic recipe instead: pad 4 + RandomCrop 32 + flip for training, no geometry for evaluation.
The loader runs the geometry per image and the dtype conversion + normalisation once per batch, fused
(`Recipe.normalize`): the same arithmetic, at a quarter of the per-image cost and of the bytes moved.

Sizes come from the dataset definitions (`shardtool.datasets.known_datasets()`): 224 for ImageNet-1k,
64 for Tiny-ImageNet-200, 32 for CIFAR-10; other datasets need an explicit size.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image
from torchvision.transforms import v2

from shardtool.datasets import known_datasets

from .errors import DataError

if TYPE_CHECKING:
    from shardtool.manifest import Manifest

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

IMAGE_FIELDS = ("jpg", "jpeg", "png")
"""Sample fields that hold an image, in the order they are looked for."""

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
"""What Pillow raises for damaged or hostile image bytes; anything else is a bug and propagates."""


@dataclass(frozen=True)
class Recipe:
    """How one dataset's images are decoded and augmented.

    Attributes:
        size: side of the square output images.
        style: "imagenet" (random-resized-crop / resize + centre-crop) or "cifar" (pad + random crop).
        mean, std: per-channel normalisation.
        flip: random horizontal flips in training (off for data where mirroring changes the class).
    """

    size: int
    style: Literal["imagenet", "cifar"] = "imagenet"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    flip: bool = True

    @property
    def resize_size(self) -> int:
        """Shorter side before the evaluation centre crop (256 for 224, as in the reference)."""
        return round(self.size * 256 / 224)

    def draft_size(self, *, train: bool) -> int | None:
        """The smallest shorter side worth decoding for this recipe (JPEG draft mode), or None.

        Evaluation resizes the shorter side to `resize_size`, so decoding at that size loses nothing.
        Training crops as little as 8% of the area before resizing; decoding at twice the output size
        keeps a crop of a quarter of the area at full output resolution, which is better than typical
        ImageNet photos (shorter side ~350 px for 224) offer, while multi-megapixel photos decode at
        1/2..1/8 scale, several times faster.
        """
        if self.style == "cifar":
            return None
        return 2 * self.size if train else self.resize_size

    def geometry(self, *, train: bool) -> v2.Compose:
        """The recipe's crops and flips; works on PIL images and on uint8 CHW tensors on any device."""
        flip = [v2.RandomHorizontalFlip()] if self.flip else []
        if self.style == "cifar":
            steps = [v2.RandomCrop(self.size, padding=4), *flip] if train else []
        elif train:
            steps = [v2.RandomResizedCrop(self.size, antialias=True), *flip]
        else:
            steps = [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.size)]
        return v2.Compose(steps or [v2.Identity()])

    def image_transform(self, *, train: bool) -> v2.Compose:
        """Per image, as the loader workers run it: PIL RGB image -> geometry -> uint8 CHW tensor.

        The float conversion and normalisation happen once per batch (`normalize`), after the batch has
        crossed from the worker (4x fewer bytes) and, with a GPU, on the GPU.
        """
        return v2.Compose([self.geometry(train=train), v2.ToImage(), v2.ToPureTensor()])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32, (x / 255 - mean) / std, fused into one scale and shift."""
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        return images.float().mul_(1 / (255 * std)).sub_(mean / std)

    def transform(self, *, train: bool) -> v2.Compose:
        """The reference recipe per image: PIL RGB image -> normalised float32 CHW tensor.

        Equal (to float rounding) to `image_transform` followed by `normalize`; for single images.
        """
        return v2.Compose(
            [
                self.geometry(train=train),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
                v2.ToPureTensor(),
            ]
        )


def recipe_for(dataset: Manifest | str, size: int | None = None, *, flip: bool = True) -> Recipe:
    """The recipe for a manifest's dataset (or a dataset name); `size` overrides the known size, and
    `flip=False` turns the training flips off.

    Raises:
        DataError: the dataset is not a known one and no size was given.
    """
    name = dataset if isinstance(dataset, str) else dataset.dataset
    definition = known_datasets().get(name)
    if size is None:
        if definition is None:
            where = name if isinstance(dataset, str) else f"{dataset.origin or 'manifest'}: dataset {name!r}"
            raise DataError(f"{where} has no known image size; give one (--image-size)")
        size = definition.image_size
    if size < 8 or size > 4096:
        raise DataError(f"image size must be between 8 and 4096 pixels, not {size}")
    if definition is not None and "cifar10" in definition.layouts:
        return Recipe(size, "cifar", CIFAR_MEAN, CIFAR_STD, flip=flip)
    return Recipe(size, flip=flip)


def decode_image(data: bytes, *, draft: int | None = None) -> Image.Image:
    """Decode image bytes to a loaded RGB PIL image.

    With `draft`, a JPEG at least twice that size on its shorter side is decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8, never below `draft`): Pillow's draft mode, which skips most of the decode work.
    Raises one of DECODE_ERRORS for damaged bytes.
    """
    img = Image.open(io.BytesIO(data))
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", (draft, draft))
    img = img.convert("RGB")  # also forces the full decode, so damage surfaces here
    return img


class DeviceDecoder:
    """Batched decode on a device: nvJPEG through `torchvision.io.decode_jpeg`, then the recipe's
    geometry per image and normalisation per batch, all on that device.

    PNG (and anything nvJPEG rejects) is decoded on the CPU with `torchvision.io.decode_image` and
    moved over. Works on any device; "cpu" exercises the same code without a GPU.
    """

    def __init__(self, recipe: Recipe, *, train: bool, device: str | torch.device):
        self.device = torch.device(device)
        self.recipe, self.geometry = recipe, recipe.geometry(train=train)

    def __call__(self, raw: list[bytes]) -> tuple[torch.Tensor | None, list[int]]:
        """Decode and transform; returns (images [N, 3, H, W] float32 on the device, failed indices)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
        jpeg = [i for i, b in enumerate(raw) if b[:3] == b"\xff\xd8\xff"]
        decoded: dict[int, torch.Tensor] = {}
        failed: list[int] = []
        if jpeg:
            try:
                out = decode_jpeg([tensors[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
                decoded.update(zip(jpeg, out))
            except RuntimeError:
                pass  # one bad image fails the whole call; retry one by one below to find it
        for i in range(len(raw)):
            if i not in decoded:
                try:
                    decoded[i] = self._decode_one(tensors[i], i in jpeg)
                except RuntimeError:
                    failed.append(i)
        if not decoded:
            return None, failed
        images = torch.stack([self.geometry(decoded[i]) for i in sorted(decoded)])
        return self.recipe.normalize(images), failed

    def _decode_one(self, data: torch.Tensor, is_jpeg: bool) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        if is_jpeg and self.device.type != "cpu":
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass  # some JPEGs (CMYK, lossless) only the CPU decoder reads
        return decode_image(data, mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
