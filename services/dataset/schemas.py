"""Input schemas, pure: recognize what a raw record holds and normalize it to a training format.

A record is one dict from `formats.read_records`. Its schema is named by the user or detected
from its keys, through the registry SCHEMAS (name -> the keys that claim it + its normalizer):

    schema             record                                              normalized format
    openai_chat        {"messages": [{"role", "content"}, ...]}            messages
    sharegpt           {"conversations": [{"from", "value"}, ...]}         messages
                       (from: human|user -> user, gpt|assistant -> assistant, system)
    preference         {"prompt", "chosen", "rejected"}                    preference
                       (or TRL's conversational form, message lists: reduced to the above
                       when the context before the two replies is one user message)
    alpaca             {"instruction", "input" (optional), "output"}       prompt_completion
                       (prompt = instruction, + "\\n\\n" + input when input is not blank)
    prompt_completion  {"prompt", "completion"}                            prompt_completion
    text               {"text"}                                            text

Normalized formats (what the trainer reads):

    prompt_completion  {"prompt": str, "completion": str}                      (sft)
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                       (>= 1 assistant message)                                (sft)
    text               {"text": str}                                           (pretrain)
    preference         {"prompt": str, "chosen": str, "rejected": str}         (dpo, orpo)
                       (chosen and rejected differ)

Every text must be a non-blank string of valid Unicode (alpaca's input may be blank); fields
outside the schema are dropped. A detected record that also claims another schema (messages and
prompt, say) is an error: naming the schema reads it without the guess.
A conversation field (messages, conversations) given as a string is read as JSON text: CSV cells
can hold nothing else. Text fields are never decoded, so a completion that is JSON stays text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .core import MESSAGES, PREFERENCE, PROMPT_COMPLETION, TEXT

ROLES = ("system", "user", "assistant")
CHAT_ROLES = {role: role for role in ROLES}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")

Normalized = tuple[dict | None, list[str]]  # (normalized row, []) or (None, field errors)


@dataclass(frozen=True)
class Schema:
    name: str
    format: str  # the normalized format its rows take
    fields: tuple[str, ...]  # every field it reads: what a column_map may name
    claims: tuple[str, ...]  # the detector: a record with any of these keys is of this schema
    normalize: Callable[[dict], Normalized]
    optional: tuple[str, ...] = ()


# -- field checks -------------------------------------------------------------------------------


def json_type(value: Any) -> str:
    # Parquet and Arrow rows can also hold bytes, dates, decimals: name those by their type
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    kinds |= {int: "number", float: "number"}
    return kinds.get(type(value), type(value).__name__)


def _text_error(value: Any, path: str, *, allow_blank: bool = False) -> str | None:
    if not isinstance(value, str):
        return f"field '{path}': must be a string, got {json_type(value)}"
    if not allow_blank and not value.strip():
        return f"field '{path}': must not be empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        return f"field '{path}': not valid Unicode text (lone surrogate)"
    return None


def _check_fields(record: dict, fields: tuple[str, ...]) -> Normalized:
    errors = []
    for field in fields:
        if field not in record:
            errors.append(f"field '{field}': missing")
        elif err := _text_error(record[field], field):
            errors.append(err)
    return (None, errors) if errors else ({f: record[f] for f in fields}, [])


def _message_items(
    items: list, path: str, role_key: str, content_key: str, roles: dict[str, str]
) -> tuple[list[dict], list[str]]:
    """Each item checked as {role_key, content_key}; roles maps the record's role names to ours."""
    errors, messages = [], []
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        if not isinstance(item, dict):
            errors.append(f"field '{item_path}': must be an object, got {json_type(item)}")
            continue
        item_errors: list[str] = []
        role = item.get(role_key, "")
        if role_key not in item:
            item_errors.append(f"field '{item_path}.{role_key}': missing")
        elif not (isinstance(role, str) and role in roles):  # a dict role is unhashable
            item_errors.append(f"field '{item_path}.{role_key}': must be one of {', '.join(roles)}")
        if content_key not in item:
            item_errors.append(f"field '{item_path}.{content_key}': missing")
        elif err := _text_error(item[content_key], f"{item_path}.{content_key}"):
            item_errors.append(err)
        if item_errors:
            errors += item_errors
        else:
            messages.append({"role": roles[role], "content": item[content_key]})
    return messages, errors


def _conversation(
    record: dict, field: str, role_key: str, content_key: str, roles: dict[str, str]
) -> tuple[list[dict], list[str]]:
    """A conversation field, checked: non-empty, each message valid, >= 1 assistant message."""
    if field not in record:
        return [], [f"field '{field}': missing"]
    value = record[field]
    shape = f"a non-empty array of {{{role_key}, {content_key}}}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return [], [
                f"field '{field}': must be {shape}, got text that is not JSON "
                f"({e.msg}, col {e.colno})"
            ]
    if not isinstance(value, list) or not value:
        return [], [f"field '{field}': must be {shape}"]
    messages, errors = _message_items(value, field, role_key, content_key, roles)
    if not errors and not any(m["role"] == "assistant" for m in messages):
        errors.append(f"field '{field}': needs at least one assistant message")
    return messages, errors


