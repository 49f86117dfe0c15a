"""The platform's contracts as plain JSON documents, so a contract change is a visible diff.

- `event_schemas`: the JSON Schema of the envelope and of every event type's data, with subject.
- `asyncapi_document`: the bus as AsyncAPI 3.0 (faststream), one channel per event type whose
  message is the envelope carrying that type's data.
- `proto_summary`: every `llmstudio.v1` proto file's messages (fields by number), enums and
  services, from the descriptors compiled into the generated modules.

tests/contract/ snapshots all three.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from google.protobuf.descriptor_pb2 import (
    FieldDescriptorProto,
    FileDescriptorProto,
    MethodDescriptorProto,
)
from pydantic import create_model

from .events import EVENT_TYPES, Envelope, EventData


def event_schemas(types: Mapping[str, type[EventData]] = EVENT_TYPES) -> dict[str, Any]:
    return {
        "envelope": Envelope.model_json_schema(),
        "events": {
            name: {
                "subject": f"{cls.SUBJECT}.<{cls.ENTITY}>",
                "schema": cls.model_json_schema(),
            }
            for name, cls in sorted(types.items())
        },
    }


def typed_envelope(cls: type[EventData]) -> type[Envelope]:
    """The envelope as it travels with `cls` as its data: what a consumer of that type reads."""
    return create_model(
        f"{cls.__name__}Event",
        __base__=Envelope,
        __doc__=f"CloudEvents envelope of {cls.TYPE}.",
        type=(Literal[cls.TYPE], ...),  # type: ignore[arg-type]  # a Literal built at run time
        data=(cls, ...),
    )


def asyncapi_document(types: Mapping[str, type[EventData]] = EVENT_TYPES) -> dict[str, Any]:
    # Imported here: only this document needs faststream's specification machinery.
    from faststream.nats import NatsBroker
    from faststream.specification import AsyncAPI

    broker = NatsBroker()  # never connected: it only collects the publishers
    for name, cls in sorted(types.items()):
        broker.publisher(
            f"{cls.SUBJECT}.*",
            title=name,
            description=(cls.__doc__ or "").strip() or None,
            schema=typed_envelope(cls),
        )
    spec = AsyncAPI(broker, title="LLM Studio bus", version="v1", schema_version="3.0.0")
    return spec.to_specification().to_jsonable()


def proto_files() -> list[FileDescriptorProto]:
    """The FileDescriptorProto of every generated `llmstudio.v1` module (`make proto`)."""
    from . import v1

    files = []
    for module in sorted(m.name for m in pkgutil.iter_modules(v1.__path__)):
        if module.endswith("_pb2"):
            proto = FileDescriptorProto()
            importlib.import_module(f"{v1.__name__}.{module}").DESCRIPTOR.CopyToProto(proto)
            files.append(proto)
    return files


def proto_summary(files: Iterable[FileDescriptorProto]) -> dict[str, Any]:
    """Messages (fields keyed by number), enums (values by number), services (methods by name),
    and per file its package, imports and what it defines. Map entries show as `map<k, v>`."""
    summary: dict[str, Any] = {"files": {}, "messages": {}, "enums": {}, "services": {}}
    for file in files:
        defined: list[str] = []
        scope = file.package
        _add_messages(summary, file.message_type, scope, defined)
        _add_enums(summary, file.enum_type, scope, defined)
        for service in file.service:
            name = f"{scope}.{service.name}"
            defined.append(name)
            summary["services"][name] = {m.name: _method(m) for m in service.method}
        summary["files"][file.name] = {
            "package": file.package,
            "dependencies": list(file.dependency),
            "defines": defined,
        }
    return summary


def _add_messages(summary: dict, messages: Iterable, scope: str, defined: list[str]) -> None:
    for message in messages:
        name = f"{scope}.{message.name}"
        maps = {
            f"{name}.{entry.name}": f"map<{_type(entry.field[0])}, {_type(entry.field[1])}>"
            for entry in message.nested_type
            if entry.options.map_entry
        }
        defined.append(name)
        summary["messages"][name] = {
            str(f.number): _field(f, message.oneof_decl, maps) for f in message.field
        }
        nested = [m for m in message.nested_type if not m.options.map_entry]
        _add_messages(summary, nested, name, defined)
        _add_enums(summary, message.enum_type, name, defined)


def _add_enums(summary: dict, enums: Iterable, scope: str, defined: list[str]) -> None:
    for enum in enums:
        name = f"{scope}.{enum.name}"
        defined.append(name)
        summary["enums"][name] = {str(v.number): {"name": v.name} for v in enum.value}


def _field(
    field: FieldDescriptorProto, oneofs: Iterable, maps: Mapping[str, str]
) -> dict[str, str]:
    type_name = _type(field)
    out = {"name": field.name, "type": maps.get(type_name, type_name)}
    if field.proto3_optional:
        out["label"] = "optional"
    elif field.label == FieldDescriptorProto.LABEL_REPEATED and type_name not in maps:
        out["label"] = "repeated"
    if field.HasField("oneof_index") and not field.proto3_optional:
        out["oneof"] = list(oneofs)[field.oneof_index].name
    return out


def _type(field: FieldDescriptorProto) -> str:
    if field.type in (FieldDescriptorProto.TYPE_MESSAGE, FieldDescriptorProto.TYPE_ENUM):
        return field.type_name.lstrip(".")
    return FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()


def _method(method: MethodDescriptorProto) -> dict[str, Any]:
    return {
        "input": method.input_type.lstrip("."),
        "output": method.output_type.lstrip("."),
        "client_streaming": method.client_streaming,
        "server_streaming": method.server_streaming,
    }
