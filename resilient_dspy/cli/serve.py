"""``resilient-dspy serve --config stack.toml``: the stack config served by uvicorn (``--workers N`` processes).

Each worker builds the pipeline from the config (a factory, so several processes can start); the config is built
once here first so a bad one exits 2 with every problem listed. On SIGTERM uvicorn stops accepting, lets in-flight
requests finish for ``--grace`` seconds, then cancels them.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import uvicorn
    from fastapi import FastAPI
except ImportError as error:  # pragma: no cover - the serve extra is missing
    raise ImportError("resilient-dspy serve needs FastAPI and uvicorn: pip install 'resilient-dspy[serve]'") from error

from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.serve import ServeSettings, create_app

__all__ = ["app_from_environment", "command"]


def app_from_environment() -> FastAPI:
    """The app a worker serves: settings (the config path included) from ``RESILIENT_DSPY_SERVE_*``."""
    settings = ServeSettings()
    if settings.config is None:
        raise ConfigurationError([("config", "set RESILIENT_DSPY_SERVE_CONFIG to the stack config file")])
    return create_app(Pipeline.from_config(settings.config), settings)


def command(args: argparse.Namespace) -> int:
    overrides = {
        "RESILIENT_DSPY_SERVE_CONFIG": args.config,
        "RESILIENT_DSPY_SERVE_HOST": args.host,
        "RESILIENT_DSPY_SERVE_PORT": None if args.port is None else str(args.port),
        "RESILIENT_DSPY_SERVE_WORKERS": None if args.workers is None else str(args.workers),
        "RESILIENT_DSPY_SERVE_API_KEYS_FILE": args.api_keys_file,
        "RESILIENT_DSPY_SERVE_GRACE_SECONDS": None if args.grace is None else str(args.grace),
        "RESILIENT_DSPY_SERVE_REQUIRE_AUTH": "false" if args.no_auth else None,
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = value  # the workers read the same settings
    try:
        settings = ServeSettings()
        app = app_from_environment()
    except (ConfigurationError, ValueError) as error:
        print(f"resilient-dspy serve: {error}", file=sys.stderr)
        return 2
    target: FastAPI | str = app if settings.workers == 1 else "resilient_dspy.cli.serve:app_from_environment"
    uvicorn.run(
        target,
        factory=settings.workers > 1,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=int(settings.grace_seconds) if settings.grace_seconds else None,
        access_log=False,
        log_level="info",
    )
    return 0
