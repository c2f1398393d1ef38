"""Reading a stack config: a TOML, YAML or JSON file, a dict, or a pipeline's ``describe()`` list; then the
environment's overrides (``RESILIENT_DSPY_NAME``, ``RESILIENT_DSPY_PROGRAM__LM__MODEL``,
``RESILIENT_DSPY_LAYERS__2__MAX_WAIT``), read with pydantic-settings, each value JSON when it parses as JSON."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from resilient_dspy.errors import ConfigurationError

__all__ = ["ENV_PREFIX", "StackConfig", "load_config"]

ENV_PREFIX = "RESILIENT_DSPY_"

Source = str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]


class StackConfig(BaseModel):
    """The shape of a stack config: a name, the program (and its LM), the layers outermost first."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    program: dict[str, Any] = Field(description="signature= or module= (and load=), with an optional lm table.")
    layers: list[dict[str, Any]] = Field(default_factory=list, description="Each: layer = kind, then its options.")
    store: dict[str, Any] | None = Field(
        default=None,
        description="The shared state store of every layer that takes store= (kind = 'RedisStore', url_env = ...).",
    )


class _Environment(BaseSettings):
    """The overrides found in the environment, as nested dicts (list indexes are still strings here)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore")

    name: str | None = None
    program: dict[str, Any] = Field(default_factory=dict)
    layers: dict[str, Any] = Field(default_factory=dict)
    store: dict[str, Any] = Field(default_factory=dict)


def load_config(source: Source, *, environment: bool = True) -> StackConfig:
    """The config at ``source`` with the environment's overrides applied (``environment=False`` skips them)."""
    data = _read(source)
    if environment:
        data = _with_overrides(data, _Environment().model_dump(exclude_defaults=True))
    try:
        return StackConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigurationError(
            [(".".join(str(part) for part in item["loc"]) or "config", str(item["msg"])) for item in error.errors()]
        ) from None


def _read(source: Source) -> dict[str, Any]:
    if isinstance(source, str | Path):
        return _read_file(Path(source))
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, Sequence):
        return _from_description([entry for entry in source if isinstance(entry, Mapping)])
    raise ConfigurationError([("config", f"must be a file path, a dict or a describe() list (got {source!r:.80})")])


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError([("config", f"cannot read {str(path)!r}: {error.strerror or error}")]) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigurationError([("config", f"{path.name}: use a .toml, .yaml, .yml or .json file")])
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as error:
        if isinstance(error, ConfigurationError):
            raise
        raise ConfigurationError([("config", f"{path.name} does not parse: {error}")]) from None
    except Exception as error:  # yaml.YAMLError: yaml is imported only for YAML files
        raise ConfigurationError([("config", f"{path.name} does not parse: {error}")]) from None
    if not isinstance(data, dict):
        raise ConfigurationError([("config", f"{path.name} must hold a table/mapping at the top")])
    return data


def _from_description(described: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A config from ``Pipeline.describe()``: the layers, then the program entry (``layer == "program"``)."""
    if not described or described[-1].get("layer") != "program":
        raise ConfigurationError([("config", "a describe() list ends with its program entry")])
    *layers, program = described
    return {"program": _program_of(program), "layers": [dict(x) for x in layers]}


def _program_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    """How the described program is rebuilt: the config it was built from, else a lone Predict's signature."""
    source = entry.get("source")
    if isinstance(source, Mapping):
        return dict(source)
    signatures = entry.get("signatures")
    if entry.get("target") == "Predict" and isinstance(signatures, list) and len(signatures) == 1:
        return {"signature": signatures[0]}
    target = entry.get("target")
    raise ConfigurationError(
        [("program", f"describe() shows a {target!r} program that was not built from a config: give program.module")]
    )


def _parsed(value: Any) -> Any:
    """An environment value: JSON when it parses (numbers, booleans, lists), else the text itself."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {key: _parsed(item) for key, item in value.items()}
    return value


def _with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(data)
    if "name" in overrides:
        merged["name"] = overrides["name"]
    if overrides.get("program"):
        merged["program"] = _merge(dict(merged.get("program") or {}), _parsed(overrides["program"]))
    layers = overrides.get("layers")
    if layers:
        listed = [dict(layer) for layer in merged.get("layers") or []]
        for index, patch in layers.items():
            position = int(index) if str(index).isdigit() else -1
            if not 0 <= position < len(listed) or not isinstance(patch, dict):
                raise ConfigurationError(
                    [(f"{ENV_PREFIX}LAYERS__{index}", f"names no layer: the config has {len(listed)} (from 0)")]
                )
            listed[position] = _merge(listed[position], _parsed(patch))
        merged["layers"] = listed
    if overrides.get("store"):
        merged["store"] = _merge(dict(merged.get("store") or {}), _parsed(overrides["store"]))
    return merged


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base
