"""Test images, benign and hostile, built in memory (no files in the repository)."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png(width: int = 64, height: int = 48, color=(255, 0, 0), mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, (width, height), color), "PNG")


def noise_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG of a gradient plus noise, so decoding does real work. Deterministic: a
    256x256 tile of numpy noise (seeded) repeated over a stretched gradient."""
    rng = np.random.default_rng(seed)
    tile = Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8))
    noise = Image.new("RGB", (width, height))
    for x in range(0, width, 256):
        for y in range(0, height, 256):
            noise.paste(tile, (x, y))
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    return encode(Image.blend(gradient, noise, 0.25), "JPEG", quality=quality)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes] | None = None,
            idat: bytes | None = None, trns: bytes | None = None) -> bytes:
    """A PNG written by hand: any header, given rows (filter byte added) or raw IDAT, and a
    tRNS chunk if given."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + row for row in rows or []))
    extra = _chunk(b"tRNS", trns) if trns is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def exif_amplifier_png(tags: int, region: int) -> bytes:
    """A 1x1 PNG whose eXIf chunk has `tags` tags in IFD0 that all point at one `region`-byte
    block: a reader that copies each tag's data makes tags x region bytes of a small file."""
    block_at = 8 + 2 + 12 * tags + 4  # after the TIFF header and the IFD
    ifd = struct.pack("<H", tags) + b"".join(struct.pack("<HHII", 0x8000 + i, 7, region, block_at)
                                             for i in range(tags)) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * region
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"eXIf", tiff)
            + _chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) + _chunk(b"IEND", b""))


def bomb_png(side: int = 8000) -> bytes:
    """A real decompression bomb: side x side greyscale zeros, a few dozen KiB on the wire."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return raw_png(side, side, 8, 0, idat=idat)


def header_bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels (10^10) with almost no data."""
    return raw_png(side, side, 8, 2, idat=zlib.compress(b"\x00" * 64))


def png16_rgb(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    row = struct.pack(">HHH", *rgb16) * width
    return raw_png(width, height, 16, 2, rows=[row] * height)


def png16_grey(values: list[int]) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=np.uint16)), "PNG")


def animated_gif(frames: int) -> bytes:
    """A 1x1 GIF with `frames` frames, written by hand (Pillow merges identical frames)."""
    out = [b"GIF89a", struct.pack("<HHBBB", 1, 1, 0x80, 0, 0), b"\x00\x00\x00\xff\xff\xff"]
    frame = (
        b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: delay 10
        + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor 1x1
        + b"\x02\x02\x44\x01\x00"  # LZW min code 2: clear, index 0, end
    )
    out.append(frame * frames)
    out.append(b"\x3b")
    return b"".join(out)


def cmyk_jpeg(width: int = 32, height: int = 32) -> bytes:
    return encode(Image.new("CMYK", (width, height), (0, 255, 255, 0)), "JPEG", quality=95)


def rotated_jpeg() -> bytes:
    """Stored 40x20, left half red and right half blue, EXIF orientation 6 (display is
    rotated 90 degrees clockwise: 20x40 with red on top)."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def transparent_png() -> bytes:
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))
    return encode(im, "PNG")


def palette_png_with_transparency() -> bytes:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    return encode(im, "PNG", transparency=0)


def random_bytes(n: int = 4096) -> bytes:
    return random.Random(1234).randbytes(n)


HTML = b"<!doctype html><html><head><title>x</title></head><body>not an image</body></html>"
SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<rect width="10" height="10" fill="red"/></svg>')


def fragmented(fmt: str, pieces: int) -> bytes:
    """A valid 16x16 image of `fmt` (JPEG, PNG or GIF) padded with `pieces` empty container
    segments that Pillow walks one by one: JPEG APP1 markers, PNG private chunks, or
    one-byte sub-blocks of a GIF comment."""
    im = Image.new("RGB", (16, 16), (10, 200, 30))
    if fmt == "JPEG":
        data = encode(im, "JPEG")
        return data[:2] + b"\xff\xe1\x00\x02" * pieces + data[2:]
    if fmt == "PNG":
        data = encode(im, "PNG")
        ihdr_end = 8 + 25
        return data[:ihdr_end] + _chunk(b"prVt", b"") * pieces + data[ihdr_end:]
    data = encode(im.convert("P"), "GIF")
    header = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    return data[:header] + b"\x21\xfe" + b"\x01c" * pieces + b"\x00" + data[header:]


def progressive_jpeg(extra_scans: int, size: int = 64) -> bytes:
    """A progressive `size` x `size` JPEG (noise at 64, flat colour above) with its last
    (refinement) scan repeated `extra_scans` more times: libjpeg warns and decodes it, taking
    one pass over the image per scan."""
    im = Image.open(io.BytesIO(noise_jpeg(64, 64))) if size == 64 else Image.new("RGB", (size, size), (9, 99, 199))
    data = encode(im, "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra_scans + data[-2:]


def progressive_jpeg_behind_escaped_ff(extra_scans: int) -> bytes:
    """A flat progressive 64x64 JPEG with its last scan repeated `extra_scans` more times
    (tens of bytes each), and FF 00 FF FF put after its SOI: an escaped FF and a fill byte to
    Pillow and libjpeg, which decode it as before, but to a walk that took FF 00 for a marker
    with a length, a 65,535-byte segment that ends past the end of the file."""
    data = encode(Image.new("RGB", (64, 64), (90, 140, 200)), "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    data = data[:-2] + data[last:-2] * extra_scans + data[-2:]
    assert len(data) < 65_000
    return data[:2] + b"\xff\x00\xff\xff" + data[2:]


def jpeg_with_framed_junk(junk_bytes: int) -> bytes:
    """A 16x16 JPEG with `junk_bytes` zero bytes after its SOI, framed every 64 KB by FF 00
    FF FF (which a walk taking FF 00 for a marker with a length would jump): Pillow skips
    every zero byte in Python, one per turn of its loop."""
    data = encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG")
    frame = b"\xff\x00\xff\xff" + bytes(65_533)  # the jump such a walk makes: 2 + 0xFFFF
    junk = (frame * (junk_bytes // len(frame) + 1))[:junk_bytes]
    return data[:2] + junk + data[2:]


def gif_with_junk(junk_bytes: int) -> bytes:
    """A 16x16 GIF with `junk_bytes` zero bytes between its colour table and its first
    block, which Pillow skips one per turn of its loop."""
    data = encode(Image.new("RGB", (16, 16), (10, 200, 30)).convert("P"), "GIF")
    header = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    return data[:header] + bytes(junk_bytes) + data[header:]


def rle8_bmp(width: int, height: int) -> bytes:
    """A run-length-encoded (BI_RLE8) BMP whose every row is one pixel and an end-of-line:
    tiny for its size, and Pillow pads each row in Python, a byte per loop turn."""
    palette = b"".join(bytes((i, 255 - i, i, 0)) for i in range(256))
    rows = b"\x01\x05\x00\x00" * height + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
            + palette + rows)


def rgb_png_with_colour_key(width: int = 8, height: int = 8) -> bytes:
    """An RGB PNG whose black pixels are transparent (a tRNS colour key, as PNG optimisers
    write): black background, one blue pixel at (0, 0)."""
    im = Image.new("RGB", (width, height), (0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255))
    return encode(im, "PNG", transparency=(0, 0, 0))
