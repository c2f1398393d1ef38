"""The server's settings, from arguments or the environment (``RESILIENT_DSPY_SERVE_PORT=8000`` ...)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServeSettings"]


class ServeSettings(BaseSettings):
    """Where to listen, who may call, and the bounds of a request; every field also reads
    ``RESILIENT_DSPY_SERVE_<FIELD>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="RESILIENT_DSPY_SERVE_", extra="forbid")

    config: Path | None = Field(default=None, description="The stack config file (for `resilient-dspy serve`).")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, description="Processes; limits stay global only with a shared store.")
    api_keys: str | None = Field(
        default=None, description="name=secret or name=sha256:<hex>, comma-separated (secrets from the environment)."
    )
    api_keys_file: Path | None = Field(default=None, description="A TOML file of [[keys]] name, sha256, disabled.")
    require_auth: bool = Field(default=True, description="False serves without keys (local use only).")
    max_body_bytes: int = Field(default=65536, gt=0)
    max_field_chars: int = Field(default=8000, gt=0)
    max_batch: int = Field(default=100, gt=0)
    batch_concurrency: int = Field(default=8, gt=0)
    cors_origins: list[str] = Field(default_factory=list, description="Empty: CORS off.")
    grace_seconds: float = Field(default=10.0, ge=0, description="How long in-flight requests may finish on SIGTERM.")
    log_requests: bool = True
