"""`make run`'s path (`llmstudio demo`) on the embedded stack with the tiny local model: trained,
evaluated, registered, promoted to production through a request and a reviewer's approval,
deployed and asked through the OpenAI-compatible API, the audit chain verified and the promoted
version's lineage read. SmolLM2 takes minutes; the tiny model seconds, on the same code."""

from __future__ import annotations

import pytest

from llmstudio.demo import run_demo

pytestmark = pytest.mark.slow


def test_the_demo_promotes_through_an_approval_serves_and_shows_its_lineage(tmp_path):
    report = run_demo(tmp_path / "demo", base="tiny", quiet=True)
    assert report["ok"], report.get("error")
    promotion = report["promotion"]
    assert promotion["status"] == "approved" and promotion["approver"].startswith("key-")
    assert report["version"]["stage"] == "STAGE_PRODUCTION"
    served = report["served"]
    assert served["endpoint"].endswith("/v1") and served["version"] == "v1"
    assert isinstance(served["answer"], str)
    kinds = {node["kind"] for node in report["lineage"]["nodes"]}
    assert {"dataset", "job", "evaluation", "version", "promotion_request"} <= kinds, kinds
    text = str(report["lineage"])
    assert report["dataset"]["sha256"] in text and promotion["approver"] in text
