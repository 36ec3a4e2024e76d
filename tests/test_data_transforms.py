"""Per-dataset recipes, JPEG draft decoding and the device (GPU-path) decoder, run on the CPU."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from hivetrain.errors import DataError
from hivetrain.transforms import DeviceDecoder, Recipe, decode_image, recipe_for
from shardtool.manifest import ClassInfo, Manifest, Split


def encoded(size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A noisy image (so the encoder cannot make it trivial) in the given format."""
    g = torch.Generator().manual_seed(size[0])
    pixels = torch.randint(0, 256, (size[1], size[0], len(mode)), generator=g, dtype=torch.uint8)
    img = Image.fromarray(pixels.squeeze(-1).numpy(), mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("dataset", "size", "style"),
    [("imagenet-1k", 224, "imagenet"), ("tiny-imagenet-200", 64, "imagenet"), ("cifar-10", 32, "cifar")],
)
def test_recipes_per_dataset_give_normalised_float_images(dataset, size, style):
    manifest = Manifest(dataset, "folder", [ClassInfo("a", "a")], {"train": Split([])})
    recipe = recipe_for(manifest)
    assert (recipe.size, recipe.style) == (size, style)
    source = (32, 32) if style == "cifar" else (500, 375)
    img = decode_image(
        encoded(source, "PNG" if style == "cifar" else "JPEG"), draft=recipe.draft_size(train=True)
    )
    for train in (True, False):
        out = recipe.transform(train=train)(img)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, size, size)
        # As the loader runs it: uint8 per image, one fused normalisation per batch; the same numbers.
        torch.manual_seed(0)
        reference = recipe.transform(train=train)(img)
        torch.manual_seed(0)
        batch = recipe.normalize(recipe.image_transform(train=train)(img)[None])
        assert batch.dtype == torch.float32 and torch.allclose(batch[0], reference, atol=1e-5)
    # normalised: uniform noise in [0, 1] maps to mean ~ (0.5 - mean) / std per channel
    expected = (0.5 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    assert torch.allclose(recipe.transform(train=False)(img).mean(dim=(1, 2)), expected, atol=0.1)


def test_eval_transform_is_resize_then_centre_crop_and_deterministic():
    recipe = Recipe(224)
    assert recipe.resize_size == 256
    img = decode_image(encoded((500, 375)))
    a, b = recipe.transform(train=False)(img), recipe.transform(train=False)(img)
    assert torch.equal(a, b)
    train = recipe.transform(train=True)
    assert not torch.equal(train(img), train(img)), "training augmentation should be random"


def test_cifar_eval_keeps_the_image_and_train_pads_and_crops():
    recipe = recipe_for("cifar-10")
    img = decode_image(encoded((32, 32), "PNG"))
    plain = recipe.transform(train=False)(img)
    raw = torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, 32, 32) / 255
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    assert torch.allclose(plain, (raw - mean) / std, atol=1e-5)
    assert recipe.draft_size(train=True) is None


def test_size_option_overrides_and_unknown_datasets_need_one():
    assert recipe_for("imagenet-1k", size=128).size == 128
    assert recipe_for("my-photos", size=96) == Recipe(96)
    manifest = Manifest("my-photos", "folder", [], {}, origin="/data/manifest.json")
    with pytest.raises(DataError) as e:
        recipe_for(manifest)
    assert str(e.value) == (
        "/data/manifest.json: dataset 'my-photos' has no known image size; give one (--image-size)"
    )
    with pytest.raises(DataError, match="between 8 and 4096 pixels, not 2"):
        recipe_for("imagenet-1k", size=2)


def test_draft_mode_decodes_large_jpegs_at_reduced_scale():
    big = encoded((2000, 1500))
    full = decode_image(big)
    drafted = decode_image(big, draft=448)
    assert full.size == (2000, 1500)
    assert drafted.size == (1000, 750) and drafted.mode == "RGB"  # 1/2 scale keeps >= 448
    assert decode_image(big, draft=150).size == (250, 188)  # 1/8 scale, the most JPEG offers
    assert decode_image(encoded((500, 375)), draft=448).size == (500, 375)  # not much larger: untouched
    assert decode_image(encoded((64, 64), "PNG"), draft=16).size == (64, 64)  # PNG: no draft mode
    gray = decode_image(encoded((600, 600), mode="L"), draft=100)
    assert gray.mode == "RGB" and gray.size == (150, 150)


def test_damaged_bytes_raise_decode_errors():
    from hivetrain.transforms import DECODE_ERRORS

    jpeg = encoded((100, 80))
    for bad in (jpeg[: len(jpeg) // 2], b"\xff\xd8\xff\xe0" + bytes(300), b"not an image"):
        with pytest.raises(DECODE_ERRORS):
            decode_image(bad)


@pytest.mark.parametrize("train", [True, False])
def test_device_decoder_on_cpu_decodes_batches_and_reports_bad_images(train):
    """The GPU path's code (batched decode_jpeg, tensor transforms, normalisation) run on the CPU."""
    recipe = Recipe(64)
    raw = [encoded((200, 150)), b"\xff\xd8\xff\xe0garbage", encoded((120, 90), "PNG"), encoded((90, 120))]
    images, failed = DeviceDecoder(recipe, train=train, device="cpu")(raw)
    assert failed == [1]
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    expected = (0.5 - torch.tensor(recipe.mean)) / torch.tensor(recipe.std)
    assert torch.allclose(images.mean(dim=(0, 2, 3)), expected, atol=0.25)
    assert DeviceDecoder(recipe, train=train, device="cpu")([b"junk"]) == (None, [0])
