"""Redactor: every default pattern, extra patterns, secret keys, nested structures, exceptions, no false positives."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from pydantic import BaseModel

from resilient_dspy.observe import DEFAULT_PATTERNS, Redactor

R = "[REDACTED]"

PLANTED = {
    "openai_key": ("key is sk-proj-Abc123def456GHI789jkl0 here", "sk-proj-Abc123def456GHI789jkl0"),
    "openai_key_legacy": ("sk-abcdefghijklmnopqrstuvwx", "sk-abcdefghijklmnopqrstuvwx"),
    "anthropic_key": ("use sk-ant-api03-AbCdEf123456_-xyz", "sk-ant-api03-AbCdEf123456_-xyz"),
    "bearer": ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nature", "eyJhbGciOiJIUzI1NiJ9"),
    "api_key_assignment": ("GET /v1?api_key=zzSecretValue42&x=1", "zzSecretValue42"),
    "api_key_json": ('{"api_key": "zzSecretValue42", "n": 1}', "zzSecretValue42"),
    "api_key_header": ("x-api-key: hdrSecret9988", "hdrSecret9988"),
    "password_assignment": ("password=hunter2hunter2", "hunter2hunter2"),
    "email": ("mail jane.doe+ops@example.co.uk now", "jane.doe+ops@example.co.uk"),
    "phone_international": ("call +44 20 7946 0958 today", "7946 0958"),
    "phone_international_us": ("call +1 (555) 123-4567", "123-4567"),
    "phone_compact": ("sms +33612345678", "+33612345678"),
    "phone_us_parens": ("(555) 123-4567 is the desk", "123-4567"),
    "phone_us_dashes": ("or 555-123-4567", "555-123-4567"),
    "phone_us_dots": ("or 555.123.4567", "555.123.4567"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_each_default_pattern_removes_its_secret(case: str) -> None:
    text, secret = PLANTED[case]
    redacted = Redactor().redact_text(text)
    assert secret not in redacted
    assert R in redacted


def test_assignment_keeps_the_name_and_redacts_only_the_value() -> None:
    redactor = Redactor()
    assert redactor.redact_text("api_key=zzSecretValue42") == f"api_key={R}"
    assert redactor.redact_text('"api_key": "zzSecretValue42"') == f'"api_key": "{R}"'
    assert redactor.redact_text("Authorization: Bearer abcdefgh12345678") == f"Authorization: Bearer {R}"


@pytest.mark.parametrize(
    "text",
    [
        "time=1039.131227722 attempt=2 delay=0.25",
        "2026-11-23T18:10:57.348+00:00",
        "max_tokens=512 saved_tokens=1234 1e+10",
        "cache key default:3f2a9c0d1e",
        "version 1.2.3 on 192.168.1.10",
        "sk-short",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Redactor().redact_text(text) == text


def test_nested_structures_exceptions_and_secret_keys() -> None:
    @dataclass
    class Holder:
        contact: str

    class Model(BaseModel):
        note: str

    value = {
        "inputs": {"question": "I am bob@example.com", "history": [("+44 20 7946 0958", 3)]},
        "headers": {"Authorization": "opaque-value-without-pattern", "X-Api-Key": "also-opaque"},
        "credentials": None,
        "max_tokens": 512,
        "access_token": "opaque",
        "password": 123456,
        "error": ValueError("user alice@example.org sent sk-ant-api03-AbCdEf123456"),
        "holder": Holder("555-123-4567"),
        "model": Model(note="password=hunter2hunter2"),
        ("tuple", "key"): b"\x00\x01",
    }
    redacted = Redactor().redact(value)
    text = repr(redacted)
    for secret in ("bob@example.com", "7946", "opaque", "alice@example.org", "sk-ant-", "555-123", "hunter2"):
        assert secret not in text
    assert redacted["max_tokens"] == 512
    assert redacted["credentials"] is None
    assert redacted["password"] == R
    assert redacted["headers"] == {"Authorization": R, "X-Api-Key": R}
    assert redacted["error"] == {"type": "ValueError", "message": f"user {R} sent {R}"}
    assert redacted["inputs"]["history"] == [[R, 3]]
    assert redacted["holder"] == {"contact": R}
    assert redacted["model"] == {"note": f"password={R}"}
    assert redacted["['tuple', 'key']"] == "<2 bytes>"


def test_extra_patterns_replacement_and_dropping_a_default() -> None:
    redactor = Redactor(extra_patterns={"ticket": r"ACME-\d{6}"}, replacement="***")
    assert redactor.redact_text("see ACME-123456 and bob@example.com") == "see *** and ***"
    assert "ticket" in redactor.names
    listed = Redactor(extra_patterns=[re.compile(r"(?P<secret>\d{4})-XX")])
    assert listed.redact_text("code 1234-XX") == f"code {R}-XX"
    no_email = Redactor(patterns={k: v for k, v in DEFAULT_PATTERNS.items() if k != "email"})
    assert no_email.redact_text("bob@example.com") == "bob@example.com"
    keys_off = Redactor(secret_keys=None)
    assert keys_off.redact({"password": "plain"}) == {"password": "plain"}


def test_depth_is_bounded() -> None:
    deep: list[object] = []
    node = deep
    for _ in range(50):
        child: list[object] = []
        node.append(child)
        node = child
    assert "..." in repr(Redactor(max_depth=5).redact(deep))
