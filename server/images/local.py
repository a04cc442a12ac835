"""Image bytes that need no network: `data:` URLs and files under the local media directory."""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from pathlib import Path

from ..errors import ImageDecodeError, ImageFetchError, ImageURLForbiddenError
from .fetch import too_large
from .urls import DataURL, FileURL

#: base64 characters decoded per step. binascii holds the GIL while it works (a worker
#: thread would stall the event loop just the same), so large payloads are decoded on the
#: loop in steps that yield in between.
B64_STEP = 128 * 1024


async def decode_data_url(url: DataURL, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URL. The size is checked from the encoded length before
    anything is decoded (the length without line breaks, spaces and percent-escapes, which
    carry no bytes). Raises ImageTooLargeError, or ImageDecodeError for what is not base64
    even read leniently (see `_lenient`)."""
    text, start, end = url.url, url.start, len(url.url)
    if _decoded_size(text, start, end) > max_bytes:  # no copy of the payload here
        if not _needs_lenient(text, start, end):
            raise too_large(max_bytes)
        # Lines or escapes make the encoded length overstate the bytes: measure the payload
        # as it will be decoded (a copy, bounded by the body's own size limit).
        payload = _lenient(text[start:end])
        if _decoded_size(payload, 0, len(payload)) > max_bytes:
            raise too_large(max_bytes)
        data = await _decode_steps(payload, 0)
    elif (end - start) % 4 or text.find("=", start, end - 2) >= 0:
        data = await _decode_steps(_lenient(text[start:end]), 0)
    else:
        try:
            data = await _decode_steps(text, start)
        except ImageDecodeError:
            data = await _decode_steps(_lenient(text[start:end]), 0)
    if not data:
        raise ImageDecodeError("The data: URL holds no image data.")
    return data


def _decoded_size(text: str, start: int, end: int) -> int:
    """The bytes that strict base64 in `text[start:end]` decodes to."""
    padding = (text.endswith("=", start, end)) + (text.endswith("==", start, end))
    return (end - start) // 4 * 3 - padding


def _needs_lenient(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]` holds characters `_lenient` takes out or shortens."""
    return any(text.find(c, start, end) >= 0 for c in "\n\r \t%")


def _not_base64() -> ImageDecodeError:
    return ImageDecodeError("The data: URL is not valid base64.")


#: Line breaks and spaces (MIME's 76-character lines, as the `base64` tool writes) are
#: dropped; the URL-safe alphabet is read as the standard one.
_LENIENT = str.maketrans({" ": None, "\t": None, "\r": None, "\n": None, "-": "+", "_": "/"})


def _lenient(payload: str) -> str:
    """`payload` as strict base64: percent-escapes undone, whitespace dropped, the URL-safe
    alphabet mapped to the standard one, padding restored. A copy: only for a payload that
    failed the strict reading."""
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    payload = payload.translate(_LENIENT).rstrip("=")
    if len(payload) % 4 == 1 or "=" in payload:
        raise _not_base64()
    return payload + "=" * (-len(payload) % 4)


async def _decode_steps(text: str, start: int) -> bytes:
    """Strict base64 from `text[start:]`, in steps that let the event loop run between them."""
    end = len(text)
    parts: list[bytes] = []
    try:
        for i in range(start, end, B64_STEP):
            parts.append(base64.b64decode(text[i : min(i + B64_STEP, end)], validate=True))
            if end - start > B64_STEP:
                await asyncio.sleep(0)
    except (binascii.Error, ValueError) as exc:
        raise _not_base64() from exc
    return b"".join(parts)


class LocalMediaReader:
    """Reads `file:` image URLs, only inside `root`. Blocking: run it in a worker thread."""

    def __init__(self, root: Path | None, max_bytes: int) -> None:
        self.root = root.resolve() if root is not None else None
        self.max_bytes = max_bytes

    def read(self, url: FileURL) -> bytes:
        """The file's bytes. Raises ImageURLForbiddenError when file: URLs are off or the
        path (after `..` and symlinks are resolved) leaves the media directory;
        ImageFetchError when there is no readable regular file; ImageTooLargeError."""
        if self.root is None:
            raise ImageURLForbiddenError(
                "file: image URLs are not enabled on this server (its --allowed-local-media-path does that).")
        try:
            path = Path(url.path).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
            raise ImageURLForbiddenError("The file: image URL cannot be resolved.") from exc
        if not path.is_relative_to(self.root):
            raise ImageURLForbiddenError("The file: image URL points outside the allowed local media directory.")
        try:
            if not path.is_file():
                raise ImageFetchError("No image file exists at that path in the local media directory.")
            if path.stat().st_size > self.max_bytes:
                raise too_large(self.max_bytes)
            with path.open("rb") as f:
                data = f.read(self.max_bytes + 1)
        except OSError as exc:
            raise ImageFetchError("The image file in the local media directory could not be read.") from exc
        if len(data) > self.max_bytes:
            raise too_large(self.max_bytes)
        return data
