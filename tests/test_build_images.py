"""images.normalise: which files are kept byte-for-byte, converted once, or skipped with a reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shardtool.images import BadImage, ImageOptions, encode_pixels, normalise
from tests import datagen

DEFAULT = ImageOptions()


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("kind", ["ok", "progressive", "trailing"])
def test_valid_rgb_jpegs_are_kept(kind):
    data = datagen.jpeg(1) if kind == "ok" else datagen.awkward(kind, 1)
    n = normalise(data, "jpg", DEFAULT)
    assert (n.ext, n.data, n.width, n.height, n.converted) == ("jpg", None, 40, 30, None)


@pytest.mark.parametrize(
    ("kind", "reason"), [("cmyk", "JPEG CMYK"), ("gray", "JPEG L"), ("pngasjpeg", "PNG RGB")]
)
def test_other_modes_and_formats_become_rgb_jpeg(kind, reason):
    n = normalise(datagen.awkward(kind, 2), "jpg", DEFAULT)
    assert n.ext == "jpg" and n.converted == reason
    im = decoded(n.data)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (n.width, n.height) == (40, 30)


def test_pngs_named_png_stay_lossless():
    rgb = datagen.png(3)
    assert normalise(rgb, "png", DEFAULT).data is None
    rgba = normalise(datagen.png(3, mode="RGBA"), "png", DEFAULT)
    im = decoded(rgba.data)
    assert rgba.ext == "png" and im.format == "PNG" and im.mode == "RGB"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("truncated", "truncated or corrupt image data"), ("empty", "empty file"), ("notimage", "not an image")],
)
def test_bad_files_are_rejected_with_a_reason(kind, reason):
    with pytest.raises(BadImage, match=reason):
        normalise(datagen.awkward(kind, 4), "jpg", DEFAULT)


def test_a_cut_header_is_rejected():
    with pytest.raises(BadImage, match=r"corrupt image header|not an image"):
        normalise(datagen.jpeg(5)[:40], "jpg", DEFAULT)


def test_resize_bounds_the_shorter_side():
    big = datagen.jpeg(6, (400, 300))
    n = normalise(big, "jpg", ImageOptions(resize=64, quality=75))
    assert n.converted == "resize" and (n.width, n.height) == (85, 64) == decoded(n.data).size
    small = datagen.jpeg(6, (80, 60))
    assert normalise(small, "jpg", ImageOptions(resize=64)).data is None  # already small enough


def test_reencoding_is_deterministic():
    a = normalise(datagen.awkward("cmyk", 7), "jpg", DEFAULT).data
    b = normalise(datagen.awkward("cmyk", 7), "jpg", DEFAULT).data
    assert a == b


def test_pixels_become_lossless_png():
    pixels = bytes(range(256)) * 12
    im = decoded(encode_pixels(pixels, 32, 32))
    assert im.format == "PNG" and im.tobytes() == pixels
