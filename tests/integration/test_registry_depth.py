"""Registry depth end to end: the registry and governance in-process against a real nats-server,
over real gRPC, the registry reading and writing a real artifact store. Aliases (moving one is
announced and audited once), tags and descriptions, CompareVersions (metric deltas with the
evaluation's intervals, hyperparameter and dataset diffs), model cards stored as artifacts, and
DeleteVersion with retention."""

from __future__ import annotations

import json

import grpc
import pytest

from llmstudio.events import EvalCompleted, JobSucceeded
from llmstudio.v1 import governance_pb2 as gpb
from llmstudio.v1 import registry_pb2 as rpb
from tests.integration import test_promotion as promotion
from tests.integration.test_promotion import ADMIN, SHA, Stack, eventually, md, report_key

stack = promotion.stack  # governance + the registry, the tenant's keys (dev, reviewer, ...)
MODEL = promotion.MODEL


def job(job_id: str, dataset: str, hyperparameters: dict, sha: str = SHA) -> JobSucceeded:
    own = "tenants/acme"
    return JobSucceeded(
        job_id=job_id, worker_id="w1", model_name=MODEL,
        spec={"base_model": "/models/base", "method": "lora",
              "lora": {"r": 8, "alpha": 16}, "hyperparameters": hyperparameters},
        dataset_id=dataset, dataset_sha256=sha,
        dataset_artifacts={"train": f"{own}/datasets/{dataset}/train.jsonl",
                           "report": report_key(dataset)},
        checkpoint_key=f"{own}/jobs/{job_id}/ckpt", adapter_key=f"{own}/jobs/{job_id}/ckpt",
        steps=10, final_loss=0.5)


def evaluation(job_id: str, base: float, tuned: float, loss: float) -> EvalCompleted:
    return EvalCompleted(
        evaluation_id=f"ev-{job_id}", job_id=job_id, model_name=MODEL,
        base_metrics={"exact_match": base, "eval_loss": 2.0},
        tuned_metrics={"exact_match": tuned, "eval_loss": loss},
        report_key=f"tenants/acme/evaluations/ev-{job_id}/report.json")


async def two_versions(s: Stack) -> None:
    """v1 and v2 of MODEL, evaluated, trained with different hyperparameters on different
    dataset versions; v2's evaluation report carries intervals."""
    s.store.put_bytes(report_key("ds-1"), json.dumps(
        {"rows_read": 100, "pii_rows": 0, "pii_counts": {}}).encode())
    s.store.put_bytes(report_key("ds-2"), json.dumps(
        {"rows_read": 120, "pii_rows": 3, "pii_counts": {"email": 3}}).encode())
    s.store.put_bytes("tenants/acme/evaluations/ev-job-2/report.json", json.dumps(
        {"suite": "default", "comparisons": [
            {"name": "exact_match", "base": 0.1, "tuned": 0.8, "diff": 0.7, "ci_low": 0.55,
             "ci_high": 0.85}]}).encode())
    await s.bus.publish(job("job-1", "ds-1", {"max_steps": 80, "learning_rate": 2e-4}),
                        tenant="acme", actor="alice")
    await s.bus.publish(evaluation("job-1", 0.1, 0.5, 1.5), tenant="acme", actor="evaluator")
    await s.bus.publish(job("job-2", "ds-2", {"max_steps": 120, "learning_rate": 2e-4},
                            sha="6f" * 32), tenant="acme", actor="alice")
    await s.bus.publish(evaluation("job-2", 0.1, 0.8, 1.0), tenant="acme", actor="evaluator")
    dev = s.keys["dev"].secret
    for number in (1, 2):
        async def evaluated(number=number):
            v = await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=number),
                                       metadata=md(dev))
            return v if v.lineage.evaluation_id else None

        await eventually(evaluated)


