"""Redactor: every default pattern, extra patterns, secret keys, nested structures, exceptions, no false positives."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
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
    "ssn": ("SSN 123-45-6789 on file", "123-45-6789"),
    "card_visa": ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    "card_compact": ("paid with 5555555555554444.", "5555555555554444"),
    "card_amex_dashes": ("amex 3782-822463-10005", "3782-822463-10005"),
    "iban_grouped": ("IBAN: DE89 3704 0044 0532 0130 00, thanks", "DE89 3704 0044 0532 0130 00"),
    "iban_compact": ("to GB82WEST12345698765432 today", "GB82WEST12345698765432"),
    "ipv4": ("from 192.168.1.10 at noon", "192.168.1.10"),
    "ipv4_end_of_sentence": ("client was 8.8.8.8.", "8.8.8.8"),
    "ipv6": ("peer 2001:db8:85a3::8a2e:370:7334 closed", "2001:db8:85a3::8a2e:370:7334"),
    "ipv6_loopback": ("bound to ::1 only", "::1"),
    "ipv6_full": ("fe80:0000:0000:0000:0202:b3ff:fe1e:8329", "fe80:0000:0000:0000:0202:b3ff:fe1e:8329"),
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
        "version 1.2.3 on host db-1",
        "sk-short",
        "order 4111 1111 1111 1112 (not a card: the Luhn digit is wrong)",
        "id 1234567890123456",
        "ticket 000-12-3456 and 123-00-4567 are not SSNs",
        "GB82WEST12345698765433 fails mod 97",
        "at 18:10:57 and 10:30, a::b is C++-ish",
        "999.1.1.1 is not an address",
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


def luhn_digit(body: str) -> str:
    total = 0
    for index, char in enumerate(reversed(body)):
        digit = int(char)
        if index % 2 == 0:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return str((10 - total % 10) % 10)


def grouped(compact: str, separator: str) -> str:
    return separator.join(compact[i : i + 4] for i in range(0, len(compact), 4))


@st.composite
def cards(draw: st.DrawFn, valid: bool = True) -> str:
    length = draw(st.integers(13, 19) if valid else st.just(16))
    body = draw(st.sampled_from("23456")) + draw(st.text("0123456789", min_size=length - 2, max_size=length - 2))
    check = luhn_digit(body)
    if not valid:
        check = draw(st.sampled_from([d for d in "0123456789" if d != check]))
    return grouped(body + check, draw(st.sampled_from(["", " ", "-"])))


@st.composite
def ibans(draw: st.DrawFn) -> str:
    country = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2))
    bban = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=11, max_size=30))
    numeric = "".join(str(int(char, 36)) for char in bban + country + "00")
    compact = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    return grouped(compact, draw(st.sampled_from(["", " "])))


@st.composite
def ssns(draw: st.DrawFn) -> str:
    area = draw(st.integers(1, 899).filter(lambda n: n != 666))
    return f"{area:03d}-{draw(st.integers(1, 99)):02d}-{draw(st.integers(1, 9999)):04d}"


@given(secret=st.one_of(cards(), ibans(), ssns()), before=st.text(max_size=30), after=st.text(max_size=30))
def test_a_valid_card_iban_or_ssn_in_any_text_is_always_redacted(secret: str, before: str, after: str) -> None:
    redacted = Redactor().redact_text(f"{before} {secret} {after}")
    assert secret not in redacted
    assert R in redacted


@given(number=cards(valid=False), before=st.text("abcdefghij .,", max_size=20), after=st.text("xyz .,", max_size=20))
def test_a_luhn_invalid_16_digit_number_is_left_alone(number: str, before: str, after: str) -> None:
    assume("bearer" not in before)
    text = f"{before} {number} {after}"
    assert Redactor().redact_text(text) == text


def test_extra_patterns_can_carry_a_check() -> None:
    """A ``(pattern, check)`` pair redacts only matches the check accepts, like the card and IBAN checksums."""
    even = Redactor(extra_patterns={"even_ticket": (r"T-\d+", lambda found: int(found[2:]) % 2 == 0)})
    assert even.redact_text("T-12 and T-13") == f"{R} and T-13"
