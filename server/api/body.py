"""Reading a request's JSON body into its schema: every way a body can be unusable becomes
a 400 (or 415) that says which, never a library's message.

The chat endpoint parses its body here rather than through FastAPI's body parameter, so that
what is cheap to check (the media type, the encoding, the number of messages) is checked
before what is not (pydantic over every message, the walk for lone surrogates): a 10 MB body
of 300,000 tiny messages held the event loop for seconds before its count was refused.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError

from server.errors import APIError, InvalidRequestError

Model = TypeVar("Model", bound=BaseModel)

#: Commas a body may hold. Every array or object of n members has n - 1 of them and nesting is
#: bounded by the parser's recursion limit, so this bounds the values JSON parsing creates
#: (on the event loop, holding it): 60 MB of `{},` took 9.6 s and 1.6 GB there. Text counts
#: too, but 200,000 commas of text are far more tokens than any model's context.
MAX_BODY_COMMAS = 200_000


class UnsupportedMediaTypeError(APIError):
    """415: the body is not plain JSON (another media type, or compressed)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


def check_media_type(content_type: str | None, content_encoding: str | None,
                     transfer_encoding: str | None = None) -> None:
    """Refuse bodies that are not `application/json` (or `application/*+json`), or that are
    compressed (by a content or a transfer coding: the HTTP layer takes off only `chunked`).
    A JSON body under another type is refused, not guessed at: a browser page may POST
    `text/plain` to a server on a private address without asking it first (CORS preflight),
    and this keeps such pages from spending its compute."""
    if content_encoding and content_encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding '{_short(content_encoding)}' is not supported; send the body uncompressed.")
    codings = [c.strip().lower() for c in (transfer_encoding or "").split(",")]
    if any(c not in ("", "chunked", "identity") for c in codings):
        raise UnsupportedMediaTypeError(
            f"Transfer-Encoding '{_short(transfer_encoding)}' is not supported; send the body uncompressed "
            f"(chunked alone is fine).")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = f"'{_short(content_type)}'" if content_type else "none"
        raise UnsupportedMediaTypeError(
            f"The body must be JSON, sent with 'Content-Type: application/json' (this request's "
            f"Content-Type: {shown}).")


def parse_json_body(raw: bytes) -> Any:
    """The body as JSON; a 400 saying what kept it from parsing."""
    if not raw:
        raise InvalidRequestError("The request has no body; send a JSON object with 'messages'.")
    if (commas := raw.count(b",")) > MAX_BODY_COMMAS:  # 0.7 ms per MB
        raise InvalidRequestError(
            f"The request body holds {commas:,} commas; at most {MAX_BODY_COMMAS:,} are accepted (array "
            "and object members and text together: no request that large fits a model's context).",
            code="request_too_complex")
    try:
        # msgspec first: it parses a photo's data: URL (megabytes of text) 2-3x faster than
        # Python's parser, and the parse holds the event loop. It refuses everything Python's
        # parser with the checks below refuses (and more: a byte-order mark, lone surrogate
        # escapes), and where it accepts, the two build the same values (the numbers too);
        # on any refusal Python's parser runs, to accept what it accepts or to say what is wrong.
        return msgspec.json.decode(raw)
    except Exception:
        pass
    try:
        text = raw.decode("utf-8-sig")  # (a byte-order mark, as some Windows writers put first)
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"The request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8.",
            code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_not_json_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"The request body is not valid JSON ({exc.msg.removesuffix(' at')} at line {exc.lineno}, "
            f"column {exc.colno}).",
            code="invalid_json") from None
    except RecursionError:
        raise InvalidRequestError("The request body nests arrays or objects too deeply to parse.",
                                  code="invalid_json") from None
    except ValueError:  # an integer of more digits than Python converts
        raise InvalidRequestError("The request body holds a number with too many digits.",
                                  code="invalid_json") from None


class _NotFinite(ValueError):
    """A number JSON cannot hold (RFC 8259 has no NaN or infinities)."""


def _not_json_constant(name: str) -> float:
    # Python's parser takes NaN, Infinity and -Infinity by default; they are not JSON, and
    # would reach the engine (a schema's `minimum: Infinity`) as values no client sent.
    raise _NotFinite(f"{name} is not a JSON number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"the number {text[:40]} is too large for a double-precision float.")
    return value


def validate_body(model: type[Model], data: Any) -> Model:
    """`data` (parsed JSON) as `model`; a 400 naming the first offending field."""
    if not isinstance(data, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, not {_json_kind(data)}.", code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_api_error(exc.errors(include_url=False, include_input=False)) from None
    except RecursionError:
        raise InvalidRequestError("The request body nests arrays or objects too deeply.") from None


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _short(text: str, limit: int = 60) -> str:
    text = text.encode("ascii", "replace").decode()
    return text if len(text) <= limit else text[:limit] + "..."


def validation_to_api_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """A 400 naming the first offending field, in words (`errors`: pydantic's, with or without
    FastAPI's "body" in front of each location); never the rejected value itself."""
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    # For unions pydantic reports one error per alternative; the deepest is the specific one.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON.", code="invalid_json")
    # Unions add type names and tags to the location; drop them, keep the field path.
    cleaned: list[str] = []
    for part in loc:
        if "[" in part or part in ("str", "int", "float", "bool") or (cleaned and cleaned[-1] == part):
            continue
        cleaned.append(part)
    loc = cleaned
    param = _format_loc(loc)
    where = ""
    if first.get("type") == "lone_surrogate" and not param:  # found by the whole-body walk
        where = (first.get("ctx") or {}).get("where", "")
        param = where if where not in ("the body", "a field name") else ""
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
        message = "Input should be a JSON object"  # (pydantic's message names our classes)
    if first.get("type") == "missing" and not param:
        text = "The request has no body; send a JSON object with 'messages'."
    elif first.get("type") == "missing":
        text = f"Missing required field '{param}'."
    elif first.get("type") == "union_tag_not_found":
        text = f"The content part at '{param}' has no 'type': use 'text' or 'image_url'."
    elif first.get("type") == "union_tag_invalid":
        text = f"Unsupported content part type at '{param}': use 'text' or 'image_url'."
    elif first.get("type") == "lone_surrogate":  # (its message names no place)
        subject = f"'{param}'" if param else where or "the body"
        text = f"{subject[0].upper()}{subject[1:]} {message}."
    elif len(loc) == 2 and loc[0] == "chat_template_kwargs":
        # (pydantic would name one branch of the union: "Input should be a valid boolean")
        text = f"Invalid value for '{param}': send true, false, a number or null (template variables take no text)."
    elif param.endswith(".content") and first.get("type") in ("string_type", "list_type"):
        text = f"Invalid value for '{param}': send a string or a list of content parts."
    else:
        text = f"Invalid value for '{param}': {message}." if param else f"Invalid request: {message}."
    return InvalidRequestError(text, param=param or None)


def _format_loc(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out
