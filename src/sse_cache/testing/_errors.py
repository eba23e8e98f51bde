"""Error bodies shaped as each provider shapes them (OpenAI, Anthropic, Google)."""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["anthropic_error", "error_body", "google_error", "openai_error"]

_encode: Final = msgspec.json.Encoder().encode

_ANTHROPIC_KIND: Final = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
_GOOGLE_STATUS: Final = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def openai_error(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return _encode({"error": error})


def anthropic_error(message: str, kind: str, request_id: str) -> bytes:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return _encode(body)


def google_error(status: int, message: str) -> bytes:
    error = {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "INTERNAL")}
    return _encode({"error": error})


def error_body(
    flavour: str, status: int, message: str, request_id: str, param: str | None = None
) -> bytes:
    """The error answer with HTTP ``status`` in the shape of ``flavour`` (``"openai"``,
    ``"anthropic"`` or ``"gemini"``)."""
    if flavour == "gemini":
        return google_error(status, message)
    if flavour == "anthropic":
        return anthropic_error(message, _ANTHROPIC_KIND.get(status, "api_error"), request_id)
    if status == 429:
        return openai_error(message, "requests", "rate_limit_exceeded", param)
    if status >= 500:
        return openai_error(message, "server_error", None, param)
    return openai_error(message, "invalid_request_error", None, param)
