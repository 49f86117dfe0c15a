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


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one intra-op thread for a module: tiny matmuls gain nothing from threads, and
    on a busy 2-core machine they lose a lot. Use: pytestmark = usefixtures("single_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
