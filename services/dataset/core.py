"""Dataset domain logic, pure: validate an upload line by line, normalize it, split it.

    name + JSONL bytes + split params  ->  Prepared (canonical rows, sha256, train/validation)
                                       or  a list of errors, each naming file, line and field

A row is one of four schemas (a file holds one only); the dataset's format is its name:

    prompt_completion  {"prompt": str, "completion": str}                      (sft)
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                       (>= 1 assistant message)                                (sft)
    text               {"text": str}                                           (pretrain)
    preference         {"prompt": str, "chosen": str, "rejected": str}         (dpo, orpo)
                       (chosen and rejected differ)

Rows are normalized to canonical JSON (sorted keys, only the schema's fields, no whitespace), so
the dataset's sha256 identifies its content, not its formatting. The split is a pure function of
(seed, canonical row): the same content and seed always give the same split, and duplicate rows
always land on the same side (no train/validation leakage).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ROLES = ("system", "user", "assistant")
PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
TEXT = "text"
PREFERENCE = "preference"
FORMATS = (PROMPT_COMPLETION, MESSAGES, TEXT, PREFERENCE)
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
DEFAULT_VALIDATION_FRACTION = 0.1
MAX_REPORTED_ERRORS = 20  # kept in the rejection event
ERRORS_IN_MESSAGE = 3  # named in the gRPC status message
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Prepared:
    """A valid upload, normalized and split; `files` maps split -> its JSONL bytes."""

    format: str
    rows: list[str]  # canonical JSON, one per row, in upload order
    sha256: str  # of the normalized JSONL (all rows)
    files: dict[str, bytes]
    split_sha256: dict[str, str]
    counts: dict[str, int]


@dataclass(frozen=True)
class Rejection:
    """Why an upload was refused: the first errors and how many lines were bad in total."""

    errors: list[str]  # at most MAX_REPORTED_ERRORS
    invalid_lines: int
    total_errors: int

    def summary(self) -> str:
        shown = "; ".join(self.errors[:ERRORS_IN_MESSAGE])
        more = self.total_errors - min(len(self.errors), ERRORS_IN_MESSAGE)
        head = f"{self.invalid_lines} invalid line{'s' if self.invalid_lines != 1 else ''}; "
        if self.invalid_lines == 0:  # only upload-level errors (name, empty file, params)
            head = ""
        return head + shown + (f"; and {more} more" if more > 0 else "")


class Rejected(Exception):
    def __init__(self, rejection: Rejection):
        self.rejection = rejection
        super().__init__(rejection.summary())


# -- validation ---------------------------------------------------------------------------------


def name_error(name: str) -> str | None:
    if not NAME_RE.fullmatch(name):  # match() would accept a trailing newline ($)
        return f"name: must match {NAME_RE.pattern} (got {name!r})"
    if ".." in name:
        return f"name: must not contain '..' (got {name!r})"
    return None


def fraction_error(fraction: float) -> str | None:
    if not (math.isfinite(fraction) and 0 <= fraction < 1):
        return (
            "validation_fraction: must be >= 0 and < 1 "
            f"(0 means {DEFAULT_VALIDATION_FRACTION}), got {fraction}"
        )
    return None


def _text_error(value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        return f"field '{path}': must be a string, got {_json_type(value)}"
    if not value.strip():
        return f"field '{path}': must not be empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        return f"field '{path}': not valid Unicode text (lone surrogate)"
    return None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def row_schema(row: dict) -> str | None:
    """Which schema a row claims, from its keys; None if it claims none."""
    if "messages" in row:
        return MESSAGES
    if "chosen" in row or "rejected" in row:
        return PREFERENCE
    if "prompt" in row or "completion" in row:
        return PROMPT_COMPLETION
    if "text" in row:
        return TEXT
    return None


def _check_fields(row: dict, fields: tuple[str, ...]) -> tuple[dict | None, list[str]]:
    errors = []
    for field in fields:
        if field not in row:
            errors.append(f"field '{field}': missing")
        elif err := _text_error(row[field], field):
            errors.append(err)
    return (None, errors) if errors else ({f: row[f] for f in fields}, [])


def check_row(row: Any) -> tuple[dict | None, list[str]]:
    """(normalized row, []) for a valid row, else (None, field errors)."""
    if not isinstance(row, dict):
        return None, [f"expected a JSON object, got {_json_type(row)}"]
    schema = row_schema(row)
    if schema is None:
        return None, [
            "row must have 'prompt' and 'completion', or 'messages', or 'text', or 'prompt', "
            f"'chosen' and 'rejected'; got keys {sorted(row) or 'none'}"
        ]
    if schema == PROMPT_COMPLETION:
        return _check_fields(row, ("prompt", "completion"))
    if schema == TEXT:
        return _check_fields(row, ("text",))
    if schema == PREFERENCE:
        if "completion" in row:
            return None, ["row mixes 'chosen'/'rejected' with 'completion': use one schema"]
        normalized, errors = _check_fields(row, PREFERENCE_FIELDS)
        if normalized and normalized["chosen"] == normalized["rejected"]:
            return None, ["field 'rejected': must differ from 'chosen'"]
        return normalized, errors
    return _check_messages(row)


def _check_messages(row: dict) -> tuple[dict | None, list[str]]:
    if "prompt" in row or "completion" in row:
        return None, ["row mixes 'messages' with 'prompt'/'completion': use one schema"]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return None, ["field 'messages': must be a non-empty array of {role, content}"]
    errors, normalized = [], []
    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(m, dict):
            errors.append(f"field '{path}': must be an object, got {_json_type(m)}")
            continue
        if "role" not in m:
            errors.append(f"field '{path}.role': missing")
        elif m["role"] not in ROLES:
            errors.append(f"field '{path}.role': must be one of {', '.join(ROLES)}")
        if "content" not in m:
            errors.append(f"field '{path}.content': missing")
        elif err := _text_error(m["content"], f"{path}.content"):
            errors.append(err)
        normalized.append({"role": m.get("role"), "content": m.get("content")})
    if not errors and not any(m["role"] == "assistant" for m in normalized):
        errors.append("field 'messages': needs at least one assistant message")
    return (None, errors) if errors else ({"messages": normalized}, [])


# Which dataset formats each training objective reads (JobSpec.objective -> formats).
OBJECTIVE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": (PROMPT_COMPLETION, MESSAGES),
    "pretrain": (TEXT,),
    "dpo": (PREFERENCE,),
    "orpo": (PREFERENCE,),
}


def objective_error(objective: str, fmt: str) -> str | None:
    """Why a job with `objective` cannot train on a dataset of format `fmt` (None if it can)."""
    wanted = OBJECTIVE_FORMATS.get(objective)
    if wanted is None or fmt in wanted:
        return None
    return (
        f"objective {objective} needs a dataset of format {' or '.join(wanted)}; "
        f"this dataset is {fmt or 'of unknown format'}"
    )


def canonical(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def parse_jsonl(content: bytes, filename: str) -> tuple[str, list[str], list[str], int]:
    """Check every line. Returns (format, canonical rows, errors, invalid line count).

    Errors read `<filename>:<line>: <what>`; blank lines are skipped; a file may hold one schema
    only, so a row of the other schema is an error naming the line that set the schema.
    """
    fmt, first_line = "", 0
    rows: list[str] = []
    errors: list[str] = []
    invalid_lines = 0
    for lineno, raw in enumerate(content.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
            if lineno == 1:  # editors on Windows start files with a byte-order mark
                text = text.removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            errors.append(f"{filename}:{lineno}: not valid UTF-8 (byte {e.start + 1})")
            invalid_lines += 1
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            row, line_errors = None, [f"invalid JSON: {e.msg} (col {e.colno})"]
        else:
            row, line_errors = check_row(value)
            schema = row_schema(value) if isinstance(value, dict) else None
            if schema and not fmt:
                fmt, first_line = schema, lineno
            elif schema and schema != fmt:
                line_errors = [
                    f"mixed schemas: a {schema} row in a file of {fmt} rows (line {first_line})",
                    *line_errors,
                ]
        if line_errors:
            invalid_lines += 1
            errors.extend(f"{filename}:{lineno}: {err}" for err in line_errors)
        else:
            rows.append(canonical(row))
    if not rows and not errors:
        errors.append(f"{filename}: empty file: no rows")
    return fmt, rows, errors, invalid_lines


# -- split and prepare --------------------------------------------------------------------------


def split_score(seed: int, row: str) -> int:
    """The row's position in [0, 2**256): it goes to validation when score / 2**256 < fraction."""
    return int(hashlib.sha256(f"{seed}:{row}".encode()).hexdigest(), 16)


