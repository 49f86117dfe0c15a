"""Shared fixtures: real servers on free ports, started per test session."""

from __future__ import annotations

import os
import sys

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


@pytest.fixture(autouse=True)
def fast_tests_train_nothing(request):
    """`make test-fast` (-m "not slow") trains nothing: an optimizer step in a test that is not
    marked slow fails it, so the marks stay true."""
    if request.node.get_closest_marker("slow") or "torch" not in sys.modules:
        yield
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def refuse(optimizer, args, kwargs):
        raise AssertionError("this test runs an optimizer step: mark it @pytest.mark.slow")

    handle = register_optimizer_step_pre_hook(refuse)
    yield
    handle.remove()


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one intra-op thread for a module: tiny matmuls gain nothing from threads, and
    on a busy 2-core machine they lose a lot. Use: pytestmark = usefixtures("single_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A database URL for a store: a fresh SQLite file, or a fresh schema in the machine's
    PostgreSQL (127.0.0.1:5432, database `test`), dropped afterwards; skipped where none runs."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import uuid

    import sqlalchemy as sa

    from llmstudio.db import make_engine

    try:
        admin = make_engine(PG_BASE)
        schema = f"t_{uuid.uuid4().hex[:10]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # noqa: BLE001 - no server, no database, no rights
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {e}")
    yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()