async def test_aliases_move_are_audited_once_and_name_versions(stack):
    s = stack
    dev, viewer = s.keys["dev"].secret, s.keys["viewer"].secret
    await two_versions(s)

    async def set_alias(alias: str, version: int, key: str = dev) -> rpb.Model:
        return await s.reg.SetAlias(rpb.SetAliasRequest(model_name=MODEL, alias=alias,
                                                        version=version), metadata=md(key))

    model = await set_alias("champion", 1)
    assert dict(model.aliases) == {"champion": 1}
    assert [list(v.aliases) for v in model.versions] == [["champion"], []]
    await set_alias("candidate", 2)
    await set_alias("champion", 1)  # where it is: nothing moves, nothing is announced
    model = await set_alias("champion", 2)
    assert dict(model.aliases) == {"champion": 2, "candidate": 2}
    assert [list(v.aliases) for v in model.versions] == [[], ["candidate", "champion"]]

    # GetVersion by alias
    got = await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, alias="champion"),
                                 metadata=md(viewer))
    assert (got.version, list(got.aliases)) == (2, ["candidate", "champion"])

    # refused: a stage's name, a number, a bad name, a missing version, a viewer, no such alias
    for alias, version, key, code in (
            ("production", 1, dev, grpc.StatusCode.INVALID_ARGUMENT),
            ("7", 1, dev, grpc.StatusCode.INVALID_ARGUMENT),
            ("two words", 1, dev, grpc.StatusCode.INVALID_ARGUMENT),
            ("champion", 9, dev, grpc.StatusCode.NOT_FOUND),
            ("champion", 1, viewer, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await set_alias(alias, version, key)
        assert err.value.code() == code, (alias, err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, alias="nope"),
                               metadata=md(viewer))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no alias 'nope'" in err.value.details()

    model = await s.reg.DeleteAlias(rpb.DeleteAliasRequest(model_name=MODEL, alias="candidate"),
                                    metadata=md(dev))
    assert dict(model.aliases) == {"champion": 2}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.reg.DeleteAlias(rpb.DeleteAliasRequest(model_name=MODEL, alias="candidate"),
                                metadata=md(dev))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Each move appears once in the audit log (the no-op set does not), which verifies.
    moves = await eventually(lambda: promotion._n(s.audit("llmstudio.model.alias_moved"), 4))
    assert [(d["alias"], d["previous_version"], d["version"])
            for d in (json.loads(r.data_json) for r in moves)] == [
        ("champion", 0, 1), ("candidate", 0, 2), ("champion", 1, 2), ("candidate", 2, 0)]
    assert {r.actor for r in moves} == {"dev"}
    verified = await s.gov.VerifyAudit(gpb.VerifyAuditRequest(), metadata=md(ADMIN))
    assert verified.ok, verified.reason


async def test_tags_and_descriptions_on_models_and_versions(stack):
    s = stack
    dev, viewer = s.keys["dev"].secret, s.keys["viewer"].secret
    await two_versions(s)
    model = await s.reg.UpdateModel(rpb.UpdateModelRequest(
        name=MODEL, description="support replies", set_tags={"team": "nlp", "task": "qa"}),
        metadata=md(dev))
    assert (model.description, dict(model.tags)) == ("support replies", {"team": "nlp",
                                                                         "task": "qa"})
    # description unset: unchanged; a tag removed, another set
    model = await s.reg.UpdateModel(rpb.UpdateModelRequest(
        name=MODEL, set_tags={"owner": "alice"}, remove_tags=["task"]), metadata=md(dev))
    assert (model.description, dict(model.tags)) == ("support replies", {"team": "nlp",
                                                                         "owner": "alice"})
    v2 = await s.reg.UpdateVersion(rpb.UpdateVersionRequest(
        model_name=MODEL, version=2, description="longer run", set_tags={"reviewed": "yes"}),
        metadata=md(dev))
    assert (v2.description, dict(v2.tags)) == ("longer run", {"reviewed": "yes"})
    # read back, by anyone of the tenant
    listed = await s.reg.ListModels(rpb.ListModelsRequest(), metadata=md(viewer))
    [m] = listed.models
    assert (m.description, dict(m.tags)) == ("support replies", {"team": "nlp", "owner": "alice"})
    assert [(v.description, dict(v.tags)) for v in m.versions] == [
        ("", {}), ("longer run", {"reviewed": "yes"})]
    assert (await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=2),
                                   metadata=md(viewer))).tags["reviewed"] == "yes"
    for request, key, code in (
            (rpb.UpdateModelRequest(name=MODEL, set_tags={"bad key": "x"}), dev,
             grpc.StatusCode.INVALID_ARGUMENT),
            (rpb.UpdateModelRequest(name=MODEL, description="x" * 4001), dev,
             grpc.StatusCode.INVALID_ARGUMENT),
            (rpb.UpdateModelRequest(name="nope"), dev, grpc.StatusCode.NOT_FOUND),
            (rpb.UpdateModelRequest(name=MODEL, description="mine"), viewer,
             grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.reg.UpdateModel(request, metadata=md(key))
        assert err.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.reg.UpdateVersion(rpb.UpdateVersionRequest(model_name=MODEL, version=9,
                                                           description="x"), metadata=md(dev))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_compare_versions_shows_metric_deltas_intervals_and_differing_hyperparameters(
        stack):
    s = stack
    viewer = s.keys["viewer"].secret
    await two_versions(s)
    c = await s.reg.CompareVersions(rpb.CompareVersionsRequest(model_name=MODEL, a=1, b=2),
                                    metadata=md(viewer))
    assert (c.a.version, c.b.version) == (1, 2)
    metrics = {m.name: m for m in c.metrics}
    em = metrics["tuned_exact_match"]
    assert (em.a, em.b) == (0.5, 0.8) and em.delta == pytest.approx(0.3)
    # v2's evaluation report gives the interval of tuned - base; v1's report is not there
    assert not em.HasField("a_interval")
    assert (em.b_interval.low, em.b_interval.high) == (0.55, 0.85)
    loss = metrics["tuned_eval_loss"]
    assert (loss.a, loss.b, loss.delta) == (1.5, 1.0, -0.5)
    assert metrics["base_exact_match"].delta == 0.0
    # only the hyperparameters that differ, dotted, JSON-encoded
    assert [(d.key, d.a, d.b, d.same) for d in c.hyperparameters] == [
        ("max_steps", "80", "120", False)]
    dataset = {d.key: d for d in c.dataset}
    assert (dataset["dataset_id"].a, dataset["dataset_id"].b) == ('"ds-1"', '"ds-2"')
    assert not dataset["dataset_sha256"].same and dataset["base_model"].same
    assert json.loads(dataset["dataset_sha256"].b) == "6f" * 32
    for request, code in ((rpb.CompareVersionsRequest(model_name=MODEL, a=1, b=9),
                           grpc.StatusCode.NOT_FOUND),
                          (rpb.CompareVersionsRequest(model_name=MODEL, a=0, b=2),
                           grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.reg.CompareVersions(request, metadata=md(viewer))
        assert err.value.code() == code


async def test_model_card_is_generated_from_lineage_dataset_report_and_evaluation_and_stored(
        stack):
    import hashlib

    s = stack
    dev, viewer = s.keys["dev"].secret, s.keys["viewer"].secret
    await two_versions(s)
    await s.reg.SetAlias(rpb.SetAliasRequest(model_name=MODEL, alias="candidate", version=2),
                         metadata=md(dev))
    await s.reg.UpdateVersion(rpb.UpdateVersionRequest(
        model_name=MODEL, version=2, description="Longer run on ds-2.",
        set_tags={"owner": "alice"}), metadata=md(dev))
    card = await s.reg.GetModelCard(rpb.GetModelCardRequest(model_name=MODEL, version=2),
                                    metadata=md(viewer))
    text = card.markdown
    assert card.artifact_key == f"tenants/acme/models/{MODEL}/v2/MODEL_CARD.md"
    assert text.startswith("---\n") and f"# {MODEL} v2" in text
    assert "Longer run on ds-2." in text and '"owner=alice"' in text
    assert "| aliases | candidate |" in text and "| stage | development |" in text
    assert f"| dataset sha256 | {'6f' * 32} |" in text and "| dataset | ds-2 |" in text
    assert "| max_steps | 120 |" in text and "| lora.r | 8 |" in text
    assert "| pii rows | 3 |" in text and "| pii by kind | email 3 |" in text
    assert "**3 training row(s) hold unredacted PII.**" in text
    assert "| exact_match | 0.1 | 0.8 | 0.7 | [0.55, 0.85] |" in text
    assert "| tuned_eval_loss | 1 |" in text
    # stored as an artifact of the tenant, named in the version's artifacts
    stored = s.store.get_bytes(card.artifact_key)
    assert stored == text.encode() and hashlib.sha256(stored).hexdigest() == card.sha256
    v2 = await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=2),
                                metadata=md(viewer))
    assert v2.artifacts["model_card"] == card.artifact_key
    # v1: no evaluation report readable, a clean dataset
    v1_card = (await s.reg.GetModelCard(rpb.GetModelCardRequest(model_name=MODEL, version=1),
                                        metadata=md(viewer))).markdown
    assert "| pii rows | 0 |" in v1_card and "Base vs tuned" not in v1_card
    assert "| max_steps | 80 |" in v1_card
    # the card follows the registry: moving the alias rewrites it
    await s.reg.SetAlias(rpb.SetAliasRequest(model_name=MODEL, alias="candidate", version=1),
                         metadata=md(dev))
    again = await s.reg.GetModelCard(rpb.GetModelCardRequest(model_name=MODEL, version=2),
                                     metadata=md(viewer))
    assert "| aliases |" not in again.markdown and again.sha256 != card.sha256
    assert s.store.get_bytes(card.artifact_key) == again.markdown.encode()


async def test_delete_refuses_production_and_aliased_versions_and_keeps_the_audit(stack):
    s = stack
    dev, reviewer = s.keys["dev"].secret, s.keys["reviewer"].secret
    await two_versions(s)
    # v1 to production through the default policy (staging, then a reviewer's approval)
    await s.set_stage(1, rpb.STAGE_STAGING, dev)
    pending = await s.request(1, rpb.STAGE_PRODUCTION, dev)
    await s.decided(pending.request_id, "pending_approval")
    await s.gov.Approve(gpb.ApproveRequest(request_id=pending.request_id), metadata=md(reviewer))
    await eventually(lambda: promotion._equals(s.stage_of(1), rpb.STAGE_PRODUCTION))
    await s.reg.SetAlias(rpb.SetAliasRequest(model_name=MODEL, alias="candidate", version=2),
                         metadata=md(dev))

    async def delete(version: int, key: str = dev) -> rpb.ModelVersion:
        return await s.reg.DeleteVersion(rpb.DeleteVersionRequest(
            model_name=MODEL, version=version, reason="superseded"), metadata=md(key))

    for version, key, code, words in (
            (1, dev, grpc.StatusCode.FAILED_PRECONDITION, "is in production"),
            (2, dev, grpc.StatusCode.FAILED_PRECONDITION, "alias(es) candidate"),
            (2, s.keys["viewer"].secret, grpc.StatusCode.PERMISSION_DENIED, ""),
            (9, dev, grpc.StatusCode.NOT_FOUND, "")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await delete(version, key)
        assert err.value.code() == code and words in err.value.details()
    await s.reg.DeleteAlias(rpb.DeleteAliasRequest(model_name=MODEL, alias="candidate"),
                            metadata=md(dev))
    deleted = await delete(2)
    assert deleted.version == 2 and deleted.deleted_at.endswith("Z")

    # hidden: from the model, the lists, reads, "latest", comparisons and aliases
    model = await s.reg.GetModel(rpb.GetModelRequest(name=MODEL), metadata=md(dev))
    assert [v.version for v in model.versions] == [1]
    [listed] = (await s.reg.ListModels(rpb.ListModelsRequest(), metadata=md(dev))).models
    assert [v.version for v in listed.versions] == [1]
    assert (await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL),
                                   metadata=md(dev))).version == 1
    for call in (s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=2),
                                  metadata=md(dev)),
                 s.reg.SetAlias(rpb.SetAliasRequest(model_name=MODEL, alias="champion",
                                                    version=2), metadata=md(dev)),
                 s.reg.CompareVersions(rpb.CompareVersionsRequest(model_name=MODEL, a=1, b=2),
                                       metadata=md(dev)),
                 delete(2)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a new job's version takes a new number: 2 is never reused
    await s.bus.publish(job("job-3", "ds-1", {"max_steps": 80}), tenant="acme", actor="alice")

    async def v3():
        return await s.reg.GetVersion(rpb.GetVersionRequest(model_name=MODEL, version=3),
                                      metadata=md(dev))

    assert (await eventually(v3)).lineage.job_id == "job-3"
    # the deletion is announced once and audited (with its reason), the row kept in the store
    [record] = await eventually(lambda: promotion._n(
        s.audit("llmstudio.model.version_deleted"), 1))
    assert json.loads(record.data_json)["reason"] == "superseded" and record.actor == "dev"
    verified = await s.gov.VerifyAudit(gpb.VerifyAuditRequest(), metadata=md(ADMIN))
    assert verified.ok, verified.reason


