"""What a chaos server is configured with: its host, port, hang limit, fault script and profile, and quotas; checked
all at once so one error lists every bad setting. A :class:`Quota` is enforced over a sliding window."""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field

from resilient_dspy.core.options import Options, build_options
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.faults import FaultStep, ScriptEntry, parse_steps
from resilient_dspy.testing.fault_lm.schedule import FaultProfile

__all__ = ["Quota", "as_profile", "as_quota", "check_settings", "is_loopback"]


class Quota(Options):
    """Provider-style quotas over a sliding ``window`` (a minute by default; shorten it in tests)."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="Admitted requests per window.")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Prompt + completion tokens per window.")
    window: float = Field(default=60.0, gt=0, allow_inf_nan=False, description="The window, in seconds.")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): the only hosts served by default."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def as_profile(profile: FaultProfile | Mapping[str, Any] | None) -> FaultProfile:
    """A checked fault profile from a profile, a mapping of its fields, or None (no faults)."""
    if isinstance(profile, FaultProfile):
        return profile
    return build_options(FaultProfile, "FaultProfile", dict(profile or {}))


def as_quota(quota: Quota | Mapping[str, Any] | None) -> Quota | None:
    """A checked quota from a quota, a mapping of its fields, or None (unlimited)."""
    if quota is None or isinstance(quota, Quota):
        return quota
    return build_options(Quota, "Quota", dict(quota))


def check_settings(
    *,
    host: str,
    port: int,
    max_hang: float,
    script: Iterable[ScriptEntry],
    profile: FaultProfile | Mapping[str, Any] | None,
    quota: Quota | Mapping[str, Any] | None,
    allow_remote: bool,
) -> tuple[list[FaultStep], FaultProfile, Quota | None]:
    """The script, profile and quota checked; raises one ``ConfigurationError`` listing every bad setting."""
    problems: list[tuple[str, str]] = []
    if not allow_remote and not is_loopback(host):
        problems.append(("ChaosServer.host", f"{host!r} is not a loopback address; pass allow_remote=True"))
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        problems.append(("ChaosServer.port", f"must be an int from 0 (ephemeral) to 65535 (got {port!r})"))
    if isinstance(max_hang, bool) or not isinstance(max_hang, int | float) or not 0 < max_hang < math.inf:
        problems.append(("ChaosServer.max_hang", f"must be a finite number of seconds > 0 (got {max_hang!r})"))
    steps: list[FaultStep] = []
    try:
        steps = parse_steps(script, "ChaosServer.script")
    except ConfigurationError as error:
        problems.extend(error.problems)
    checked_profile, checked_quota = FaultProfile(), None
    try:
        checked_profile = as_profile(profile)
    except ConfigurationError as error:
        problems.extend(error.problems)
    try:
        checked_quota = as_quota(quota)
    except ConfigurationError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigurationError(problems)
    return steps, checked_profile, checked_quota


class _QuotaWindow:
    """The admitted requests of the last window, each with its tokens, to answer "must this one wait, how long?"."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.log: deque[list[float]] = deque()

    def wait(self, now: float, tokens: int) -> tuple[float, str] | None:
        quota, log = self.quota, self.log
        while log and log[0][0] <= now - quota.window:
            log.popleft()
        rpm, tpm = quota.requests_per_minute, quota.tokens_per_minute
        if rpm is not None and len(log) >= rpm:
            return log[len(log) - rpm][0] + quota.window - now, "requests_per_minute"
        if tpm is not None:
            used = sum(entry[1] for entry in log)
            if used + tokens > tpm:
                if tokens > tpm:
                    return quota.window, "tokens_per_minute"
                for when, spent in log:
                    used -= spent
                    if used + tokens <= tpm:
                        return when + quota.window - now, "tokens_per_minute"
        return None

    def admit(self, now: float, tokens: int) -> list[float]:
        entry = [now, float(tokens)]
        self.log.append(entry)
        return entry
