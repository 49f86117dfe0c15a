"""Shared fixtures: real servers on free ports, started per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def nats_server(tmp_path):
    """A fresh nats-server with JetStream and an empty store, per test."""
    from llmstudio.natsserver import start_nats_server

    server = start_nats_server(tmp_path / "jetstream")
    yield server
    server.stop()
