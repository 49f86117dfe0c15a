"""Task files: evaluation sets beyond the dataset's own rows, each named, scored per sample.

- custom (generation) tasks: JSONL of {"input": ..., "expected": ...}; the model generates
  greedily from the input (as the prompt of a prompt/completion row) and each row is scored by
  the file's scoring: `exact` (stripped equality), `contains` (expected occurs in the output) or
  `regex` (re.search of `expected`, a pattern, in the output). Metric `<name>/score`.
- multiple-choice tasks (the lm-evaluation-harness convention): JSONL of {"query" or
  "context": ..., "choices": [...], "gold": index}; every choice is scored by the model's
  log-likelihood of " " + choice after the query. Metrics `<name>/acc` (argmax of the
  log-likelihood) and `<name>/acc_norm` (argmax of log-likelihood / characters of the choice,
  as the harness's acc_norm).

Pure (parsing and text scoring); the model work is in llmstudio.ml.evaluation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

GENERATE, MULTIPLE_CHOICE = "generate", "multiple_choice"
SCORINGS = ("exact", "contains", "regex")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ROWS = 100_000
MAX_PATTERN = 1000  # characters of a regex row's pattern
CONTINUATION_DELIMITER = " "


class TaskFileError(ValueError):
    """A task file that cannot be used: which file, which line, which field, why."""


@dataclass(frozen=True)
class TaskFile:
    name: str
    kind: str  # GENERATE or MULTIPLE_CHOICE
    rows: tuple[dict, ...]
    scoring: str = "exact"  # GENERATE only

    def metric_names(self) -> tuple[str, ...]:
        if self.kind == MULTIPLE_CHOICE:
            return (f"{self.name}/acc", f"{self.name}/acc_norm")
        return (f"{self.name}/score",)


def _exact(output: str, expected: str) -> bool:
    return output.strip() == expected.strip()


def _contains(output: str, expected: str) -> bool:
    return expected.strip() in output


def _regex(output: str, expected: str) -> bool:
    return re.search(expected, output) is not None


SCORERS: dict[str, Callable[[str, str], bool]] = {
    "exact": _exact, "contains": _contains, "regex": _regex,
}


def score_output(scoring: str, output: str, expected: str) -> float:
    return float(SCORERS[scoring](output, expected))


def _fail(source: str, line: int, message: str) -> TaskFileError:
    return TaskFileError(f"{source}, line {line}: {message}")


def _generate_row(row: dict, source: str, line: int, scoring: str) -> dict:
    for key in ("input", "expected"):
        if not isinstance(row.get(key), str):
            raise _fail(source, line, f"field '{key}' must be a string")
    if scoring == "regex":
        if len(row["expected"]) > MAX_PATTERN:
            raise _fail(source, line, f"field 'expected': pattern longer than {MAX_PATTERN}")
        try:
            re.compile(row["expected"])
        except re.error as e:
            raise _fail(source, line, f"field 'expected' is not a valid regex: {e}") from None
    return {"input": row["input"], "expected": row["expected"]}


def _choice_row(row: dict, source: str, line: int) -> dict:
    query = row.get("query", row.get("context"))
    if not isinstance(query, str):
        raise _fail(source, line, "field 'query' (or 'context') must be a string")
    choices = row.get("choices")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise _fail(source, line, "field 'choices' must be a list of at least 2 non-empty "
                                  "strings")
    gold = row.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise _fail(source, line, f"field 'gold' must be an index into the {len(choices)} "
                                  "choices")
    return {"query": query, "choices": list(choices), "gold": gold}


def parse_task_file(name: str, data: bytes, source: str, scoring: str = "") -> TaskFile:
    """A task file from JSONL `data` (read from `source`, named in errors). Its kind follows its
    first row: "choices" makes it multiple choice; every row must then have that shape."""
    if not NAME.match(name or ""):
        raise TaskFileError(f"{source}: task name {name!r} must be 1-64 letters, digits, "
                            "'_', '.', '-'")
    if scoring and scoring not in SCORINGS:
        raise TaskFileError(f"{source}: scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{source}: not UTF-8 ({e})") from None
    rows: list[dict] = []
    kind = ""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(source, line_no, f"invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise _fail(source, line_no, "a row must be a JSON object")
        kind = kind or (MULTIPLE_CHOICE if "choices" in row else GENERATE)
        if kind == MULTIPLE_CHOICE:
            rows.append(_choice_row(row, source, line_no))
        else:
            rows.append(_generate_row(row, source, line_no, scoring or "exact"))
        if len(rows) > MAX_ROWS:
            raise _fail(source, line_no, f"more than {MAX_ROWS} rows")
    if not rows:
        raise TaskFileError(f"{source}: no rows")
    if kind == MULTIPLE_CHOICE and scoring:
        raise TaskFileError(f"{source}: a multiple-choice file is scored by log-likelihood, "
                            f"not {scoring!r}")
    return TaskFile(name=name, kind=kind, rows=tuple(rows), scoring=scoring or "exact")


def choose(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(acc choice, acc_norm choice): argmax of the log-likelihood, and of the log-likelihood
    per character of the choice (first index on ties, like numpy's argmax)."""
    acc = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    norm = [ll / len(c) for ll, c in zip(logliks, choices, strict=True)]
    acc_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return acc, acc_norm
