"""An error a call raised, as an HTTP answer: rejections 429/503 with Retry-After, timeouts 504, invalid input 422,
anything else 500 with the request id and no internals."""

from __future__ import annotations

import math
from typing import Any

from resilient_dspy.errors import (
    BudgetExceededError,
    InvalidInputError,
    RateLimitedError,
    RejectedError,
    RequestTooLargeError,
    TimeoutExceededError,
)

__all__ = ["error_answer"]


def error_answer(error: BaseException, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` for ``error``; the body names the error's kind, never its traceback."""
    headers: dict[str, str] = {}
    if isinstance(error, RejectedError):
        status = 429 if isinstance(error, RateLimitedError | BudgetExceededError) else 503
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after >= 0 and math.isfinite(retry_after):
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return status, _body("rejected", type(error).__name__, request_id, retry_after=retry_after), headers
    if isinstance(error, TimeoutExceededError):
        return 504, _body("timeout", type(error).__name__, request_id), headers
    if isinstance(error, InvalidInputError):
        problems = [{"field": field, "rule": rule} for field, rule in error.problems]
        return 422, _body("invalid_input", type(error).__name__, request_id, problems=problems), headers
    if isinstance(error, RequestTooLargeError):
        return 413, _body("too_large", type(error).__name__, request_id), headers
    return 500, _body("internal", "InternalError", request_id), headers


def _body(kind: str, error: str, request_id: str, **extra: Any) -> dict[str, Any]:
    return {"error": kind, "type": error, "request_id": request_id, **extra}
