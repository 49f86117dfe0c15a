"""The one rule for names that become NATS subject tokens or storage keys.

A model name ends up in `llmstudio.model.<event>.<name>-v<version>`, a dataset name in a
rejection's subject and in artifact keys: one token each. NATS splits subjects at '.', and
refuses whitespace and wildcards ('*', '>'); a key must hold no '/' or '..'. So a name is a
letter or digit, then up to 63 letters, digits, '_' or '-'.
"""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_NAME_LENGTH = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def name_error(name: str) -> str | None:
    """Why `name` cannot be a subject token or key (None if it can)."""
    if NAME_PATTERN.fullmatch(name):  # fullmatch: `$` would accept a trailing newline
        return None
    return f"must match {NAME_PATTERN.pattern} (a single NATS subject token; got {name!r})"


def safe_name(text: str) -> str:
    """`text` made into a valid name: each run of other characters becomes '-', cut to length
    ('Qwen2.5-0.5B' -> 'Qwen2-5-0-5B')."""
    name = _UNSAFE.sub("-", text).strip("-_")[:MAX_NAME_LENGTH].rstrip("-_")
    return name or "model"
