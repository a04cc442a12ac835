"""A bound on how much of an image's container Pillow walks in Python before it decodes.

Pillow parses the containers of JPEG (markers before the first scan), PNG (chunks) and GIF
(extension and data sub-blocks) one segment at a time in Python, holding the GIL. A file of
millions of empty segments, which no encoder writes, takes seconds there: 16 MB of empty
JPEG APP1 segments took 6 s, against milliseconds for a real 16 MB photo. `check_layout`
walks the same structure with a step budget that grows with the file (`65536 + size // 128`,
so ordinary files never come near it: PNG chunks are kilobytes, GIF sub-blocks 255 bytes)
and refuses the file once it is spent, before Pillow starts. Stray bytes between JPEG
segments or GIF blocks cost a step each, as Pillow skips them one at a time.

It also bounds the number of JPEG scans: a progressive JPEG may hold thousands of scans of
a few bytes each ("EOB runs" zero whole bands), and libjpeg passes over every block of the
image for each one (libjpeg-turbo's documentation suggests refusing past 500). As each pass
costs in proportion to the picture's area, the bound shrinks as the area grows: 499 scans of
a 7000x7000 picture (325 KB) took 27 s of a decode thread, which nothing can interrupt.

The walk is not a validator: at anything it does not recognise it stops and leaves the
verdict to Pillow. WebP (parsed by libwebp, in C) and BMP (no segments) are not walked.
"""

from __future__ import annotations

import re

from ..errors import ImageDecodeError

#: Scans a JPEG may hold. Encoders write at most a few tens (a progressive JPEG from libjpeg
#: has about 10; jpegtran's optimised scripts stay under 70).
MAX_JPEG_SCANS = 500
#: Scans times pixels a JPEG may cost (about 1 ns each on a 2-vCPU VM: 2.5 s). A 50-megapixel
#: picture may have 50 scans, a 12-megapixel one 208, anything of 5 megapixels or less 500.
MAX_JPEG_SCAN_PIXELS = 2_500_000_000
#: Scans always accepted, however large the picture (libjpeg's progressive script has 10).
MIN_JPEG_SCANS = 16
_LARGEST = (10_000, 5_000)  # --image-max-input-pixels' default
_BASE_STEPS = 65536  # about 0.1 s of Pillow's parsing
_BYTES_PER_STEP = 128

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = 0xDA
# The walk must step exactly as Pillow's JpegImagePlugin does, or a file can lead the two
# apart (a walk that read a length where Pillow reads none jumped over every scan and never
# counted them). Markers Pillow reads without a length: JPG, RSTn, SOI, EOI, JPGn. FF 00
# (an escaped FF) it skips as two bytes; FF FF as one (a fill byte). Any other marker it
# does not know (TEM, RES, FF02-FFBF) ends its parse with an error.
_JPEG_NO_LENGTH = frozenset((0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)))
_JPEG_WITH_LENGTH = frozenset((*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDB, 0xF0), 0xFE))
# Start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not): height and width follow.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_GIF_BLOCK = re.compile(rb"[\x21\x2c\x3b]")
_FRAGMENTED = ("The image's file structure is split into too many small segments to be decoded "
               "safely; save it again with an ordinary encoder.")


def check_layout(data: bytes) -> None:
    """Raise ImageDecodeError if walking `data`'s container would take more than the step
    budget, or if it is a JPEG with more scans than its size allows (`max_jpeg_scans`). Returns quickly (at most
    the budget's steps) for any input; says nothing about whether the image is valid."""
    budget = _BASE_STEPS + len(data) // _BYTES_PER_STEP
    if data.startswith(_JPEG_SOI):
        _walk_jpeg(data, budget)
    elif data.startswith(_PNG_SIGNATURE):
        _walk_png(data, budget)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _walk_gif(data, budget)


