"""OpenAI-shaped error answers of the gateway, and how split-server refusals map to them.

Runs in the gateway. Every error leaves as vLLM's OpenAI server shapes it::

    {"error": {"message": "...", "type": "BadRequestError", "param": "max_tokens", "code": 400}}

(``code`` is the HTTP status, ``type`` its name). A refusal of the split server becomes the
status an OpenAI client knows what to do with: a bad request is 400; ``server_busy`` and
``too_many_sessions`` are 429 and ``sla_unreachable`` is 503, each with a ``Retry-After``
header when the server said when to retry (the official ``openai`` package honours it); a
server that cannot be reached or breaks the protocol is 502.
"""
from __future__ import annotations

import math

from vllm_split.wire.contract import ErrorCode

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestEntityTooLargeError", 429: "RateLimitError",
               500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}

# server Error.code -> (HTTP status, the request field it is about)
_SERVER_CODES: dict[str, tuple[int, str | None]] = {
    ErrorCode.MAX_TOKENS: (400, "max_tokens"),
    ErrorCode.SAMPLING: (400, None),
    ErrorCode.PROMPT_TOO_LONG: (400, "prompt"),
    ErrorCode.BAD_REQUEST: (400, None),
    ErrorCode.SERVER_BUSY: (429, None),
    ErrorCode.TOO_MANY_SESSIONS: (429, None),
    ErrorCode.SLA_UNREACHABLE: (503, None),
}


class APIError(Exception):
    """An error answer: HTTP ``status``, a message saying what was wrong, the request field
    it concerns (``param``) and, for a retryable refusal, ``retry_after_s``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}  # whole seconds (RFC 9110)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_server_error(code: str, message: str, retry_after_s: float | None = None) -> APIError:
    """The answer to a split server's ``Error`` (``code``, ``message``)."""
    status, param = _SERVER_CODES.get(code, (502, None))
    if code == ErrorCode.TLS:  # raised by this gateway's own client: the TLS handshake failed
        return APIError(502, f"cannot reach the split server over TLS: {message}")
    if status == 502:
        return APIError(502, f"the split server failed the session: {code}: {message}")
    return APIError(status, f"split server: {message} ({code})", param=param, retry_after_s=retry_after_s)


def unreachable(url: str, exc: BaseException) -> APIError:
    """The split server at ``url`` could not be reached or dropped the connection."""
    return APIError(502, f"cannot reach the split server at {url}: {type(exc).__name__}: {exc}")