def split_rows(rows: list[str], fraction: float, seed: int) -> list[str]:
    """The split ("train" | "validation") of each row, in order.

    With >= 2 rows both splits are non-empty: if the threshold leaves validation empty, the
    train row with the lowest score (the nearest to the threshold) moves over; if it leaves
    train empty, the validation row with the highest score does. A single row is training data.
    """
    if len(rows) == 1:
        return ["train"]
    scores = [split_score(seed, r) for r in rows]
    sides = ["validation" if s / 2**256 < fraction else "train" for s in scores]
    if "validation" not in sides:
        sides[min(range(len(rows)), key=scores.__getitem__)] = "validation"
    elif "train" not in sides:
        sides[max(range(len(rows)), key=scores.__getitem__)] = "train"
    return sides


def jsonl(rows: list[str]) -> bytes:
    return "".join(r + "\n" for r in rows).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(
    name: str, content: bytes, filename: str, validation_fraction: float = 0.0, seed: int = 0
) -> Prepared:
    """Validate every line and the upload's parameters; normalize and split. Raises Rejected."""
    filename = filename or "<content>"
    upload_errors = [e for e in (name_error(name), fraction_error(validation_fraction)) if e]
    fmt, rows, line_errors, invalid_lines = parse_jsonl(content, filename)
    errors = upload_errors + line_errors
    if errors:
        raise Rejected(Rejection(errors[:MAX_REPORTED_ERRORS], invalid_lines, len(errors)))
    sides = split_rows(rows, validation_fraction or DEFAULT_VALIDATION_FRACTION, seed)
    files = {
        split: jsonl([row for row, side in zip(rows, sides, strict=True) if side == split])
        for split in SPLITS
    }
    return Prepared(
        format=fmt,
        rows=rows,
        sha256=sha256_hex(jsonl(rows)),
        files=files,
        split_sha256={split: sha256_hex(data) for split, data in files.items()},
        counts={split: sides.count(split) for split in SPLITS},
    )


def split_prefix(sha256: str, validation_fraction: float, seed: int) -> str:
    """Where a dataset's split files live. The split parameters are part of the key, so the same
    content split another way never overwrites files an existing dataset points at."""
    fraction = validation_fraction or DEFAULT_VALIDATION_FRACTION
    return f"datasets/{sha256}/seed{seed}-val{fraction!r}"


def request_fingerprint(name: str, content: bytes, validation_fraction: float, seed: int) -> str:
    """Identifies what a CreateDataset request asks for, to refuse an idempotency key reused for a
    different request. The filename only shapes error messages, so it is left out."""
    fraction = validation_fraction or DEFAULT_VALIDATION_FRACTION
    head = json.dumps([name, fraction, seed]).encode()
    return hashlib.sha256(head + b"\n" + content).hexdigest()