async def test_a_deleted_version_keeps_its_row_and_a_redelivered_job_does_not_revive_it(db_url):
    from llmstudio.outbox import Outbox
    from services.registry import store as tables
    from services.registry.store import RegistryStore
    from services.registry.usecases import Registry
    from tests.integration.test_registry_service import FlakyBus, job_completed
    from tests.support.migrations import rows_of

    store = RegistryStore(db_url)
    store.migrate()
    try:
        registry = Registry(store, Outbox(store, FlakyBus(), defer_failures=True))
        await registry.register_job("acme", "alice", job_completed("job-1"))
        gone = await registry.delete_version("acme", "alice", "smol-lora", 1, "bad data")
        [row] = rows_of(store, tables.versions)
        assert (row["version"], row["deleted_at"], row["deleted_by"]) == (
            1, gone.deleted_at, "alice")
        assert row["lineage"]["job_id"] == "job-1"  # the record is kept whole
        again = await registry.register_job("acme", "alice", job_completed("job-1"))
        assert again.version == 1 and len(rows_of(store, tables.versions)) == 1
        assert (await registry.get_model("acme", "smol-lora")).versions == []
        with store.unit() as u:
            assert [p.subject for p in u.pending_events()][-1] == (
                "llmstudio.model.version_deleted.smol-lora-v1")
    finally:
        store.dispose()


