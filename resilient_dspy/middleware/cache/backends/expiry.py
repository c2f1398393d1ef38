"""The expiry stamp a shared store's value carries, so a tier or a store without TTL never serves stale bytes."""

from __future__ import annotations

import math

from resilient_dspy.middleware.cache.backends.protocol import WallClock, logger

__all__: list[str] = []


_STAMP = b"rdc-exp:"


def _stamp(value: bytes, expires_at: float | None) -> bytes:
    """Prefix ``value`` with its absolute (wall-clock) expiry, in ASCII so text-mode stores keep it intact."""
    when = b"-" if expires_at is None else repr(expires_at).encode("ascii")
    return b"".join((_STAMP, when, b"\n", value))


def _unstamp(raw: bytes) -> tuple[float | None, bytes] | None:
    """``(expires_at, value)`` from a stamped blob, or None when the blob is not ours."""
    if not raw.startswith(_STAMP):
        return None
    end = raw.find(b"\n", len(_STAMP))
    if end < 0:
        return None
    when = raw[len(_STAMP) : end]
    if when == b"-":
        return None, raw[end + 1 :]
    try:
        expires_at = float(when)
    except ValueError:
        return None
    return (expires_at, raw[end + 1 :]) if math.isfinite(expires_at) else None


def _live(raw: object, wall: WallClock, where: str, key: str) -> tuple[bytes, float | None] | None:
    """The value and its remaining seconds if ``raw`` is a live stamped entry; a foreign blob is logged as a miss."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not isinstance(raw, bytes):
        logger.warning("%s: ignoring a foreign %s value under %s", where, type(raw).__name__, key)
        return None
    stamped = _unstamp(raw)
    if stamped is None:
        logger.warning("%s: ignoring a foreign or corrupt entry under %s", where, key)
        return None
    expires_at, value = stamped
    if expires_at is None:
        return value, None
    remaining = expires_at - wall()
    return (value, remaining) if remaining > 0 else None
