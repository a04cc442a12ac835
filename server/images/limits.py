"""Request-level image limits the chat service checks before loading anything."""

from __future__ import annotations

from ..errors import TooManyImagesError


def check_image_count(count: int, limit: int, *, param: str | None = "messages") -> None:
    """Raise TooManyImagesError (400 `too_many_images`) when a request carries more than
    `limit` images (`settings.limit_mm_per_prompt`)."""
    if count > limit:
        raise TooManyImagesError(
            f"The request has {count} images; this server accepts at most {limit} per request. "
            "Send fewer images or split the request.",
            param=param,
        )