async def test_cli_aliases_tags_compares_cards_and_deletes(stack, tmp_path, monkeypatch, capsys):
    import asyncio

    from llmstudio.cli import main

    s = stack
    monkeypatch.setenv("LLMSTUDIO_GOVERNANCE_ADDR", s.gov_addr)
    monkeypatch.setenv("LLMSTUDIO_REGISTRY_ADDR", s.reg_addr)
    empty = tmp_path / "no-stack"
    empty.mkdir()
    dev = s.keys["dev"].secret
    await two_versions(s)

    async def cli(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*argv, "--data-dir", str(empty), "--api-key", dev])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = await cli("models", "alias", f"{MODEL}@1", "champion")
    assert (code, out) == (0, f"{MODEL}@champion -> v1\n  aliases: champion=v1\n")
    code, out = await cli("models", "alias", f"{MODEL}@1", "production")
    assert code == 1 and "INVALID_ARGUMENT" in out and "reserved" in out
    code, out = await cli("models", "tag", f"{MODEL}@champion", "reviewed=yes", "team=nlp")
    assert (code, out) == (0, f"{MODEL}@1  reviewed=yes team=nlp\n")
    code, out = await cli("models", "tag", MODEL, "owner=alice")
    assert (code, out) == (0, f"{MODEL}  owner=alice\n")
    code, out = await cli("models", "describe", f"{MODEL}@2", "the longer run")
    assert (code, out) == (0, f"{MODEL}@2: the longer run\n")

    code, out = await cli("models", "compare", f"{MODEL}@champion", f"{MODEL}@2")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"{MODEL}: v1 vs v2"
    [em] = [line.split() for line in lines if line.strip().startswith("tuned_exact_match ")]
    assert em == ["tuned_exact_match", "0.5", "0.8", "+0.3", "[0.55,", "0.85]"]
    [steps] = [line.split() for line in lines if line.strip().startswith("max_steps ")]
    assert steps == ["max_steps", "80", "120"]
    [ds] = [line.split() for line in lines if line.strip().startswith("dataset_id ")]
    assert ds == ["dataset_id", "ds-1", "ds-2", "DIFFERS"]
    code, out = await cli("models", "compare", f"{MODEL}@1", f"{MODEL}@2", "--json")
    data = json.loads(out)
    assert code == 0 and [h["key"] for h in data["hyperparameters"]] == ["max_steps"]

    card = tmp_path / "card.md"
    code, out = await cli("models", "card", f"{MODEL}@2", "--out", str(card))
    assert code == 0 and out.strip() == (
        f"{card} (tenants/acme/models/{MODEL}/v2/MODEL_CARD.md)")
    assert card.read_text().startswith("---\n") and "the longer run" in card.read_text()

    code, out = await cli("models", "delete", f"{MODEL}@1")
    assert code == 1 and "FAILED_PRECONDITION" in out and "champion" in out
    code, out = await cli("models", "alias", MODEL, "champion", "--delete")
    assert (code, out) == (0, f"{MODEL}@champion removed\n  aliases: none\n")
    code, out = await cli("models", "delete", f"{MODEL}@1", "--reason", "superseded")
    assert code == 0 and out.startswith(f"{MODEL}@1 deleted")
    code, out = await cli("models", "list")
    assert code == 0 and f"{MODEL}@1 " not in out and f"{MODEL}@2 " in out