def max_jpeg_scans(width: int, height: int) -> int:
    """The scans a `width` x `height` JPEG may hold."""
    return max(MIN_JPEG_SCANS, min(MAX_JPEG_SCANS, MAX_JPEG_SCAN_PIXELS // max(1, width * height)))


def _walk_jpeg(data: bytes, budget: int) -> None:
    pos, end = 2, len(data)
    size: tuple[int, int] | None = None  # of the first frame, the one decoded
    while pos < end:
        if data[pos] != 0xFF:
            # Pillow skips bytes between segments one at a time: each one costs a step.
            nxt = data.find(b"\xff", pos)
            skipped = (end if nxt < 0 else nxt) - pos
            budget -= skipped
            if budget < 0:
                raise ImageDecodeError(_FRAGMENTED)
            if nxt < 0:
                break
            pos = nxt
        marker = data[pos + 1] if pos + 1 < end else None
        if marker is None:
            break
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
        elif marker == _JPEG_SOS:
            break
        elif marker == 0x00 or marker in _JPEG_NO_LENGTH:
            pos += 2
        elif marker in _JPEG_WITH_LENGTH:
            if pos + 4 > end:
                break
            if marker in _JPEG_SOF and size is None and pos + 9 <= end:
                # length (2), precision (1), height (2), width (2)
                size = int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        else:
            break  # Pillow refuses the file here
        budget -= 1
        if budget < 0:
            raise ImageDecodeError(_FRAGMENTED)
    # Entropy-coded data cannot hold FF DA (an FF in it is always followed by 00 or a restart
    # marker), so after the first scan each one begins a scan: of this picture, or of one
    # stored after it (an MPO's other frames). Counted over the whole file, so that no
    # disagreement between this walk, Pillow's and libjpeg's about where the scans begin can
    # hide them; the few FF DA pairs metadata may hold (an EXIF thumbnail's scans, bytes of
    # an ICC profile) are far below the limit.
    scans = data.count(b"\xff\xda")
    if scans <= MIN_JPEG_SCANS:
        return
    # No frame header before the scans, or one of no area: Pillow refuses such a file, but
    # should a decoder take it, it is bounded as the largest picture decoded.
    width, height = size if size and size[0] * size[1] else _LARGEST
    limit = max_jpeg_scans(width, height)
    if scans > limit:
        at_size = f" at {width}x{height} pixels" if limit < MAX_JPEG_SCANS and size else ""
        raise ImageDecodeError(
            f"The JPEG has {scans} scans; at most {limit} are accepted{at_size} (encoders write a few "
            "tens). Save it again as a baseline JPEG.")


def _walk_png(data: bytes, budget: int) -> None:
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        pos += 12 + length  # length, type, data, CRC
        budget -= 1
        if budget < 0:
            raise ImageDecodeError(_FRAGMENTED)
        if kind == b"IEND":
            return


def _walk_gif(data: bytes, budget: int) -> None:
    end = len(data)
    if end < 13:
        return
    pos = 13
    flags = data[10]
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)  # global colour table
    while pos < end:
        block = data[pos]
        if block == 0x3B:  # trailer
            return
        if block == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > end:
                return
            flags = data[pos + 9]
            pos += 10
            if flags & 0x80:
                pos += 3 << ((flags & 7) + 1)
            pos += 1
        else:
            # Pillow skips any other byte, one per turn of its loop: each costs a step.
            found = _GIF_BLOCK.search(data, pos)
            nxt = found.start() if found else end
            budget -= nxt - pos
            if budget < 0:
                raise ImageDecodeError(_FRAGMENTED)
            pos = nxt
            continue
        budget -= 1
        while pos < end:  # sub-blocks, up to the empty one
            size = data[pos]
            pos += 1 + size
            budget -= 1
            if size == 0:
                break
            if budget < 0:
                raise ImageDecodeError(_FRAGMENTED)
        if budget < 0:
            raise ImageDecodeError(_FRAGMENTED)
