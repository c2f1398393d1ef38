"""The error taxonomy: classify() over every error a pipeline meets, and the behaviour of our own errors."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import (
    BudgetExceededError,
    BulkheadFullError,
    CircuitOpenError,
    FallbackFailedError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    RetriesExhaustedError,
    TimeoutExceededError,
)
from resilient_dspy.errors import MAX_RETRY_AFTER, ConfigurationError, ErrorInfo, ErrorKind, classify

K = ErrorKind
MAX = MAX_RETRY_AFTER
HUGE = 10**400  # an int too large for a float


class WithRetryAfter(Exception):
    """An unknown error type carrying an arbitrary ``retry_after`` attribute."""

    def __init__(self, retry_after: Any) -> None:
        super().__init__("custom")
        self.retry_after = retry_after


def parse_error() -> dspy.AdapterParseError:
    return dspy.AdapterParseError("ChatAdapter", dspy.Signature("question -> answer"), "no fields here")


# error, kind, retryable, retry_after, cancellation, needs_fresh_response
CASES: list[tuple[str, BaseException, ErrorKind, bool, float | None, bool, bool]] = [
    # DSPy errors
    ("rate_limit", dspy.LMRateLimitError("429"), K.RATE_LIMIT, True, None, False, False),
    ("rate_limit_after", dspy.LMRateLimitError("429", retry_after=2.0), K.RATE_LIMIT, True, 2.0, False, False),
    ("rate_limit_after_int", dspy.LMRateLimitError("429", retry_after=3), K.RATE_LIMIT, True, 3.0, False, False),
    ("rate_limit_after_zero", dspy.LMRateLimitError("429", retry_after=0), K.RATE_LIMIT, True, 0.0, False, False),
    ("server_503", dspy.LMServerError("x", status=503), K.SERVER, True, None, False, False),
    ("server_after", dspy.LMServerError("x", status=500, retry_after=1.5), K.SERVER, True, 1.5, False, False),
    ("lm_timeout", dspy.LMTimeoutError("slow"), K.TIMEOUT, True, None, False, False),
    ("lm_transport", dspy.LMTransportError("reset"), K.TRANSPORT, True, None, False, False),
    ("stream_truncated", dspy.LMStreamAssemblyError("stream ended early"), K.TRANSPORT, True, None, False, False),
    (
        "stream_truncated_after",
        dspy.LMStreamAssemblyError("cut", partial="half", retry_after=2),
        K.TRANSPORT,
        True,
        2.0,
        False,
        False,
    ),
    ("auth", dspy.LMAuthError("key", status=401), K.CLIENT, False, None, False, False),
    ("billing", dspy.LMBillingError("credit", status=402), K.CLIENT, False, None, False, False),
    ("invalid_request", dspy.LMInvalidRequestError("bad", status=400), K.CLIENT, False, None, False, False),
    ("context_window", dspy.ContextWindowExceededError(model="small"), K.CLIENT, False, None, False, False),
    ("adapter_parse", parse_error(), K.PARSE, True, None, False, True),
    ("provider_429", dspy.LMProviderError("x", status=429, retry_after=4.0), K.RATE_LIMIT, True, 4.0, False, False),
    ("provider_503", dspy.LMProviderError("x", status=503), K.SERVER, True, None, False, False),
    ("provider_502", dspy.LMProviderError("x", status=502), K.SERVER, True, None, False, False),
    ("provider_408", dspy.LMProviderError("x", status=408), K.SERVER, True, None, False, False),
    ("provider_404", dspy.LMProviderError("x", status=404), K.CLIENT, False, None, False, False),
    ("provider_200_unparsable_body", dspy.LMProviderError("x", status=200), K.SERVER, True, None, False, False),
    ("provider_no_status", dspy.LMProviderError("x"), K.CLIENT, False, None, False, False),
    ("lm_error_base", dspy.LMError("x"), K.UNKNOWN, False, None, False, False),
    # malformed retry_after values are dropped, the classification stays
    ("retry_after_negative", dspy.LMRateLimitError("x", retry_after=-1), K.RATE_LIMIT, True, None, False, False),
    ("retry_after_nan", dspy.LMRateLimitError("x", retry_after=float("nan")), K.RATE_LIMIT, True, None, False, False),
    ("retry_after_inf", dspy.LMRateLimitError("x", retry_after=float("inf")), K.RATE_LIMIT, True, None, False, False),
    ("retry_after_bool", dspy.LMRateLimitError("x", retry_after=True), K.RATE_LIMIT, True, None, False, False),
    ("retry_after_str", dspy.LMRateLimitError("x", retry_after="5"), K.RATE_LIMIT, True, None, False, False),
    # a huge Retry-After is capped (DSPy stores an int as given, even one too large for a float)
    ("retry_after_huge_int", dspy.LMRateLimitError("x", retry_after=HUGE), K.RATE_LIMIT, True, MAX, False, False),
    ("retry_after_huge_float", dspy.LMServerError("x", retry_after=1e12), K.SERVER, True, MAX, False, False),
    ("huge_status", dspy.LMProviderError("x", status=503, retry_after=HUGE), K.SERVER, True, MAX, False, False),
    ("retry_after_at_cap", dspy.LMRateLimitError("x", retry_after=MAX), K.RATE_LIMIT, True, MAX, False, False),
    # our errors
    ("circuit_open", CircuitOpenError(retry_after=2.5), K.REJECTED, False, 2.5, False, False),
    ("bulkhead_full", BulkheadFullError(), K.REJECTED, False, None, False, False),
    ("rate_limited", RateLimitedError(retry_after=0.25), K.REJECTED, False, 0.25, False, False),
    ("budget_exceeded", BudgetExceededError(), K.REJECTED, False, None, False, False),
    ("rejected", RejectedError("no", retry_after=1.0), K.REJECTED, False, 1.0, False, False),
    ("retries_exhausted", RetriesExhaustedError(3, dspy.LMServerError("x")), K.GAVE_UP, False, None, False, False),
    ("fallback_failed", FallbackFailedError("all", [ValueError("a")]), K.GAVE_UP, False, None, False, False),
    ("timeout_attempt", TimeoutExceededError(2.0, scope="attempt"), K.TIMEOUT, True, None, False, False),
    ("configuration", ConfigurationError([("x", "bad")]), K.USER_MISTAKE, False, None, False, False),
    ("resilience_base", ResilienceError("x"), K.UNKNOWN, False, None, False, False),
    # builtins
    ("cancelled", asyncio.CancelledError(), K.CANCELLED, False, None, True, False),
    ("builtin_timeout", TimeoutError(), K.TIMEOUT, True, None, False, False),
    ("builtin_connection", ConnectionError(), K.TRANSPORT, True, None, False, False),
    ("connection_reset", ConnectionResetError(), K.TRANSPORT, True, None, False, False),
    ("value_error", ValueError("bug"), K.UNKNOWN, False, None, False, False),
    ("type_error", TypeError("bug"), K.USER_MISTAKE, False, None, False, False),
    ("attribute_error", AttributeError("bug"), K.USER_MISTAKE, False, None, False, False),
    ("dspy_no_lm", ValueError("No LM is loaded. Please configure the LM."), K.USER_MISTAKE, False, None, False, False),
    ("keyboard_interrupt", KeyboardInterrupt(), K.UNKNOWN, False, None, False, False),
    ("system_exit", SystemExit(1), K.UNKNOWN, False, None, False, False),
    ("custom_retry_after", WithRetryAfter(7.0), K.UNKNOWN, False, 7.0, False, False),
]


@pytest.mark.parametrize(
    ("error", "kind", "retryable", "retry_after", "cancellation", "fresh"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify(
    error: BaseException,
    kind: ErrorKind,
    retryable: bool,
    retry_after: float | None,
    cancellation: bool,
    fresh: bool,
) -> None:
    """classify() gives the expected kind, retryability, retry-after, cancellation flag and cache need."""
    info = classify(error)
    assert isinstance(info, ErrorInfo)
    assert info.kind is kind
    assert info.retryable is retryable
    assert info.retry_after == retry_after
    assert info.cancellation is cancellation
    assert info.needs_fresh_response is fresh


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**300, max_value=10**1000),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=3),
    ),
    error_type=st.sampled_from([dspy.LMRateLimitError, dspy.LMServerError, dspy.LMProviderError, WithRetryAfter]),
)
def test_classify_never_raises_and_bounds_every_retry_after(value: Any, error_type: type[Exception]) -> None:
    """Whatever ``retry_after`` an error carries, classify() answers, with None or a number in [0, MAX_RETRY_AFTER]."""
    error = WithRetryAfter(value) if error_type is WithRetryAfter else error_type("x", status=503, retry_after=value)
    info = classify(error)
    assert info.retry_after is None or 0.0 <= info.retry_after <= MAX_RETRY_AFTER
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and value != float("inf"):
        assert info.retry_after == min(float(min(value, MAX_RETRY_AFTER)), MAX_RETRY_AFTER)


def test_error_info_is_frozen() -> None:
    """An ErrorInfo cannot be mutated after classify() returns it."""
    info = classify(ValueError())
    with pytest.raises(AttributeError):
        info.retryable = True  # type: ignore[misc]


def test_classify_per_type_rules_match_isinstance_every_time() -> None:
    """The rules learnt once per type give what the isinstance chain gives, on first and later sight."""
    from resilient_dspy.errors import _by_attributes, _rule

    for _, error, *_ in CASES:
        rule = _rule(lambda types, error=error: isinstance(error, types))
        expected = _by_attributes(error) if rule is None else rule[0]
        for _ in range(2):
            info = classify(error)
            assert (info.kind, info.retryable, info.needs_fresh_response) == (
                expected.kind,
                expected.retryable,
                expected.needs_fresh_response,
            )


def test_classify_follows_a_disguised_class() -> None:
    """An object whose ``__class__`` is not its type is classified by isinstance, as before the per-type rules."""

    class Disguised(ValueError):
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            return ConnectionError

    assert classify(Disguised()).kind is K.TRANSPORT
    assert classify(ValueError()).kind is K.UNKNOWN


# ------------------------------------------------------------------------------------------- our error types


def test_timeout_exceeded_is_a_timeout_error() -> None:
    """TimeoutExceededError is caught by `except TimeoutError` and by `except ResilienceError`."""
    error = TimeoutExceededError(3, scope="attempt")
    assert isinstance(error, TimeoutError)
    assert isinstance(error, ResilienceError)
    assert (error.timeout, error.scope) == (3, "attempt")
    assert str(error) == "attempt timeout of 3s exceeded"
    assert str(TimeoutExceededError(0.5)) == "total timeout of 0.5s exceeded"
    with pytest.raises(TimeoutError):
        raise error


def test_retries_exhausted_chains_the_last_error() -> None:
    """RetriesExhaustedError keeps the last error as last_error and __cause__, even when raised plainly."""
    last = dspy.LMServerError("503 again", status=503)
    with pytest.raises(RetriesExhaustedError) as caught:
        raise RetriesExhaustedError(3, last, reason="budget")
    error = caught.value
    assert error.last_error is last
    assert error.__cause__ is last
    assert (error.attempts, error.reason) == (3, "budget")
    assert str(error) == "gave up after 3 attempts (budget): LMServerError: 503 again"
    assert str(RetriesExhaustedError(1, ValueError("x"))) == "gave up after 1 attempt (max_attempts): ValueError: x"


def test_rejections_carry_retry_after_in_attribute_and_message() -> None:
    """A rejection's retry_after is readable and shown in its message; all rejections are ResilienceErrors."""
    error = CircuitOpenError("circuit open", retry_after=2.5)
    assert error.retry_after == 2.5
    assert str(error) == "circuit open (retry after 2.5s)"
    assert str(BulkheadFullError()) == "BulkheadFullError"
    for kind in (CircuitOpenError, BulkheadFullError, RateLimitedError, BudgetExceededError):
        assert issubclass(kind, RejectedError)
        assert issubclass(kind, ResilienceError)


