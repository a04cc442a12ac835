"""Small test pictures, made on the spot (no files, no downloads)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def picture(width: int = 64, height: int = 48, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (width, height), color)
    # A second colour block so resizing and cropping are visible in the pixels.
    for x in range(width // 2):
        for y in range(height // 2):
            img.putpixel((x, y), (20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"
