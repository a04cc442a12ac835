"""The server's own exception types, mapped once (in `server.app`) to OpenAI-style error JSON.

Every client-visible failure is raised as an `APIError` subclass. Its `message` is written for
the client and must never contain a library's exception text or an object repr; wrap foreign
exceptions with `raise SomeError("what the client should fix") from exc`.
"""

from __future__ import annotations

import json


class APIError(Exception):
    """An error that becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    status: int = 500
    #: OpenAI's types: "invalid_request_error" and the like for 4xx, "server_error" for
    #: every 5xx (the `code` tells them apart).
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def to_json(self) -> bytes:
        """`to_dict()` written as the app's JSON responses are (compact, UTF-8), for the
        answers given outside the app (the gateway middleware, the HTTP protocol)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    """400: the request is malformed or asks for something this server cannot do."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ImageError(InvalidRequestError):
    """400: an image could not be used. Subclasses carry the specific `code`."""

    code = "invalid_image"


class ImageURLForbiddenError(ImageError):
    code = "image_url_forbidden"


class ImageFetchError(ImageError):
    code = "image_fetch_failed"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class ImageDecodeError(ImageError):
    code = "image_decode_failed"


class TooManyImagesError(ImageError):
    code = "too_many_images"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


def shown(value: str, limit: int = 100) -> str:
    """A client-supplied name as an error message may quote it: at most `limit` characters,
    and only valid Unicode (a lone surrogate would fail the JSON response itself)."""
    value = value.encode("utf-8", "replace").decode("utf-8")
    return value if len(value) <= limit else value[:limit] + "..."


class ModelNotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(APIError):
    """429: refused by backpressure; carries a Retry-After header."""

    status = 429
    type = "rate_limit_error"
    code = "server_overloaded"


class ServiceUnavailableError(APIError):
    """503: not ready, draining, or the engine is dead."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class BodyTimeoutError(APIError):
    """408: the client stopped sending its request body."""

    status = 408
    type = "invalid_request_error"
    code = "body_timeout"


class RequestTimeoutError(APIError):
    """504: the request used up the server's whole deadline (--request-timeout).

    Sent with `x-should-retry: false`, which the official OpenAI SDKs obey: they would
    otherwise retry a 504 twice, and a request that ran out of time once would most likely
    run the full deadline again each time, tripling the load it puts on a busy server."""

    status = 504
    type = "server_error"
    code = "request_timeout"

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class InternalError(APIError):
    """500: a real fault on our side. The message stays generic; details go to the log."""

    status = 500
    type = "server_error"
    code = "internal_error"
