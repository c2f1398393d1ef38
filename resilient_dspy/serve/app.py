"""``create_app(pipeline, settings)``: a FastAPI app around a pipeline.

``POST /v1/predict`` (a body of the program's input fields), ``POST /v1/batch`` (``{"items": [...]}``, run with
``pipeline.map``), ``GET /healthz`` (liveness), ``GET /readyz`` (``pipeline.health()``: 503 when not ready),
``GET /metrics`` (Prometheus). Every answer carries ``X-Request-ID``; each call's partition key is the API key's
name, so a RateLimiter or Budget with ``key=by_partition_key`` limits each client on its own.
"""

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, create_model

from resilient_dspy.binding.usage import usage_scope
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.observe.cost import PriceTable
from resilient_dspy.observe.logging import RedactingFilter
from resilient_dspy.observe.prometheus import PrometheusMetrics
from resilient_dspy.serve.auth import KeyRing
from resilient_dspy.serve.errors import error_answer
from resilient_dspy.serve.settings import ServeSettings

__all__ = ["create_app"]

access_log = logging.getLogger("resilient_dspy.serve.access")
access_log.addFilter(RedactingFilter())
logger = logging.getLogger("resilient_dspy.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ANONYMOUS = "anonymous"


def create_app(
    pipeline: Pipeline, settings: ServeSettings | None = None, *, prices: PriceTable | None = None
) -> FastAPI:
    """The app serving ``pipeline``; raises ConfigurationError when auth is required and no key is configured."""
    settings = settings or ServeSettings()
    keys = KeyRing.from_sources(settings.api_keys, settings.api_keys_file)
    if settings.require_auth and not keys.keys:
        raise ConfigurationError(
            [("api_keys", "no API key configured: set api_keys or api_keys_file, or require_auth=False for local use")]
        )
    prices = prices or PriceTable()
    inputs_model = _inputs_model(pipeline, settings.max_field_chars)
    batch_model = create_model(
        "BatchRequest",
        __config__=ConfigDict(extra="forbid"),
        items=(list[inputs_model], Field(min_length=1, max_length=settings.max_batch)),  # type: ignore[valid-type]
    )
    app = FastAPI(title=f"resilient-dspy: {pipeline.name}", version="1")
    app.state.pipeline = pipeline
    app.state.settings = settings
    registry = CollectorRegistry()
    requests = Counter("http_requests", "HTTP requests by route and status.", ["route", "status"], registry=registry)
    latency = Histogram("http_request_duration_seconds", "HTTP request duration.", ["route"], registry=registry)
    layer_metrics = [layer for layer in pipeline.layers if isinstance(layer, PrometheusMetrics)]

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])

    @app.middleware("http")
    async def frame(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.client = ANONYMOUS
        started = time.perf_counter()
        too_large = await _body_too_large(request, settings.max_body_bytes)
        if too_large:
            response: Response = JSONResponse(
                {"error": "too_large", "type": "RequestTooLarge", "request_id": request_id}, status_code=413
            )
        else:
            response = await call_next(request)
        elapsed = time.perf_counter() - started
        response.headers["X-Request-ID"] = request_id
        route = request.url.path if request.url.path in _ROUTES else "other"
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(elapsed)
        if settings.log_requests:
            access_log.info(
                "%s %s %s",
                request.method,
                request.url.path,
                response.status_code,
                extra={
                    "request_id": request_id,
                    "method": request.method,
                    "path": request.url.path,
                    "status": response.status_code,
                    "client": request.state.client,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(part) for part in item["loc"] if part != "body") or "body", "rule": item["msg"]}
            for item in error.errors()
        ]
        body = {"error": "invalid_input", "type": "InvalidInput", "request_id": request.state.request_id}
        return JSONResponse({**body, "problems": problems}, status_code=422)

    async def client(request: Request) -> str:
        """The caller's key name (401 without a known key, 403 for a disabled one)."""
        if not settings.require_auth and not keys.keys:
            return ANONYMOUS
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        key = keys.find(secret.strip()) if scheme.lower() == "bearer" and secret.strip() else None
        if key is None:
            raise _Refusal(401, "unauthorized", {"WWW-Authenticate": "Bearer"})
        if key.disabled:
            raise _Refusal(403, "forbidden")
        request.state.client = key.name
        return key.name

    @app.exception_handler(_Refusal)
    async def refused(request: Request, error: _Refusal) -> JSONResponse:
        body = {"error": error.kind, "type": error.kind, "request_id": request.state.request_id}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    async def run(request: Request, inputs: dict[str, Any], name: str) -> dict[str, Any]:
        call = pipeline.new_call(inputs, partition_key=name)
        started = time.perf_counter()
        with usage_scope() as scope:
            value = await pipeline.run(call)
        usage = scope.by_model()
        record = call.record
        return {
            "outputs": _outputs(value),
            "served_by": record.served_by,
            "attempts": record.attempts,
            "cached": record.attempts == 0 and record.served_by == "primary",
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "usage": jsonable_encoder(usage),
            "cost": prices(usage) if usage else 0.0,
            "request_id": request.state.request_id,
        }

    @app.post("/v1/predict")
    async def predict(request: Request, body: inputs_model, name: str = Depends(client)) -> Response:  # type: ignore[valid-type]
        try:
            answer = await run(request, body.model_dump(), name)  # type: ignore[attr-defined]
        except Exception as error:
            return _failure(error, request.state.request_id)
        return JSONResponse(answer)

    @app.post("/v1/batch")
    async def batch(request: Request, body: batch_model, name: str = Depends(client)) -> Response:
        items = [item.model_dump() for item in body.items]  # type: ignore[attr-defined]
        outcomes = await pipeline.map(items, concurrency=settings.batch_concurrency)
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if outcome.error is None:
                results.append(
                    {
                        "ok": True,
                        "outputs": _outputs(outcome.value),
                        "served_by": outcome.served_by,
                        "attempts": outcome.attempts,
                    }
                )
            else:
                status, answer, _ = error_answer(outcome.error, request.state.request_id)
                if status == 500:
                    logger.error("request %s: a batch item failed", request.state.request_id, exc_info=outcome.error)
                results.append({"ok": False, "status": status, **answer})
        return JSONResponse({"results": results, "request_id": request.state.request_id})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        health = pipeline.health()
        return JSONResponse(jsonable_encoder(health.to_dict()), status_code=200 if health.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = generate_latest(registry) + b"".join(generate_latest(m.registry) for m in layer_metrics)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


_ROUTES = frozenset({"/v1/predict", "/v1/batch", "/healthz", "/readyz", "/metrics"})


class _Refusal(Exception):
    def __init__(self, status: int, kind: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.kind, self.headers = status, kind, headers
        super().__init__(kind)


def _inputs_model(pipeline: Pipeline, max_chars: int) -> type[BaseModel]:
    """The request body: each input field a text of at most ``max_chars``, nothing else."""
    fields: dict[str, Any] = {name: (str, Field(max_length=max_chars)) for name in pipeline.input_fields}
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid", strict=True), **fields)


def _outputs(value: Any) -> Any:
    """A prediction's fields, or the value itself, as JSON."""
    to_dict = getattr(value, "toDict", None)
    return jsonable_encoder(to_dict() if callable(to_dict) else {"output": value})


def _failure(error: Exception, request_id: str) -> JSONResponse:
    status, body, headers = error_answer(error, request_id)
    if status == 500:
        logger.error("request %s failed: %s", request_id, type(error).__name__, exc_info=error)
    return JSONResponse(body, status_code=status, headers=headers)


async def _body_too_large(request: Request, limit: int) -> bool:
    """Read the body (cached by Starlette for the endpoint) and say whether it passes ``limit`` bytes."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return False
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return True
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return True
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's own cache of the body, read by the endpoint
    return False
