"""Checking and normalising one image: keep valid files byte-for-byte, convert the rest once.

The check runs on every file of a build (1.28 M for ImageNet), so it is built for speed. Pillow's lazy
`Image.open` parses only the header (format, mode, size), and a complete JPEG ends with the end-of-image
marker FF D9, which cannot occur inside entropy-coded data (an FF there is always stuffed as FF 00), so a
cut-off file almost never passes. A complete PNG ends with its IEND chunk. Files that pass are stored
unchanged; only the rest (CMYK or grayscale JPEGs, PNGs named `.JPEG`, other formats, files with trailing
bytes) are fully decoded, which decides between converting them to RGB (one re-encode) and skipping them
with a reason. Real ImageNet holds all of these cases.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND\xaeB`\x82"
TAIL = 32  # bytes at the end searched for the end marker (some writers pad after it)
JPEG_FORMATS = {"JPEG", "MPO"}  # MPO: a camera JPEG with extra frames appended; readers take the first


@dataclass(frozen=True)
class ImageOptions:
    """What a build does to image bytes (both options change the shards, so they go in the manifest).

    Attributes:
        resize: re-encode images whose shorter side exceeds this many pixels down to it (None: keep).
        quality: JPEG quality for every image that has to be re-encoded.
    """

    resize: int | None = None
    quality: int = 90


@dataclass(frozen=True, slots=True)
class Normalised:
    """The outcome for one usable image.

    Attributes:
        ext: the sample field to store it under, "jpg" or "png".
        data: the new bytes, or None when the source bytes are stored unchanged.
        width, height: the size of the stored image.
        converted: why it was re-encoded (the source's format and mode, "JPEG CMYK", "PNG RGB", ..., or
            "resize"), or None.
    """

    ext: str
    data: bytes | None
    width: int
    height: int
    converted: str | None = None


class BadImage(Exception):
    """A file that is not a usable image; the message is the reason recorded in the manifest."""


def normalise(data: bytes, declared: str, options: ImageOptions) -> Normalised:
    """Check one file's bytes and decide how to store it.

    Args:
        data: the file's bytes.
        declared: the type its name claims, "jpg", "png" or anything else. Valid JPEG (or PNG) files
            named so are kept as they are; everything is stored as JPEG except PNG sources, which stay
            lossless PNG.
        options: resize and quality.

    Raises:
        BadImage: empty, not an image, truncated or corrupt.
    """
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as e:  # Pillow raises many types for broken headers
        raise BadImage(f"corrupt image header ({_describe(e)})") from None
    width, height = im.size
    target = "png" if declared == "png" else "jpg"
    fits = options.resize is None or min(width, height) <= options.resize
    if fits and im.mode == "RGB":
        if target == "jpg" and im.format in JPEG_FORMATS and JPEG_EOI in data[-TAIL:]:
            return Normalised("jpg", None, width, height)
        if target == "png" and im.format == "PNG" and PNG_IEND in data[-TAIL:]:
            return Normalised("png", None, width, height)
    return _slow_path(data, im, target, fits, options)


def _slow_path(data: bytes, im: Image.Image, target: str, fits: bool, options: ImageOptions) -> Normalised:
    """Fully decode a file that the fast check did not accept: keep, convert, or reject it."""
    source_format = im.format or "image"
    original_mode = im.mode
    if not fits:
        im.draft("RGB", _resized(im.size, options.resize))  # JPEG: let the decoder scale by 1/2, 1/4, 1/8
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Exception as e:
        raise BadImage(f"truncated or corrupt image data ({_describe(e)})") from None
    if fits and im.mode == "RGB" and im.format in ({"PNG"} if target == "png" else JPEG_FORMATS):
        # Decodes completely, only has bytes after its end marker: keep it as it is.
        return Normalised(target, None, im.width, im.height)
    reason = f"{source_format} {original_mode}" if fits else "resize"
    try:
        rgb = _to_rgb(im)
        if not fits:
            rgb = rgb.resize(_resized(rgb.size, options.resize), Image.Resampling.BICUBIC)
        data = encode(rgb, target, options.quality)
    except Exception as e:  # an odd mode or format Pillow cannot convert: skip the file, not the build
        raise BadImage(f"cannot convert {source_format} {original_mode} to RGB ({_describe(e)})") from None
    return Normalised(target, data, rgb.width, rgb.height, reason)


def encode(im: Image.Image, ext: str, quality: int = 90) -> bytes:
    """Encode an RGB image as "jpg" (at `quality`) or lossless "png", with no metadata (reproducible)."""
    buf = io.BytesIO()
    if ext == "png":
        im.save(buf, "PNG", compress_level=6)
    else:
        im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def encode_pixels(pixels: bytes, width: int, height: int) -> bytes:
    """Lossless PNG of raw interleaved RGB pixels (CIFAR samples)."""
    return encode(Image.frombytes("RGB", (width, height), pixels), "png")


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any mode; transparent areas become white rather than black."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit grayscale: keep the top 8 bits
    return im.convert("RGB")


def _resized(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """The size with the shorter side scaled to `shorter`, aspect kept (at least 1 pixel)."""
    w, h = size
    scale = shorter / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _describe(e: Exception) -> str:
    return str(e) or type(e).__name__
