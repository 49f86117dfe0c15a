"""`llmstudio datasets push` against the dataset service in-process (real nats-server, real gRPC):
its output says how many rows went to validation and how to change that."""

from __future__ import annotations

import asyncio
import json

import pytest

from llmstudio.cli import main
from llmstudio.config import Settings
from llmstudio.natsserver import free_port
from services.dataset.app import build
from tests.support.harness import put_api_key, running

ROWS = [{"prompt": f"Reverse: w{i} v{i}\nAnswer:", "completion": f" v{i} w{i}"} for i in range(40)]


@pytest.fixture
async def cli(nats_server, tmp_path, monkeypatch):
    """Runs the CLI (in a thread: the service shares this event loop) against the service."""
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path / "service",
                        grpc_port=free_port())
    async with running("dataset", build, settings) as port:
        monkeypatch.setenv("LLMSTUDIO_DATASET_ADDR", f"127.0.0.1:{port}")
        monkeypatch.setenv("LLMSTUDIO_API_KEY", await put_api_key(nats_server.url, "developer"))
        source = tmp_path / "reverse.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

        async def run(*flags: str) -> int:
            return await asyncio.to_thread(main, ["datasets", "push", str(source), *flags,
                                                  "--data-dir", str(tmp_path / "cli")])
        yield run


async def test_push_says_how_many_rows_went_to_validation_by_default(cli, capsys):
    assert await cli() == 0
    line = capsys.readouterr().out.splitlines()[-1]
    held_out = int(line.split("validation: ")[1].split(" of ")[0])
    assert 0 < held_out < len(ROWS)
    assert line == (f"  validation: {held_out} of {len(ROWS)} rows held out for evaluation, not "
                    "trained on (fraction 0.1, the default; --validation-fraction F changes it)")


async def test_push_names_the_flag_when_the_fraction_was_chosen(cli, capsys):
    assert await cli("--validation-fraction", "0.25", "--name", "quarter") == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("  validation: ") and line.endswith(
        f"of {len(ROWS)} rows held out for evaluation, not trained on "
        "(fraction 0.25, from --validation-fraction)")


async def test_push_json_output_carries_the_counts(cli, capsys):
    assert await cli("--json") == 0
    pushed = json.loads(capsys.readouterr().out)
    train, validation, rows = (int(pushed[k]) for k in ("train_rows", "validation_rows",
                                                         "num_rows"))  # int64: JSON strings
    assert train + validation == rows == len(ROWS) and validation > 0
    assert pushed["validation_fraction"] == 0.1
