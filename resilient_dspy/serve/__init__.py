"""Serving a pipeline over HTTP: ``create_app(pipeline, settings)`` (FastAPI) and ``resilient-dspy serve``.

Modules: :mod:`.settings` (ServeSettings, from the environment), :mod:`.auth` (API keys, stored hashed),
:mod:`.errors` (an error as an HTTP status), :mod:`.app` (the endpoints). See docs/guides/serving.md.
"""

try:
    import fastapi  # noqa: F401
except ImportError as error:  # pragma: no cover - the serve extra is missing
    raise ImportError("resilient_dspy.serve needs FastAPI and uvicorn: pip install 'resilient-dspy[serve]'") from error

from resilient_dspy.serve.app import create_app
from resilient_dspy.serve.auth import ApiKey, KeyRing, hash_key
from resilient_dspy.serve.settings import ServeSettings

__all__ = ["ApiKey", "KeyRing", "ServeSettings", "create_app", "hash_key"]
