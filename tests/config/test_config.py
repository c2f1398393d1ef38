"""Pipeline.from_config: TOML/YAML/JSON files and dicts, environment overrides, one error naming every bad field
by its path, API keys only from the environment or a file, and describe() as a config (the round trip)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import pydantic
import pytest

from resilient_dspy import (
    AdaptiveConcurrency,
    AdaptiveThrottle,
    AdaptiveTimeout,
    Budget,
    Bulkhead,
    Cache,
    Canary,
    Chaos,
    CircuitBreaker,
    Fallback,
    Guard,
    Hedge,
    InputRules,
    Limit,
    Pipeline,
    RateLimitedError,
    RateLimiter,
    Retry,
    RetryBudget,
    Static,
    Timeout,
    UseLM,
    UseProgram,
    by_partition_key,
)
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.hedge import Percentile

TOML = """
name = "qa"

[program]
signature = "question -> answer"

[[layers]]
layer = "Timeout"
seconds = 30

[[layers]]
layer = "RateLimiter"
limits = [{ kind = "Limit", amount = 60, per = 60.0 }]
key = "resilient_dspy:by_partition_key"

[[layers]]
layer = "Retry"
max_attempts = 2
budget = { ratio = 0.5 }

[[layers]]
layer = "Bulkhead"
max_concurrent = 8
max_wait = 2.0
"""

YAML = """
name: qa
program:
  signature: question -> answer
layers:
  - layer: Timeout
    seconds: 30
  - layer: RateLimiter
    limits: [{kind: Limit, amount: 60, per: 60.0}]
    key: resilient_dspy:by_partition_key
  - layer: Retry
    max_attempts: 2
    budget: {ratio: 0.5}
  - layer: Bulkhead
    max_concurrent: 8
    max_wait: 2.0
