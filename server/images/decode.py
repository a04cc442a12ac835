"""Turning untrusted image bytes into the RGB picture the model sees. Blocking and
CPU-bound: the loader runs `decode_image` in its worker pool.

Order matters for safety: the container's layout is walked with a bounded budget
(layout.py), the format is sniffed against an allow-list, then the pixel count
and the frame count are checked from the header, and only then are pixels decoded (so a
decompression bomb is refused before it allocates). Pillow's DecompressionBombWarning is
made an error by `prepare()`. Every failure is raised as our own ImageError with a fixed
message; the decoder's exception text never reaches the client.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError, ImageError, ImageTooLargeError
from .family import FamilySpec, check_shape, target_size
from .layout import check_layout

log = logging.getLogger(__name__)

#: Formats Pillow may parse (by sniffed content, not by file name or Content-Type). Camera
#: JPEGs with several pictures come back from the JPEG plugin as format "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
SUPPORTED_TEXT = "JPEG, PNG, GIF, WebP or BMP"
RESAMPLE = Image.Resampling.BICUBIC  # (also Qwen-VL's own, for its square)
#: Background for transparent pixels (what the Qwen2-VL family's preprocessing composites onto).
BACKGROUND = (255, 255, 255)
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
#: Pillow decodes run-length-encoded BMPs in Python, about a pixel per loop turn (a 30 KB
#: file of 7071x7071 pixels held a decode thread for seconds); larger ones are refused.
MAX_RLE_BMP_PIXELS = 1 << 20
_BMP_RLE = {1, 2}  # BI_RLE8, BI_RLE4
_EXIF_ORIENTATION = 0x0112


def prepare(max_input_pixels: int = 0) -> None:
    """Call once at startup, before decoding, with the largest `DecodeLimits.max_input_pixels`
    in use.

    Loads Pillow's format plugins now: Pillow imports them lazily on the first open of a
    format outside its core five, holding the GIL for a few hundred milliseconds, which
    from a worker thread would stall the event loop. Makes Pillow's
    DecompressionBombWarning an error for the whole process: `warnings.catch_warnings` is
    not thread-safe, and the decode threads run concurrently. And raises Pillow's own bomb
    threshold (89.5 M pixels by default) to `max_input_pixels` when that is larger: our
    header check enforces the setting, and Pillow's would refuse below it (never lowered:
    Pillow's stays a backstop)."""
    Image.init()
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    if Image.MAX_IMAGE_PIXELS is not None and max_input_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_input_pixels


@dataclass(frozen=True)
class DecodeLimits:
    max_input_pixels: int
    max_frames: int