def test_fallback_failed_is_an_exception_group() -> None:
    """FallbackFailedError is an ExceptionGroup holding every alternative's error in order."""
    errors = [dspy.ContextWindowExceededError(model="small"), dspy.LMServerError("x", status=503)]
    error = FallbackFailedError("every alternative failed", errors)
    assert isinstance(error, ExceptionGroup)
    assert isinstance(error, ResilienceError)
    assert error.message == "every alternative failed"
    assert list(error.exceptions) == errors
    assert error.tried == ()


@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "keyword"])
def test_fallback_failed_records_what_was_tried(by_keyword: bool) -> None:
    """``tried`` (the alternatives' names) is accepted positionally (as Fallback passes it) and by keyword."""
    errors = [ValueError("primary"), KeyError("backup")]
    if by_keyword:
        error = FallbackFailedError("all failed", errors, tried=["primary", "backup"])
    else:
        error = FallbackFailedError("all failed", errors, ["primary", "backup"])
    assert error.tried == ("primary", "backup")
    assert list(error.exceptions) == errors


def test_fallback_failed_works_with_except_star() -> None:
    """`except*` splits a FallbackFailedError by type; each handler sees a FallbackFailedError part."""
    window = dspy.ContextWindowExceededError(model="small")
    server = dspy.LMServerError("x", status=503)
    seen: dict[str, list[BaseException]] = {}
    try:
        raise FallbackFailedError("every alternative failed", [window, server])
    except* dspy.ContextWindowExceededError as group:
        assert isinstance(group, FallbackFailedError)
        seen["window"] = list(group.exceptions)
    except* dspy.LMServerError as group:
        assert isinstance(group, FallbackFailedError)
        seen["server"] = list(group.exceptions)
    assert seen == {"window": [window], "server": [server]}