# -- normalizers, one per schema ----------------------------------------------------------------


def _normalize_prompt_completion(record: dict) -> Normalized:
    return _check_fields(record, ("prompt", "completion"))


def _normalize_text(record: dict) -> Normalized:
    return _check_fields(record, ("text",))


def _normalize_alpaca(record: dict) -> Normalized:
    errors = []
    if "instruction" not in record:
        errors.append("field 'instruction': missing")
    elif err := _text_error(record["instruction"], "instruction"):
        errors.append(err)
    context = record.get("input")
    if context is None:  # absent, or a null cell in a Parquet / Arrow column
        context = ""
    if err := _text_error(context, "input", allow_blank=True):
        errors.append(err)
    if "output" not in record:
        errors.append("field 'output': missing")
    elif err := _text_error(record["output"], "output"):
        errors.append(err)
    if errors:
        return None, errors
    prompt = record["instruction"] + ("\n\n" + context if context.strip() else "")
    return {"prompt": prompt, "completion": record["output"]}, []


def _normalize_openai_chat(record: dict) -> Normalized:
    messages, errors = _conversation(record, "messages", "role", "content", CHAT_ROLES)
    return (None, errors) if errors else ({"messages": messages}, [])


def _normalize_sharegpt(record: dict) -> Normalized:
    messages, errors = _conversation(record, "conversations", "from", "value", SHAREGPT_ROLES)
    return (None, errors) if errors else ({"messages": messages}, [])


def _normalize_preference(record: dict) -> Normalized:
    if any(isinstance(record.get(f), list) for f in PREFERENCE_FIELDS):
        return _normalize_preference_conversation(record)
    row, errors = _check_fields(record, PREFERENCE_FIELDS)
    if row and row["chosen"] == row["rejected"]:
        return None, ["field 'rejected': must differ from 'chosen'"]
    return row, errors


def _normalize_preference_conversation(record: dict) -> Normalized:
    """TRL's conversational form: prompt, chosen and rejected as message lists (a string stands
    for one user / assistant message), or no prompt and chosen/rejected as whole conversations.
    The trainer reads one prompt text, so the shared part before the final replies must be a
    single user message; anything longer is refused rather than flattened by a guessed template."""
    parts: dict[str, list[dict]] = {"prompt": []}  # no prompt: chosen and rejected carry it
    errors = []
    for field, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        if field not in record:
            if field != "prompt":
                errors.append(f"field '{field}': missing")
            continue
        value = record[field]
        if isinstance(value, list) and value:
            parts[field], item_errors = _message_items(value, field, "role", "content", CHAT_ROLES)
            errors += item_errors
        elif isinstance(value, list):
            errors.append(f"field '{field}': must be a non-empty array of {{role, content}}")
        elif err := _text_error(value, field):
            errors.append(err)
        else:
            parts[field] = [{"role": role, "content": value}]
    if errors:
        return None, errors
    chosen, rejected = parts["prompt"] + parts["chosen"], parts["prompt"] + parts["rejected"]
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            errors.append(f"field '{field}': must end with an assistant message")
    if errors:
        return None, errors
    if chosen[:-1] != rejected[:-1]:
        return None, [
            "field 'rejected': must share the conversation before its last message with 'chosen'"
        ]
    context = chosen[:-1]
    if [m["role"] for m in context] != ["user"]:
        where = "prompt" if parts["prompt"] else "chosen"
        roles = ", ".join(m["role"] for m in context) or "none"
        return None, [
            f"field '{where}': the conversation before the chosen and rejected replies "
            f"must be one user message, got {roles}; a preference row holds one "
            "prompt text"
        ]
    row = {
        "prompt": context[0]["content"],
        "chosen": chosen[-1]["content"],
        "rejected": rejected[-1]["content"],
    }
    if row["chosen"] == row["rejected"]:
        return None, ["field 'rejected': must differ from 'chosen'"]
    return row, []


# -- the registry -------------------------------------------------------------------------------