"""


def by_hand() -> Pipeline:
    return Pipeline(
        dspy.Predict("question -> answer"),
        Timeout(30),
        RateLimiter(Limit(amount=60, per=60.0), key=by_partition_key),
        Retry(2, budget=RetryBudget(ratio=0.5)),
        Bulkhead(8, max_wait=2.0),
        name="qa",
    )


@pytest.mark.parametrize(("suffix", "text"), [(".toml", TOML), (".yaml", YAML), (".yml", YAML)])
def test_a_config_file_builds_the_same_stack_as_written_by_hand(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"stack{suffix}"
    path.write_text(text)
    pipeline = Pipeline.from_config(path)
    assert pipeline.name == "qa"
    assert pipeline.describe() == by_hand().describe()


def test_a_json_file_and_a_dict_build_it_too(tmp_path: Path) -> None:
    data = {"program": {"signature": "question -> answer"}, "layers": [{"layer": "Timeout", "seconds": 3}]}
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(data))
    assert Pipeline.from_config(path).describe() == Pipeline.from_config(data).describe()


def test_every_bad_field_is_listed_at_once_by_its_path() -> None:
    config = {
        "program": {"signature": "question -> answer"},
        "layers": [
            {"layer": "Timeout", "seconds": 1},
            {"layer": "Retry", "max_attempts": 0},
            {"layer": "Bulkhead", "max_concurrent": 2, "max_wait": -1},
            {"layer": "Timeout", "secnds": 1},
            {"layer": "NoSuchLayer"},
        ],
    }
    with pytest.raises(ConfigurationError) as caught:
        Pipeline.from_config(config)
    fields = [field for field, _ in caught.value.problems]
    assert "layers[1].max_attempts" in fields
    assert "layers[2].max_wait" in fields
    assert "layers[3].secnds" in fields
    assert "layers[4].layer" in fields
    assert "layers[0].seconds" not in fields


def test_a_bad_program_and_a_bad_layer_are_reported_together() -> None:
    config = {"program": {"module": "no_such_module_here:qa"}, "layers": [{"layer": "Bulkhead", "max_concurrent": 0}]}
    with pytest.raises(ConfigurationError) as caught:
        Pipeline.from_config(config)
    assert {field for field, _ in caught.value.problems} == {"program.module", "layers[0].max_concurrent"}


def test_a_program_is_given_by_exactly_one_of_signature_and_module() -> None:
    with pytest.raises(ConfigurationError, match="program"):
        Pipeline.from_config({"program": {}})
    with pytest.raises(ConfigurationError, match="program"):
        Pipeline.from_config({"program": {"signature": "q -> a", "module": "dspy:Predict"}})


async def answer(question: str) -> str:
    return f"echo: {question}"


class Answer(pydantic.BaseModel):
    answer: str


async def test_a_program_given_by_module_path_runs() -> None:
    pipeline = Pipeline.from_config({"program": {"module": f"{__name__}:answer"}, "layers": []})
    assert await pipeline("hi") == "echo: hi"


def test_an_import_path_names_a_function_option_and_a_bad_one_is_a_field_problem() -> None:
    pipeline = Pipeline.from_config(
        {
            "program": {"signature": "q -> a"},
            "layers": [{"layer": "Bulkhead", "max_concurrent": 2, "key": "resilient_dspy:by_model"}],
        }
    )
    assert pipeline.describe()[0]["options"]["key"] is not None
    with pytest.raises(ConfigurationError) as caught:
        Pipeline.from_config(
            {
                "program": {"signature": "q -> a"},
                "layers": [{"layer": "Bulkhead", "max_concurrent": 2, "key": "resilient_dspy:nope"}],
            }
        )
    assert [field for field, _ in caught.value.problems] == ["layers[0].key"]


def test_a_layer_of_ones_own_is_named_by_import_path() -> None:
    pipeline = Pipeline.from_config(
        {"program": {"signature": "q -> a"}, "layers": [{"layer": "resilient_dspy.middleware:Timeout", "seconds": 2}]}
    )
    assert pipeline.describe()[0]["options"]["seconds"] == 2


def test_an_api_key_in_the_config_text_is_refused() -> None:
    config = {"program": {"signature": "q -> a", "lm": {"model": "openai/gpt-4o-mini", "api_key": "sk-secret"}}}
    with pytest.raises(ConfigurationError) as caught:
        Pipeline.from_config(config)
    assert [field for field, _ in caught.value.problems] == ["program.lm.api_key"]
    assert "sk-secret" not in str(caught.value)


def test_the_api_key_comes_from_the_environment_or_a_secrets_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MY_TEST_KEY", "sk-from-env")
    pipeline = Pipeline.from_config(
        {"program": {"signature": "q -> a", "lm": {"model": "openai/gpt-4o-mini", "api_key_env": "MY_TEST_KEY"}}}
    )
    assert pipeline.program.lm.kwargs["api_key"] == "sk-from-env"
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    pipeline = Pipeline.from_config(
        {"program": {"signature": "q -> a", "lm": {"model": "openai/gpt-4o-mini", "api_key_file": str(secret)}}}
    )
    assert pipeline.program.lm.kwargs["api_key"] == "sk-from-file"
    monkeypatch.delenv("MY_TEST_KEY")
    with pytest.raises(ConfigurationError, match="api_key_env"):
        Pipeline.from_config(
            {"program": {"signature": "q -> a", "lm": {"model": "openai/gpt-4o-mini", "api_key_env": "MY_TEST_KEY"}}}
        )


def test_the_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(TOML)
    monkeypatch.setenv("RESILIENT_DSPY_NAME", "from-env")
    monkeypatch.setenv("RESILIENT_DSPY_LAYERS__3__MAX_CONCURRENT", "3")
    monkeypatch.setenv("RESILIENT_DSPY_PROGRAM__SIGNATURE", "question -> reply")
    pipeline = Pipeline.from_config(path)
    assert pipeline.name == "from-env"
    assert pipeline.describe()[3]["options"]["max_concurrent"] == 3
    assert pipeline.describe()[-1]["signatures"] == ["question -> reply"]
    assert Pipeline.from_config(path, environment=False).name == "qa"


def test_an_override_of_a_layer_the_config_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILIENT_DSPY_LAYERS__9__SECONDS", "3")
    with pytest.raises(ConfigurationError, match="LAYERS__9"):
        Pipeline.from_config({"program": {"signature": "q -> a"}, "layers": [{"layer": "Timeout", "seconds": 1}]})


def test_an_unreadable_or_unparsable_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        Pipeline.from_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[program\n")
    with pytest.raises(ConfigurationError, match="does not parse"):
        Pipeline.from_config(broken)
    other = tmp_path / "stack.ini"
    other.write_text("x")
    with pytest.raises(ConfigurationError, match="toml"):
        Pipeline.from_config(other)


def predict() -> Any:
    return dspy.Predict("question -> answer")


ROUND_TRIP: dict[str, Any] = {
    "Timeout": lambda: Timeout(5),
    "Timeout(attempt)": lambda: (Timeout(10), Retry(), Timeout(1)),
    "Retry": lambda: Retry(4, backoff="linear", jitter="equal", budget=RetryBudget(ratio=0.3)),
    "CircuitBreaker": lambda: CircuitBreaker(failure_threshold=3, break_duration=5),
    "CircuitBreaker(rate)": lambda: CircuitBreaker(failure_rate=0.5, window=20, min_calls=5),
    "Bulkhead": lambda: Bulkhead(4, max_queue=10, max_wait=1.0, name="pool"),
    "AdaptiveConcurrency": lambda: AdaptiveConcurrency("aimd", latency_threshold=2.0, max_limit=50, name="adaptive"),
    "AdaptiveThrottle": lambda: AdaptiveThrottle(k=1.5, window=30.0, buckets=6, max_probability=0.9),
    "RateLimiter": lambda: RateLimiter(requests=10, per=1, key=by_partition_key),
    "RateLimiter(limits)": lambda: RateLimiter(Limit(amount=5, per=1), Limit(amount=1000, per=60, unit="tokens")),
    "Cache": lambda: Cache(ttl=60, namespace="qa", single_flight=False),
    "Budget": lambda: Budget(tokens=1000, per=3600, alert_at=(0.5, 0.9)),
    "Chaos": lambda: Chaos(fault="server_error", rate=0.1, seed=3),
    "Fallback": lambda: Fallback(Static(answer="sorry")),
    "Fallback(lm, filters)": lambda: Fallback(
        UseLM(dspy.LM("openai/backup", temperature=0.2), name="backup", on=(TimeoutError,)),
        UseProgram(answer, name="local"),
        Static(answer="sorry", name="apology"),
        on=(TimeoutError, RateLimitedError),
    ),
    "Hedge": lambda: Hedge(0.2, alternatives=(UseLM(dspy.LM("openai/other"), name="other"),)),
    "Hedge(twice)": lambda: Hedge(0.2, max_hedges=2),
    "Hedge(percentile)": lambda: Hedge(Percentile(0.95, window=50, min_samples=5)),
    "AdaptiveTimeout": lambda: (Timeout(120), Retry(), AdaptiveTimeout(60)),
    "Canary": lambda: Canary(UseLM(dspy.LM("openai/candidate"), name="candidate")),
    "CircuitBreaker(wait)": lambda: CircuitBreaker(failure_threshold=3, wait_for_half_open=True, max_wait=5),
    "RateLimiter(admission)": lambda: RateLimiter(requests=5, counts_from="admission"),
    "Guard": lambda: Guard(input=InputRules(max_chars=100)),
    "Guard(rules, model)": lambda: Guard(
        input=InputRules(max_chars={"question": 50}, required=["question"], forbidden=["(?i)ignore previous"]),
        output=Answer,
    ),
}


@pytest.mark.parametrize("make", list(ROUND_TRIP.values()), ids=list(ROUND_TRIP))
def test_describe_is_a_config_that_rebuilds_an_equal_pipeline(make: Any) -> None:
    made = make()
    layers = made if isinstance(made, tuple) else (made,)
    pipeline = Pipeline(predict(), *layers)
    assert Pipeline.from_config(pipeline.describe()).describe() == pipeline.describe()


def test_describe_of_a_pipeline_built_from_a_config_names_its_program_source() -> None:
    config = {"program": {"module": f"{__name__}:answer"}, "layers": [{"layer": "Timeout", "seconds": 2}]}
    pipeline = Pipeline.from_config(config)
    assert pipeline.describe()[-1]["source"] == {"module": f"{__name__}:answer"}
    assert Pipeline.from_config(pipeline.describe()).describe() == pipeline.describe()


def test_describe_of_a_program_that_no_config_built_cannot_be_rebuilt() -> None:
    with pytest.raises(ConfigurationError, match="program"):
        Pipeline.from_config(Pipeline(answer, Timeout(1)).describe())


def test_the_example_stack_config_builds() -> None:
    pipeline = Pipeline.from_config(Path(__file__).parents[2] / "examples" / "stack.toml", environment=False)
    assert [entry["layer"] for entry in pipeline.describe()[:-1]] == [
        "Timeout",
        "RateLimiter",
        "Retry",
        "CircuitBreaker",
        "Bulkhead",
    ]


def test_the_adaptive_layers_are_built_in_kinds() -> None:
    config = {
        "program": {"signature": "question -> answer"},
        "layers": [
            {"layer": "AdaptiveThrottle", "k": 1.5, "window": 60.0, "max_probability": 0.9},
            {"layer": "AdaptiveConcurrency", "algorithm": "aimd", "latency_threshold": 5.0, "max_wait": 2.0},
        ],
    }
    expected = Pipeline(
        dspy.Predict("question -> answer"),
        AdaptiveThrottle(k=1.5, window=60.0, max_probability=0.9),
        AdaptiveConcurrency("aimd", latency_threshold=5.0, max_wait=2.0),
    )
    assert Pipeline.from_config(config).describe() == expected.describe()


@pytest.mark.redis
@pytest.mark.looptime(False)
async def test_a_store_table_gives_every_stateful_layer_one_shared_store(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[store]`` builds one RedisStore (URL from the environment) for every layer that takes ``store=``; two
    pipelines built from the config, as two workers would, share the limit."""
    import uuid

    monkeypatch.setenv("TEST_STACK_REDIS_URL", redis_url)
    config = {
        "program": {"module": f"{__name__}:answer"},
        "store": {"url_env": "TEST_STACK_REDIS_URL", "prefix": f"cfg-{uuid.uuid4().hex[:8]}", "timeout": 2.0},
        "layers": [
            {"layer": "RateLimiter", "requests": 2, "per": 60, "max_wait": 0.1, "name": "quota"},
            {"layer": "CircuitBreaker", "failure_threshold": 3, "name": "provider"},
            {"layer": "Cache", "backend": {"kind": "RedisBackend", "max_entries": 100}},
        ],
    }
    first, second = Pipeline.from_config(config), Pipeline.from_config(config)
    stores = [first.layers[0].options.store, first.layers[1].options.store, first.layers[2].options.backend.store]
    assert stores[0] is stores[1] is stores[2] and stores[0].name == redis_url
    assert await first("a") == "echo: a"
    assert await second("b") == "echo: b"
    with pytest.raises(RateLimitedError):
        await first("c")
    for pipeline in (first, second):
        await pipeline.layers[0].options.store.aclose()


def test_a_store_url_from_an_unset_variable_is_named() -> None:
    config = {"program": {"module": f"{__name__}:answer"}, "store": {"url_env": "NO_SUCH_REDIS_URL_VARIABLE"}}
    with pytest.raises(ConfigurationError, match=r"store\.url_env"):
        Pipeline.from_config(config)
