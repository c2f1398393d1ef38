"""API keys: several, each with a name, stored as SHA-256 digests and compared in constant time.

``Authorization: Bearer <key>``: no key or an unknown one is 401, a disabled key is 403. Keys come from the
environment (``RESILIENT_DSPY_SERVE_API_KEYS="alice=sha256:<hex>,bob=<secret>"``) or a TOML file of
``[[keys]]`` tables (``name``, ``sha256``, ``disabled``); a plain secret is hashed as it is read, never kept.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

from resilient_dspy.errors import ConfigurationError

__all__ = ["ApiKey", "KeyRing", "hash_key"]


def hash_key(secret: str) -> str:
    """The digest a key file stores for ``secret`` (keys are long random strings: a plain SHA-256 suffices)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: str
    disabled: bool = False


class KeyRing:
    """The known keys; :meth:`find` checks a presented secret against every one, so timing says nothing."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [key.name for key in keys]
        if len(set(names)) != len(names):
            raise ConfigurationError([("api_keys", "each key needs its own name")])
        self.keys = tuple(keys)

    @classmethod
    def from_sources(cls, text: str | None, file: Path | None) -> KeyRing:
        keys: list[ApiKey] = []
        problems: list[tuple[str, str]] = []
        for index, entry in enumerate(part.strip() for part in (text or "").split(",")):
            if not entry:
                continue
            name, sep, secret = entry.partition("=")
            if not sep or not name or not secret:
                problems.append((f"api_keys[{index}]", "must be name=secret or name=sha256:<hex>"))
                continue
            digest = secret.removeprefix("sha256:") if secret.startswith("sha256:") else hash_key(secret)
            keys.append(ApiKey(name.strip(), digest.lower()))
        if file is not None:
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as error:
                raise ConfigurationError([("api_keys_file", f"cannot read {str(file)!r}: {error}")]) from None
            for index, item in enumerate(data.get("keys", [])):
                name, digest = item.get("name"), item.get("sha256")
                if not isinstance(name, str) or not isinstance(digest, str) or len(digest) != 64:
                    problems.append((f"api_keys_file.keys[{index}]", "needs name and sha256 (64 hex digits)"))
                    continue
                keys.append(ApiKey(name, digest.lower(), bool(item.get("disabled", False))))
        if problems:
            raise ConfigurationError(problems)
        return cls(keys)

    def find(self, secret: str) -> ApiKey | None:
        """The key ``secret`` is, or None; every stored digest is compared, each in constant time."""
        presented = hash_key(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found
