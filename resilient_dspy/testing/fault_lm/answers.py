"""The answers a well-behaved model gives to a DSPy prompt, in the adapter's format (Chat or JSON).

Output fields and their types are read from the adapter's instructions (or a JSON schema); values are
deterministic per question, or the user's own answers. Shared by the fault LM and the chaos HTTP server.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from resilient_dspy.faults import MALFORMED_TEXT

__all__ = ["Answers", "RenderedAnswer", "count_tokens", "render_answer"]

Answers = Mapping[str, str] | Callable[[str], str]

_OUTPUT_FIELDS = re.compile(r"Your output fields are:\n(.*?)(?:\n\n|\nAll interactions|\Z)", re.S)
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.M)
_INPUT_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.S)
_CHAT_NOTE = re.compile(r"^\{(\w+)\}\s+# note: the value you produce must (.*)$", re.M)
_JSON_NOTE = re.compile(r'^\s*"(\w+)": "\{\1\}\s+# note: the value you produce must (.*?)",?$', re.M)
_SCHEMA_NOTE = "adhere to the JSON schema: "
_CHOICE_NOTE = "exactly match (no extra characters) one of: "
_SIMPLE_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


@dataclass(frozen=True, slots=True)
class RenderedAnswer:
    """A reply in the adapter's format: its text, the question it answers, and which format (chat or json)."""

    text: str
    question: str
    adapter: str


def _digest(question: str) -> int:
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)


def count_tokens(text: str) -> int:
    """A rough token count of ``text`` (four characters a token, at least one), as usage reports."""
    return max(1, len(text) // 4)


def _note_schema(note: str) -> dict[str, Any] | None:
    if note.startswith(_SCHEMA_NOTE):
        try:
            schema = json.loads(note[len(_SCHEMA_NOTE) :])
        except ValueError:
            return None
        return schema if isinstance(schema, dict) else None
    if note.startswith(_CHOICE_NOTE):
        return {"enum": note[len(_CHOICE_NOTE) :].split("; ")}
    return None


def _prompt_fields(system: str) -> dict[str, dict[str, Any]]:
    """Output field name → JSON schema, from the adapter's field list and its per-field notes."""
    block = _OUTPUT_FIELDS.search(system)
    if block is None:
        return {"answer": {"type": "string"}}
    fields: dict[str, dict[str, Any]] = {}
    for name, kind in _FIELD_LINE.findall(block.group(1)):
        base = kind.split("[", 1)[0].lower()
        if base in _SIMPLE_TYPES:
            fields[name] = {"type": _SIMPLE_TYPES[base]}
        elif base == "list":
            fields[name] = {"type": "array", "items": {"type": "string"}}
        else:
            fields[name] = {"type": "string"}
    notes = {name: note for name, note in _CHAT_NOTE.findall(system)}
    for name, escaped in _JSON_NOTE.findall(system):
        try:
            notes[name] = json.loads(f'"{escaped}"')
        except ValueError:
            continue
    for name, note in notes.items():
        schema = _note_schema(note)
        if name in fields and schema is not None:
            fields[name] = schema
    return fields


class _Values:
    """Deterministic values for a JSON schema, derived from the question (and the user's answers for text)."""

    def __init__(self, question: str, answers: Answers | None, root: Mapping[str, Any]) -> None:
        self.question = question
        self.digest = _digest(question)
        self.answers = answers
        self.defs: Mapping[str, Any] = root.get("$defs", {}) if isinstance(root, Mapping) else {}

    def given(self) -> str | None:
        answers = self.answers
        if callable(answers):
            return answers(self.question)
        if answers is not None and self.question in answers:
            return answers[self.question]
        return None

    def text(self, name: str) -> str:
        if name == "reasoning":
            return f"Recall what is known about: {self.question[:60]}. Then answer briefly."
        given = self.given()
        return given if given is not None else f"A local answer #{self.digest % 10_000} to: {self.question[:60]}"

    def field(self, schema: Mapping[str, Any], name: str) -> Any:
        """A top-level output field: the user's answer wins for every non-numeric, non-list field."""
        if name != "reasoning" and schema.get("type") not in ("integer", "number", "boolean", "array"):
            given = self.given()
            if given is not None:
                return given
        return self.value(schema, name)

    def value(self, schema: Mapping[str, Any], name: str, nested: bool = False) -> Any:
        digest = self.digest
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return self.value(self.defs.get(ref.rsplit("/", 1)[1], {}), name, nested)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            options = list(schema["enum"])
            return options[digest % len(options)]
        for key in ("anyOf", "oneOf"):
            options = [o for o in schema.get(key, ()) if isinstance(o, Mapping) and o.get("type") != "null"]
            if options:
                return self.value(options[0], name, nested)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        if kind == "integer":
            return digest % 100
        if kind == "number":
            return round((digest % 1000) / 1000, 3)
        if kind == "boolean":
            return bool(digest % 2)
        if kind == "null":
            return None
        if kind == "array":
            items = schema.get("items")
            return [self.value(items if isinstance(items, Mapping) else {"type": "string"}, name, True)]
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties")
            if isinstance(properties, Mapping):
                return {key: self.value(sub, key, True) for key, sub in properties.items()}
            extra = schema.get("additionalProperties")
            return {"key": self.value(extra, name, True)} if isinstance(extra, Mapping) else {}
        return f"item {digest % 7}" if nested else self.text(name)


def _chat_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else f"{value}"


def render_answer(
    system: str,
    user: str,
    *,
    answers: Answers | None = None,
    schema: Mapping[str, Any] | None = None,
    json_mode: bool | None = None,
    malformed: bool = False,
) -> RenderedAnswer:
    """The reply a well-behaved model would give to a DSPy prompt (or a malformed one on demand).

    Output fields and their types come from the adapter's instructions in ``system`` (or from a JSON
    ``schema``, as sent in ``response_format``); the question is the first input field of ``user``. The
    format is Chat's ``[[ ## field ## ]]`` sections when the prompt asks for them, else JSON.
    """
    inputs = dict(_INPUT_BLOCK.findall(user))
    question = next(iter(inputs.values()), user).strip()
    chat = "[[ ## completed ## ]]" in system if json_mode is None else not json_mode
    adapter = "chat" if chat else "json"
    if malformed:
        return RenderedAnswer(MALFORMED_TEXT, question, adapter)
    properties = schema.get("properties") if schema is not None else None
    fields: Mapping[str, Mapping[str, Any]]
    if isinstance(properties, Mapping) and properties:
        fields = {name: sub for name, sub in properties.items() if isinstance(sub, Mapping)}
    else:
        fields = _prompt_fields(system)
    values = _Values(question, answers, schema or {})
    rendered = {name: values.field(sub, name) for name, sub in fields.items()}
    if chat:
        body = "\n\n".join(f"[[ ## {name} ## ]]\n{_chat_value(value)}" for name, value in rendered.items())
        return RenderedAnswer(f"{body}\n\n[[ ## completed ## ]]", question, adapter)
    return RenderedAnswer(json.dumps(rendered), question, adapter)