def decode_image(
    data: bytes, *, limits: DecodeLimits, family: FamilySpec, max_pixels: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `data` into a fully loaded RGB image and its (width, height) after EXIF
    orientation but before resizing. The image is resized as `family.target_size` says.

    Raises ImageDecodeError (unsupported format, truncated or corrupt data),
    ImageTooLargeError (pixel or frame limit), ImageError (shape the model cannot take)."""
    try:
        return _decode(data, limits, family, max_pixels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"The image has too many pixels; at most {limits.max_input_pixels:,} are accepted."
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(f"The data is not a supported image; send {SUPPORTED_TEXT}.") from exc
    except MemoryError as exc:
        raise ImageTooLargeError("The image is too large to decode on this server.") from exc
    except ValueError as exc:
        if "MAX_TEXT" in str(exc):  # Pillow's caps on PNG text and colour-profile chunks
            raise ImageTooLargeError("The image's metadata (PNG text or colour-profile chunks) is too large; "
                                     "strip it and send the image again.") from exc
        log.debug("image decode failed: %r", exc)
        raise ImageDecodeError("The image could not be decoded; the file is truncated or corrupt.") from exc
    except Exception as exc:  # any decoder failure: OSError, SyntaxError, ValueError, EOFError...
        log.debug("image decode failed: %r", exc)
        raise ImageDecodeError("The image could not be decoded; the file is truncated or corrupt.") from exc


def _decode(
    data: bytes, limits: DecodeLimits, family: FamilySpec, max_pixels: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    check_layout(data)
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageDecodeError("The image has no pixels.")
        if width * height > limits.max_input_pixels:
            raise ImageTooLargeError(
                f"The image is {width}x{height} pixels; at most {limits.max_input_pixels:,} pixels are accepted."
            )
        # From the header, before any pixel is decoded (a 95 KB PNG of 1x49,000,000 pixels
        # took 8 s to load before it was refused); turning the picture upright cannot change it.
        check_shape(family, width, height)
        if im.format == "BMP" and im.info.get("compression") in _BMP_RLE and width * height > MAX_RLE_BMP_PIXELS:
            raise ImageTooLargeError(
                f"The run-length-encoded BMP is {width}x{height} pixels; at most {MAX_RLE_BMP_PIXELS:,} "
                "are accepted in that encoding (send it as PNG or an uncompressed BMP).")
        frames = getattr(im, "n_frames", 1)
        if frames > limits.max_frames:
            raise ImageTooLargeError(
                f"The animated image has {frames} frames; at most {limits.max_frames} are accepted."
            )
        if frames > 1:
            im.seek(0)
        if im.format == "PNG":
            # Before the EXIF lookup, which loads a PNG's pixels itself: a decoder error
            # there would be taken for bad EXIF (and Pillow drops the tiles before raising,
            # so the load() below "succeeded" with a partly black picture).
            im.load()
        orientation = _orientation(im)
        swapped = orientation in _SWAPS_SIDES
        if swapped:
            width, height = height, width
        target = target_size(family, width, height, max_pixels)  # upright
        stored_target = (target[1], target[0]) if swapped else target  # as stored, before rotation
        square = family.square_side is not None and target == (family.square_side, family.square_side)
        if im.format in ("JPEG", "MPO") and target[0] * target[1] < width * height and not square:
            # libjpeg may decode at 1/2, 1/4 or 1/8 scale while still covering the target.
            im.draft("RGB", stored_target)
        im.load()
        if im.format == "PNG" and "transparency" in im.info and im.mode in ("1", "L"):
            _scale_grey_key(im, data)
        out = _to_rgb(im, composite=not family.drop_alpha)
    if square:
        # The model's processor's own resize, on the upright picture (the processor then
        # finds the picture at its size and leaves it as it is: the same pixels either way).
        if orientation in _TRANSPOSE:
            out = out.transpose(_TRANSPOSE[orientation])
        if out.size != target:
            out = out.resize(target, RESAMPLE)
    else:
        if out.size != stored_target:
            shrinking = out.size[0] > stored_target[0]
            out = out.resize(stored_target, RESAMPLE, reducing_gap=2.0 if shrinking else None)
        if orientation in _TRANSPOSE:
            out = out.transpose(_TRANSPOSE[orientation])
    out.load()
    # The pixels are upright now, but Pillow carried the file's metadata along; vLLM applies
    # any EXIF (or XMP) orientation it finds to every image it is handed, which would turn
    # the picture a second time. Nothing downstream needs the metadata.
    out.info.clear()
    return out, (width, height)


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # malformed EXIF: treat as unrotated rather than refuse the image
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _scale_grey_key(im: Image.Image, data: bytes) -> None:
    """Pillow scales the pixels of a 1-, 2- or 4-bit greyscale PNG up to 8 bits (x255, x85,
    x17) but keeps the tRNS colour key as the file's own sample value, so the key matched the
    wrong pixels or none: scale it the same way. (`check_layout` found IHDR first: its bit
    depth is byte 24 of the file, its colour type byte 25.)"""
    depth, colour_type = data[24], data[25]
    key = im.info["transparency"]
    if colour_type == 0 and depth < 8 and isinstance(key, int):
        im.info["transparency"] = key * (255 // ((1 << depth) - 1))


def _to_rgb(im: Image.Image, composite: bool = True) -> Image.Image:
    """A new RGB image: palette and alpha composited on white (a transparent colour key of a
    palette, greyscale or RGB image too), CMYK/YCbCr/L/1 converted, 16- and 32-bit greyscale
    scaled down to 8 bits (Pillow's own conversion clips). `composite=False`: transparency
    dropped instead, as Pillow's `convert("RGB")` drops it (the colour under it stays)."""
    mode = im.mode
    if not composite and mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return im.convert("RGB")
    if mode == "1" and "transparency" in im.info:
        key = im.info["transparency"]
        im = im.convert("L")  # (0 and 255, the key with it; Pillow drops a "1" image's key)
        im.info["transparency"] = key
        mode = im.mode
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = im.mode
    elif mode == "P":
        im = im.convert("RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        grey = (arr >> 8).astype(np.uint8)
        if composite and isinstance(key := im.info.get("transparency"), int):
            grey[arr == key] = BACKGROUND[0]  # (the key matches the 16-bit samples, not the 8)
        return Image.fromarray(grey).convert("RGB")  # 2-D uint8: mode L
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")
