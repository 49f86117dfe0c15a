"""The event schemas, the AsyncAPI document of the bus and the proto descriptors, as committed."""

from __future__ import annotations

import pytest

from llmstudio.contracts import asyncapi_document, event_schemas, proto_files, proto_summary

from .contractdiff import diff_asyncapi, diff_event_schemas, diff_proto
from .snapshot import SNAPSHOTS, check_snapshot

CONTRACTS = {
    "events.json": (event_schemas, diff_event_schemas),
    "asyncapi.json": (asyncapi_document, diff_asyncapi),
    "proto.json": (lambda: proto_summary(proto_files()), diff_proto),
}


@pytest.mark.parametrize("name", CONTRACTS)
def test_contract_matches_snapshot(name):
    build, differ = CONTRACTS[name]
    check_snapshot(SNAPSHOTS / name, build(), differ)
