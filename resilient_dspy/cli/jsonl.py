"""The files of ``resilient-dspy batch``: the input JSONL read item by item with a stable id each, and the output
JSONL, one line per finished item, which is also the record of what a rerun may skip.

An item's id is its ``id`` field (a string or a whole number), else its line number. The output is append-only
while a run works; a run killed mid-write leaves at most a torn last line, which the next run cuts off. Only
``--retry-failed`` rewrites it, into a temporary file moved over the old one, so a crash leaves one or the other.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import dspy
from pydantic import BaseModel

from resilient_dspy.cli.args import one_line
from resilient_dspy.core.outcome import Outcome
from resilient_dspy.errors import classify

__all__ = ["BatchFileError", "Item", "Ledger", "encode", "read_input", "read_ledger", "remove_failed"]


class BatchFileError(Exception):
    """An input or output file that cannot be used as it is; the message names the file, the line and why."""


@dataclass(frozen=True, slots=True)
class Item:
    """One input line: its id (as given, and as the key the output is matched by), line number and JSON value."""

    id: str | int
    line: int
    value: Any

    @property
    def key(self) -> str:
        return json.dumps(self.id)


def read_input(path: Path, id_field: str = "id") -> Iterator[Item]:
    """Every item of the input JSONL in order (blank lines skipped); raises :class:`BatchFileError` on a bad line."""
    try:
        lines = path.open(encoding="utf-8")
    except OSError as error:
        raise BatchFileError(f"cannot read --input {path}: {os.strerror(error.errno or 0) or error}") from None
    with lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise BatchFileError(f"{path}:{number}: not a JSON value ({error.msg})") from None
            item_id = value.get(id_field, number) if isinstance(value, dict) else number
            if isinstance(item_id, bool) or not isinstance(item_id, str | int):
                rule = "must be a string or a whole number"
                raise BatchFileError(f"{path}:{number}: the {id_field!r} field {rule} (got {item_id!r})")
            yield Item(item_id, number, value)


def inputs_of(item: Item, fields: Sequence[str], id_field: str = "id") -> Any:
    """What to send to the pipeline for ``item``: an object's program inputs (its id and labels such as ``answer``
    left out), or the value itself as the first input; an object naming no input is sent whole, so the error says so.
    """
    value = item.value
    if not isinstance(value, dict):
        return value
    given = {name: value[name] for name in fields if name in value}
    return given or {name: entry for name, entry in value.items() if name != id_field}


@dataclass
class Ledger:
    """What the output already holds: the key of each item written and whether it succeeded."""

    ok: dict[str, bool] = field(default_factory=dict)

    def failed(self) -> set[str]:
        return {key for key, ok in self.ok.items() if not ok}


def read_ledger(path: Path) -> Ledger:
    """The items the output holds; a torn last line (a run killed while writing it) is cut off the file."""
    ledger = Ledger()
    if not path.exists():
        return ledger
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BatchFileError(f"cannot read --output {path}: {os.strerror(error.errno or 0) or error}") from None
    complete = data.rfind(b"\n") + 1
    for number, raw in enumerate(data[:complete].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            key, ok = json.dumps(record["id"]), bool(record["ok"])
        except (ValueError, KeyError, TypeError):
            raise BatchFileError(f"{path}:{number}: not a line this command wrote (JSON with 'id' and 'ok')") from None
        if key in ledger.ok:
            raise BatchFileError(f"{path}:{number}: item {record['id']!r} is in the output twice")
        ledger.ok[key] = ok
    if complete < len(data):
        with path.open("r+b") as torn:
            torn.truncate(complete)
    return ledger


def remove_failed(path: Path, keys: set[str]) -> None:
    """Rewrite the output without the lines of ``keys`` (failed items to run again), replacing it atomically."""
    kept = [
        line
        for line in path.read_bytes().splitlines(keepends=True)
        if line.strip() and json.dumps(json.loads(line)["id"]) not in keys
    ]
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def plain(value: Any) -> Any:
    """``value`` as JSON can hold it: a Prediction's fields, a pydantic model's dump, containers walked, else str."""
    if isinstance(value, dspy.Example):
        return plain(value.toDict())
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(key): plain(entry) for key, entry in value.items()}
    if isinstance(value, list | tuple):
        return [plain(entry) for entry in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def encode(item: Item, outcome: Outcome) -> str:
    """The output line for ``item``: its id, whether it succeeded, how (served_by, attempts, retries, duration) and
    its output, or its typed error (type, kind, retryable, message, and the type of its cause when chained)."""
    record: dict[str, Any] = {
        "id": item.id,
        "ok": outcome.error is None,
        "served_by": outcome.served_by,
        "attempts": outcome.attempts,
        "retries": outcome.retries,
        "duration": round(outcome.duration, 6),
    }
    if outcome.error is None:
        record["output"] = plain(outcome.value)
    else:
        info = classify(outcome.error)
        record["error"] = {
            "type": type(outcome.error).__name__,
            "kind": info.kind.value,
            "retryable": info.retryable,
            "message": one_line(outcome.error),
        }
        if outcome.error.__cause__ is not None:  # what Retry gave up on, what a layer wrapped
            record["error"]["cause"] = type(outcome.error.__cause__).__name__
    return json.dumps(record, ensure_ascii=False) + "\n"


def append(out: IO[str], item: Item, outcome: Outcome) -> None:
    """Write ``item``'s line and flush it, so a crash after this loses nothing of it."""
    out.write(encode(item, outcome))
    out.flush()
