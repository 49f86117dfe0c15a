"""Structural diffs of contract documents: one line per change, naming the field that changed.

Each differ takes the snapshot (old) and the generated document (new) and returns lines such as
"event llmstudio.job.completed.v1: field 'checkpoint_key' removed" or
"proto message llmstudio.v1.Job: field 10 'priority' changed type int32 -> string".
No lines means equal up to the order of JSON lists the differ treats as sets (`required`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

# JSON Schema keywords `_schema_type` renders, so a change in any of them reads as a type change.
TYPE_KEYWORDS = frozenset(
    "type $ref anyOf oneOf allOf items additionalProperties const enum format".split()
)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff_json(label: str, old: Any, new: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Any two JSON values: keys added/removed and scalars changed, by path."""
    where = f"{label} {'/'.join(path)}" if path else label
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(old.keys() | new.keys()):
            if key not in new:
                lines.append(f"{where}: '{key}' removed")
            elif key not in old:
                lines.append(f"{where}: '{key}' added: {_short(new[key])}")
            else:
                lines += diff_json(label, old[key], new[key], (*path, str(key)))
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            line
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for line in diff_json(label, a, b, (*path, str(i)))
        ]
    return [] if old == new else [f"{where}: changed {_short(old)} -> {_short(new)}"]


def _schema_type(schema: Mapping[str, Any]) -> str:
    """A JSON Schema's type as one readable string: integer, string(date-time), array[Foo],
    map[number], integer | null."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    for keyword, sep in (("anyOf", " | "), ("oneOf", " ^ "), ("allOf", " & ")):
        if keyword in schema:
            return sep.join(_schema_type(s) for s in schema[keyword])
    if "const" in schema:
        return f"const {_short(schema['const'])}"
    if "enum" in schema:
        return "enum " + " | ".join(_short(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    kind = " | ".join(kind) if isinstance(kind, list) else kind
    if kind == "array":
        return f"array[{_schema_type(schema.get('items', {}))}]"
    values = schema.get("additionalProperties")
    if kind == "object" and isinstance(values, dict):
        return f"map[{_schema_type(values)}]"
    return f"{kind}({schema['format']})" if "format" in schema else kind


def _diff_property(label: str, name: str, old: dict, new: dict) -> list[str]:
    field = f"{label}: field '{name}'"
    old_type, new_type = _schema_type(old), _schema_type(new)
    lines = [] if old_type == new_type else [f"{field} changed type {old_type} -> {new_type}"]
    for key in sorted((old.keys() | new.keys()) - TYPE_KEYWORDS):
        if old.get(key) != new.get(key):
            lines.append(f"{field} changed {key} {_short(old.get(key))} -> {_short(new.get(key))}")
    typed_old = {k: v for k, v in old.items() if k in TYPE_KEYWORDS}
    typed_new = {k: v for k, v in new.items() if k in TYPE_KEYWORDS}
    if old_type == new_type and typed_old != typed_new:  # a detail the type string leaves out
        lines.append(f"{field} changed schema {_short(typed_old)} -> {_short(typed_new)}")
    return lines


def diff_schema(label: str, old: dict, new: dict) -> list[str]:
    """Two JSON Schemas of an object (pydantic's output): fields, required-ness, nested models."""
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    old_req, new_req = set(old.get("required", [])), set(new.get("required", []))
    lines = []
    for name in sorted(old_props.keys() | new_props.keys()):
        if name not in new_props:
            lines.append(f"{label}: field '{name}' removed")
        elif name not in old_props:
            kind = "required" if name in new_req else "optional"
            lines.append(f"{label}: field '{name}' added ({kind}, {_schema_type(new_props[name])})")
        else:
            if (name in old_req) != (name in new_req):
                now = "required" if name in new_req else "optional"
                lines.append(f"{label}: field '{name}' became {now}")
            lines += _diff_property(label, name, old_props[name], new_props[name])
    lines += _diff_named(f"{label} model", old.get("$defs", {}), new.get("$defs", {}), diff_schema)
    rest = {"properties", "required", "$defs"}
    lines += diff_json(
        label,
        {k: v for k, v in old.items() if k not in rest},
        {k: v for k, v in new.items() if k not in rest},
    )
    return lines


def _diff_named(noun: str, old: Mapping, new: Mapping, differ: Callable) -> list[str]:
    """Named things (events, models, messages): added, removed, or diffed by `differ`."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            lines.append(f"{noun} {name}: removed")
        elif name not in old:
            lines.append(f"{noun} {name}: added")
        else:
            lines += differ(f"{noun} {name}", old[name], new[name])
    return lines


def diff_event_schemas(old: dict, new: dict) -> list[str]:
    def diff_event(label: str, a: dict, b: dict) -> list[str]:
        subject = (
            []
            if a["subject"] == b["subject"]
            else [f"{label}: subject {a['subject']} -> {b['subject']}"]
        )
        return subject + diff_schema(label, a["schema"], b["schema"])

    return diff_schema("envelope", old["envelope"], new["envelope"]) + _diff_named(
        "event", old["events"], new["events"], diff_event
    )


def diff_asyncapi(old: dict, new: dict) -> list[str]:
    """Message schemas field by field; channels, operations and the rest by path."""

    def schemas(doc: dict) -> dict:
        return doc.get("components", {}).get("schemas", {})

    def without_schemas(doc: dict) -> dict:
        components = {k: v for k, v in doc.get("components", {}).items() if k != "schemas"}
        return {**doc, "components": components}

    return _diff_named("asyncapi schema", schemas(old), schemas(new), diff_schema) + diff_json(
        "asyncapi", without_schemas(old), without_schemas(new)
    )


def _diff_members(noun: str, label: str, old: Mapping, new: Mapping) -> list[str]:
    """Members keyed by number or name (fields, enum values, methods), each a dict of scalars."""
    lines = []
    for key in sorted(old.keys() | new.keys(), key=lambda k: (len(k), k)):
        a, b = old.get(key), new.get(key)
        named = f"{noun} {key} '{(a or b)['name']}'" if "name" in (a or b) else f"{noun} '{key}'"
        if b is None:
            lines.append(f"{label}: {named} removed")
        elif a is None:
            lines.append(f"{label}: {named} added ({_short(b)})")
        else:
            lines += [
                f"{label}: {named} changed {attr} {a.get(attr, '-')} -> {b.get(attr, '-')}"
                for attr in sorted(a.keys() | b.keys())
                if a.get(attr) != b.get(attr)
            ]
    return lines


MEMBERS = {"messages": "field", "enums": "value", "services": "method"}


def diff_proto(old: dict, new: dict) -> list[str]:
    lines = diff_json("proto", old["files"], new["files"], ("files",))
    for kind, member in MEMBERS.items():
        differ = partial(_diff_members, member)
        lines += _diff_named(f"proto {kind[:-1]}", old[kind], new[kind], differ)
    return lines
