"""create_app on FastAPI's TestClient: the body model, auth, every error mapping, batch, health, metrics, ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline, RateLimiter, Timeout, by_partition_key
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.serve import ServeSettings, create_app, hash_key
from tests.serve.programs import broken, echo, slow

KEYS = f"alice=alice-secret,bob=sha256:{hash_key('bob-secret')}"
ALICE = {"Authorization": "Bearer alice-secret"}
BOB = {"Authorization": "Bearer bob-secret"}


def client(pipeline: Pipeline, **options: object) -> TestClient:
    return TestClient(create_app(pipeline, ServeSettings(api_keys=KEYS, **options)))  # type: ignore[arg-type]


def test_predict_answers_the_outputs_and_what_the_call_came_to() -> None:
    answer = client(Pipeline(echo)).post("/v1/predict", json={"question": "hi"}, headers=ALICE)
    assert answer.status_code == 200
    body = answer.json()
    assert body["outputs"] == {"output": "echo: hi"}
    assert body["served_by"] == "primary" and body["attempts"] == 1 and body["cached"] is False
    assert {"latency_ms", "usage", "cost", "request_id"} <= body.keys()
    assert answer.headers["X-Request-ID"] == body["request_id"]


def test_a_request_id_given_by_the_caller_is_kept() -> None:
    answer = client(Pipeline(echo)).post(
        "/v1/predict", json={"question": "x"}, headers={**ALICE, "X-Request-ID": "r-1"}
    )
    assert answer.headers["X-Request-ID"] == "r-1"


def test_no_key_or_an_unknown_one_is_401_and_a_disabled_key_403(tmp_path: Path) -> None:
    app = client(Pipeline(echo))
    assert app.post("/v1/predict", json={"question": "x"}).status_code == 401
    assert app.post("/v1/predict", json={"question": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert app.post("/v1/predict", json={"question": "x"}, headers=BOB).status_code == 200
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "carol"\nsha256 = "{hash_key("carol-secret")}"\ndisabled = true\n')
    app = TestClient(create_app(Pipeline(echo), ServeSettings(api_keys_file=keys)))
    assert (
        app.post("/v1/predict", json={"question": "x"}, headers={"Authorization": "Bearer carol-secret"}).status_code
        == 403
    )


def test_serving_without_any_key_needs_auth_turned_off() -> None:
    with pytest.raises(ConfigurationError, match="api_keys"):
        create_app(Pipeline(echo), ServeSettings())
    app = TestClient(create_app(Pipeline(echo), ServeSettings(require_auth=False)))
    assert app.post("/v1/predict", json={"question": "x"}).status_code == 200


def test_bad_input_is_422_naming_the_field() -> None:
    app = client(Pipeline(echo), max_field_chars=10)
    for body in ({}, {"question": 3}, {"question": "x", "extra": "y"}, {"question": "x" * 11}):
        answer = app.post("/v1/predict", json=body, headers=ALICE)
        assert answer.status_code == 422, body
        assert answer.json()["problems"][0]["field"] in ("question", "extra")


def test_a_body_over_the_size_limit_is_413() -> None:
    answer = client(Pipeline(echo), max_body_bytes=100).post(
        "/v1/predict", content=b'{"question": "' + b"x" * 200 + b'"}', headers=ALICE
    )
    assert answer.status_code == 413


def test_a_rejection_is_429_with_retry_after_and_a_timeout_504() -> None:
    answer = client(Pipeline(broken)).post("/v1/predict", json={"question": "limited"}, headers=ALICE)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "3"
    answer = client(Pipeline(slow, Timeout(0.05))).post("/v1/predict", json={"question": "1"}, headers=ALICE)
    assert answer.status_code == 504


def test_a_program_error_is_500_with_the_request_id_and_no_internals() -> None:
    answer = client(Pipeline(broken)).post("/v1/predict", json={"question": "boom"}, headers=ALICE)
    assert answer.status_code == 500
    assert "secret" not in answer.text and "RuntimeError" not in answer.text
    assert answer.json()["request_id"] == answer.headers["X-Request-ID"]


def test_each_key_is_its_own_partition_of_a_rate_limit() -> None:
    pipeline = Pipeline(echo, RateLimiter(requests=1, per=60, max_wait=0.01, key=by_partition_key))
    app = client(pipeline)
    assert app.post("/v1/predict", json={"question": "a"}, headers=ALICE).status_code == 200
    assert app.post("/v1/predict", json={"question": "b"}, headers=ALICE).status_code == 429
    assert app.post("/v1/predict", json={"question": "c"}, headers=BOB).status_code == 200


def test_batch_answers_each_item_in_order_with_its_own_status() -> None:
    body = {"items": [{"question": "a"}, {"question": "boom"}, {"question": "limited"}]}
    answer = client(Pipeline(broken)).post("/v1/batch", json=body, headers=ALICE)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["ok"] for r in results] == [True, False, False]
    assert [r.get("status") for r in results[1:]] == [500, 429]
    assert "secret" not in answer.text


def test_a_batch_over_the_item_limit_is_422() -> None:
    answer = client(Pipeline(echo), max_batch=2).post(
        "/v1/batch", json={"items": [{"question": "a"}] * 3}, headers=ALICE
    )
    assert answer.status_code == 422


def test_health_readiness_and_metrics_need_no_key() -> None:
    app = client(Pipeline(echo))
    assert app.get("/healthz").json() == {"status": "ok"}
    assert app.get("/readyz").status_code == 200 and app.get("/readyz").json()["ready"] is True
    app.post("/v1/predict", json={"question": "x"}, headers=ALICE)
    assert 'http_requests_total{route="/v1/predict",status="200"}' in app.get("/metrics").text


def test_cors_is_off_unless_origins_are_given() -> None:
    preflight = {"Origin": "https://example.test", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client(Pipeline(echo)).options("/v1/predict", headers=preflight).headers
    app = client(Pipeline(echo), cors_origins=["https://example.test"])
    assert (
        app.options("/v1/predict", headers=preflight).headers["access-control-allow-origin"] == "https://example.test"
    )


FUZZ_APP = client(Pipeline(echo), max_field_chars=50)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=60),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSON | st.fixed_dictionaries({"question": JSON}))
def test_no_body_ever_gets_a_500(body: object) -> None:
    answer = FUZZ_APP.post("/v1/predict", json=body, headers=ALICE)
    assert answer.status_code in (200, 422), (body, answer.text)


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=200))
def test_no_raw_bytes_ever_get_a_500(raw: bytes) -> None:
    answer = FUZZ_APP.post("/v1/predict", content=raw, headers={**ALICE, "Content-Type": "application/json"})
    assert answer.status_code < 500, (raw, answer.text)
