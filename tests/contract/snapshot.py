"""Compare a generated contract document with its committed snapshot; fail naming the changes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE_ENV = "LLMSTUDIO_UPDATE_SNAPSHOTS"
HOW_TO_UPDATE = (
    f"If the change is intended, regenerate the snapshots with `{UPDATE_ENV}=1 .venv/bin/python "
    "-m pytest tests/contract` and commit them. A removed or retyped field breaks existing "
    "consumers: prefer a new field, or a new event type / message version."
)


def render(document: Any) -> str:
    """Stable text: sorted keys, fixed indentation, a final newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def check_snapshot(path: Path, document: Any, differ: Callable[[Any, Any], list[str]]) -> None:
    text = render(document)
    if os.environ.get(UPDATE_ENV) == "1":
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no contract snapshot {path.name}. {HOW_TO_UPDATE}", pytrace=False)
    old, new = json.loads(path.read_text(encoding="utf-8")), json.loads(text)
    if old == new:
        return
    changes = differ(old, new) or ["the same content in another order"]
    listed = "\n  ".join(changes)
    pytest.fail(f"contract {path.name} changed:\n  {listed}\n{HOW_TO_UPDATE}", pytrace=False)