def test_fallback_failed_unhandled_part_is_reraised() -> None:
    """What `except*` does not handle is re-raised as a (derived) FallbackFailedError."""
    window = dspy.ContextWindowExceededError(model="small")
    bug = ValueError("bug")
    with pytest.raises(FallbackFailedError) as caught:
        try:
            raise FallbackFailedError("every alternative failed", [window, bug])
        except* dspy.ContextWindowExceededError:
            pass
    assert list(caught.value.exceptions) == [bug]


def test_configuration_error_lists_every_problem() -> None:
    """The message counts and lists every (field, rule) pair; problems keeps them as a tuple."""
    problems = [("Retry.max_attempts", "must be >= 1"), ("Retry.jitter", "unknown kind"), ("clock", "not a clock")]
    error = ConfigurationError(problems)
    assert error.problems == tuple(problems)
    assert str(error) == (
        "3 invalid settings:\n"
        "  - Retry.max_attempts: must be >= 1\n"
        "  - Retry.jitter: unknown kind\n"
        "  - clock: not a clock"
    )
    assert str(ConfigurationError([("x", "bad")])) == "1 invalid setting:\n  - x: bad"
    assert isinstance(error, ValueError)
    assert isinstance(error, ResilienceError)


@pytest.mark.parametrize(
    ("seconds", "shown"), [(3600.0, "3600s"), (1.6, "1.6s"), (0.0123, "0.012s"), (0.0, "0s"), (86400.0, "86400s")]
)
def test_a_rejection_shows_its_retry_after_in_plain_seconds(seconds: float, shown: str) -> None:
    from resilient_dspy import CircuitOpenError

    assert str(CircuitOpenError("open", retry_after=seconds)) == f"open (retry after {shown})"