# In detection order: a record claims the first schema whose keys it has. 'text' comes last and
# never clashes: many datasets carry a rendered 'text' column beside their structured fields.
SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in (
        Schema(
            name="openai_chat",
            format=MESSAGES,
            fields=("messages",),
            claims=("messages",),
            normalize=_normalize_openai_chat,
        ),
        Schema(
            name="sharegpt",
            format=MESSAGES,
            fields=("conversations",),
            claims=("conversations",),
            normalize=_normalize_sharegpt,
        ),
        Schema(
            name="preference",
            format=PREFERENCE,
            fields=PREFERENCE_FIELDS,
            claims=("chosen", "rejected"),
            normalize=_normalize_preference,
        ),
        Schema(
            name="alpaca",
            format=PROMPT_COMPLETION,
            fields=("instruction", "input", "output"),
            claims=("instruction", "output"),
            normalize=_normalize_alpaca,
            optional=("input",),
        ),
        Schema(
            name="prompt_completion",
            format=PROMPT_COMPLETION,
            fields=("prompt", "completion"),
            claims=("prompt", "completion"),
            normalize=_normalize_prompt_completion,
        ),
        Schema(
            name="text", format=TEXT, fields=("text",), claims=("text",), normalize=_normalize_text
        ),
    )
}
NORMALIZED_FORMAT: dict[str, str] = {name: s.format for name, s in SCHEMAS.items()}
_ALL_FIELDS = frozenset(f for s in SCHEMAS.values() for f in s.fields)


def detect_schema(record: dict) -> str | None:
    """The schema a record's keys claim (the first in registry order); None if it claims none."""
    return next((s.name for s in SCHEMAS.values() if any(k in record for k in s.claims)), None)


def _mixing_error(record: dict, schema: Schema) -> str | None:
    """A detected record must not also claim another schema: which one it means is a guess."""
    for other in SCHEMAS.values():
        if other.name in (schema.name, TEXT):
            continue
        # keys the two schemas share (preference's 'prompt') are no clash
        clashing = [k for k in other.claims if k in record and k not in schema.fields]
        if clashing:
            own = [k for k in schema.claims if k in record]
            return (
                f"row mixes {_quoted(own)} with {_quoted(clashing)}: use one schema, "
                "or name the one to read"
            )
    return None


def _quoted(keys: list[str]) -> str:
    return "/".join(f"'{k}'" for k in keys)


def _no_schema_error(record: dict) -> str:
    wanted = ", ".join(
        f"{s.name} ({', '.join(f for f in s.fields if f not in s.optional)})"
        for s in SCHEMAS.values()
    )
    return f"row must have the fields of one schema: {wanted}; got keys {sorted(record) or 'none'}"


def check_options(schema: str | None, column_map: dict[str, str] | None) -> None:
    """Raises ValueError for an unknown schema, or a column_map naming a field no schema (or not
    the given schema) reads. Call it once per upload, before reading any record."""
    if schema is not None and schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; known schemas: {', '.join(SCHEMAS)}")
    if not column_map:
        return
    readable = SCHEMAS[schema].fields if schema else _ALL_FIELDS
    unknown = sorted(set(column_map) - set(readable))
    if unknown:
        owner = f"schema {schema}" if schema else "any schema"
        raise ValueError(
            f"column_map names field(s) {', '.join(unknown)} that {owner} does not read; "
            f"fields: {', '.join(sorted(readable))}"
        )
    if not all(isinstance(c, str) and c for c in column_map.values()):
        raise ValueError("column_map: each field must map to a non-empty column name")


def _apply_column_map(record: dict, column_map: dict[str, str]) -> dict:
    """The record with the user's columns renamed to schema fields. A mapped column that is
    missing leaves its field missing, even if the record has a key of the field's own name."""
    mapped = set(column_map) | set(column_map.values())
    renamed = {k: v for k, v in record.items() if k not in mapped}
    for field, column in column_map.items():
        if column in record:
            renamed[field] = record[column]
    return renamed


_ERROR_FIELD = re.compile(r"field '(?P<field>[^'.\[]+)[^']*'")


def _name_column(error: str, column_map: dict[str, str]) -> str:
    """An error about a mapped field also names the user's column, which is what they can see."""
    m = _ERROR_FIELD.match(error)
    if not m or m["field"] not in column_map:
        return error
    return f"{m[0]} (column '{column_map[m['field']]}')" + error[m.end() :]


def normalize(
    record: dict, schema: str | None = None, column_map: dict[str, str] | None = None
) -> Normalized:
    """(normalized row, []) for a valid record, else (None, errors naming field and reason).

    schema None: detect it from this record's keys; a record claiming none, or two, is an error.
    schema named: read the record as that schema, no detection; keys it does not read are dropped.
    column_map: schema field -> the user's column holding it ({"prompt": "question"}), applied
    before detection. Raises ValueError as check_options does.
    """
    check_options(schema, column_map)
    if column_map:
        record = _apply_column_map(record, column_map)
    if schema is None:
        schema = detect_schema(record)
        if schema is None:
            return None, [_no_schema_error(record)]
        if err := _mixing_error(record, SCHEMAS[schema]):
            return None, [err]
    row, errors = SCHEMAS[schema].normalize(record)
    if column_map:
        errors = [_name_column(e, column_map) for e in errors]
    return row, errors
