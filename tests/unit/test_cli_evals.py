"""`llmstudio evals run`: its arguments (model refs, task sources) and help."""

from __future__ import annotations

import pytest

from llmstudio.cli import CliError, build_parser
from llmstudio.cli.evals import parse_model, parse_task


def test_run_and_get_have_help(capsys):
    for command in (["evals", "run"], ["evals", "get"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*command, "--help"])
        assert e.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_run_arguments():
    args = build_parser().parse_args(["evals", "run", "tiny@2", "--dataset", "ds-1", "--split",
                                      "test", "--suite", "generation", "--task",
                                      "mc=path:/srv/mc.jsonl", "--wait"])
    assert (args.model, args.dataset, args.split, args.suite, args.wait) == (
        "tiny@2", "ds-1", "test", "generation", True)
    assert parse_model("tiny@2") == ("tiny", 2)
    for bad in ("tiny", "tiny@latest", "@2", "tiny@0"):
        with pytest.raises(CliError, match="NAME@VERSION"):
            parse_model(bad)


def test_task_sources():
    assert parse_task("mc=path:/srv/mc.jsonl") == {"name": "mc", "path": "/srv/mc.jsonl",
                                                   "scoring": ""}
    assert parse_task("qa=key:tenants/acme/datasets/x,regex") == {
        "name": "qa", "key": "tenants/acme/datasets/x", "scoring": "regex"}
    assert parse_task("qa=dataset:ds-9,contains")["dataset_id"] == "ds-9"
    with pytest.raises(CliError, match="NAME=path:FILE"):
        parse_task("qa=/srv/x.jsonl")
