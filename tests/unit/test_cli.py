"""The CLI's surface: help for every command, one-line errors and exit codes, spec loading."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmstudio.cli import CliError, build_parser, main
from llmstudio.cli.jobs import load_job_spec
from llmstudio.cli.models import parse_model_ref

COMMANDS = [
    ["up"], ["down"], ["status"], ["demo"],
    ["datasets", "push"], ["datasets", "import"], ["datasets", "derive"], ["datasets", "list"],
    ["datasets", "show"], ["datasets", "report"], ["datasets", "preview"],
    ["jobs", "create"], ["jobs", "list"], ["jobs", "show"], ["jobs", "watch"], ["jobs", "cancel"],
    ["jobs", "pause"], ["jobs", "resume"], ["quotas", "show"], ["quotas", "set"],
    ["models", "list"], ["models", "show"], ["models", "stage"],
    ["evals", "list"], ["audit", "verify"], ["audit", "query"],
    ["keys", "create"], ["keys", "whoami"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_json_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and f"llmstudio {' '.join(command)}" in out


def test_model_refs():
    assert parse_model_ref("reverse@3") == ("reverse", 3)
    assert parse_model_ref("reverse") == ("reverse", 0)
    with pytest.raises(CliError, match="must be a number"):
        parse_model_ref("reverse@latest")
    with pytest.raises(CliError, match="NAME@VERSION"):
        parse_model_ref("@2")


def test_dataset_push_flags_become_ingest_options():
    from llmstudio.cli.datasets import _column_map, _ingest_options

    args = build_parser().parse_args(
        [
            "datasets",
            "push",
            "qa.csv",
            "--schema",
            "prompt_completion",
            "--map",
            "prompt=question",
            "--map",
            "completion=answer",
            "--test-fraction",
            "0.1",
            "--dedup",
            "--redact-pii",
            "--max-invalid-fraction",
            "0.02",
        ]
    )
    options = _ingest_options(args)
    assert options["column_map"] == {"prompt": "question", "completion": "answer"}
    assert (options["schema"], options["test_fraction"], options["max_invalid_fraction"]) == (
        "prompt_completion",
        0.1,
        0.02,
    )
    assert options["remove_duplicates"] and options["redact_pii"]
    assert not options["remove_near_duplicates"] and options["max_pii_fraction"] is None
    with pytest.raises(CliError, match="expected FIELD=COLUMN"):
        _column_map(["prompt"])


def test_job_spec_errors_name_the_file(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(CliError, match="job.yaml: invalid YAML"):
        load_job_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(CliError, match="must be a mapping"):
        load_job_spec(bad)
    with pytest.raises(CliError, match="no such file"):
        load_job_spec(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("base_model: /m\ndataset: ds-1\nhyperparameters:\n  max_steps: 5\n")
    assert load_job_spec(good)["hyperparameters"] == {"max_steps": 5}


def test_failures_print_one_line_and_exit_non_zero(tmp_path, capsys):
    assert main(["status", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no stack in") and "\n" not in err

    assert main(["jobs", "create", "-f", str(tmp_path / "nope.yaml"), "--data-dir",
                 str(tmp_path)]) == 1
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_unreachable_service_is_a_one_line_grpc_error(tmp_path):
    from llmstudio.natsserver import free_port

    env = {"LLMSTUDIO_SCHEDULER_ADDR": f"127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmstudio.cli", "jobs", "list", "--api-key", "k",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: UNAVAILABLE") and proc.stderr.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["models", "stage", "m@1", "heaven"])
    assert e.value.code == 2


def test_job_create_output_shows_the_memory_estimate():
    from llmstudio.cli.jobs import _memory_line
    from llmstudio.v1 import jobs_pb2

    job = jobs_pb2.Job(id="job-1")
    assert _memory_line(job) == ""
    job.memory_estimate.update({"weights": 2 * 1024**3, "gradients": 1024**2, "optimizer": 0,
                                "activations": 3 * 1024**3, "total": 5 * 1024**3 + 1024**2})
    line = _memory_line(job)
    assert "5.0 GiB" in line and "weights 2.0 GiB" in line and "activations 3.0 GiB" in line


def test_job_show_lists_each_attempt_and_what_it_resumed_from():
    from llmstudio.cli.jobs import _job_details
    from llmstudio.v1 import jobs_pb2

    job = jobs_pb2.Job(id="job-1", status=jobs_pb2.JOB_STATUS_RUNNING, model_name="m",
                       worker_id="w-2", attempt=2)
    job.attempts.add(attempt=1, worker_id="w-1", assigned_at="t0", started_at="t1",
                     ended_at="t2", reason="worker w-1 lost (no heartbeat for 15s)")
    job.attempts.add(attempt=2, worker_id="w-2", assigned_at="t3", started_at="t4",
                     resumed_from_step=40)
    text = _job_details(job)
    lines = text.splitlines()
    assert lines[0].startswith("job-1  running") and "worker:    w-2" in text
    assert "attempts (running at attempt 2):" in text
    assert lines[-2].split() == ["1", "w-1", "t1", "->", "t2", "worker", "w-1", "lost", "(no",
                                 "heartbeat", "for", "15s)"]
    assert lines[-1].split()[:5] == ["2", "w-2", "t4", "->", "now,"]
    assert "resumed from step 40" in lines[-1] and lines[-1].endswith("running")


def test_common_flags_work_before_and_after_the_command():
    parse = build_parser().parse_args
    assert parse(["--data-dir", "X", "--json", "jobs", "list"]).data_dir == "X"
    assert parse(["--data-dir", "X", "--json", "jobs", "list"]).json is True
    assert parse(["--api-key", "k", "up"]).api_key == "k"
    after = parse(["jobs", "list", "--data-dir", "Y", "--json"])
    assert (after.data_dir, after.json) == ("Y", True)
    assert parse(["--data-dir", "X", "jobs", "list", "--data-dir", "Y"]).data_dir == "Y"
    plain = parse(["jobs", "list"])
    assert (plain.data_dir, plain.json, plain.api_key) == (None, False, None)


def test_quota_output_names_each_limit():
    from llmstudio.cli.quotas import _quota_text
    from llmstudio.v1 import jobs_pb2

    q = jobs_pb2.Quota(tenant="acme", max_running=2, weight=3.0, updated_by="key-1",
                       updated_at="t")
    assert _quota_text(q) == ("tenant acme: running 2, queued unlimited, gpus unlimited, "
                              "cpu slots unlimited; weight 3 (set by key-1 at t)")


def test_the_progress_bar_does_not_move_back_for_a_late_sample(tmp_path):
    import io

    from llmstudio.progress import JobProgress
    from llmstudio.v1 import jobs_pb2

    running = jobs_pb2.Job(status=jobs_pb2.JOB_STATUS_RUNNING)
    bar = JobProgress(file=io.StringIO())
    for step in (1, 3, 2):
        bar.update(jobs_pb2.JobUpdate(kind="metrics", job=running, step=step,
                                      metrics={"max_steps": 5.0, "loss": 1.0}))
    assert (bar.bar.n, bar.bar.total) == (3, 5)
    bar.close()
