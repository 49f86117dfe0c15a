"""JSONL parsing shared by the services that read training and validation files. Pure, no I/O."""

from __future__ import annotations

import json


def parse_jsonl(raw: bytes, source: str) -> list[dict]:
    """Rows of a JSONL file; a bad line is reported with its file and line number."""
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{source}: no rows")
    return rows
