"""One embedded stack (real nats-server with its users, every service a subprocess) for the
security cases that attack a whole deployment."""

from __future__ import annotations

import pytest

from llmstudio import local
from llmstudio.client import Client


@pytest.fixture(scope="package")
def deployed(tmp_path_factory):
    """(data dir, the admin's Client) of a running embedded stack."""
    data_dir = tmp_path_factory.mktemp("deployed")
    local.up(data_dir, timeout=240)
    client = Client(data_dir=data_dir)
    yield data_dir, client
    client.close()
    local.down(data_dir)
