"""Task files: parsing with errors naming file, line and field; custom scoring (exact / contains /
regex); a multiple-choice file scored on a tiny model by log-likelihood, checked against the
log-likelihoods computed by hand from the model's logits; per-row loss statistics that add up
to eval_loss."""

from __future__ import annotations

import json

import pytest
import torch

from llmstudio.ml.evaluation import choice_logliks, evaluate_model, load_for_inference
from llmstudio.ml.metrics import METRICS, Outputs
from llmstudio.ml.tasks import (
    GENERATE,
    MULTIPLE_CHOICE,
    TaskFileError,
    choose,
    parse_task_file,
    score_output,
)
from llmstudio.ml.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def jsonl(*rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


MC = [
    {"query": "the cat sat on the", "choices": ["mat", "sky is blue today"], "gold": 0},
    {"context": "water is", "choices": ["wet", "dry", "a long word list"], "gold": 1},
    {"query": "one two", "choices": ["three", "four"], "gold": 1},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def test_custom_scoring():
    assert score_output("exact", " apple \n", "apple") == 1.0
    assert score_output("exact", "apple pie", "apple") == 0.0
    assert score_output("contains", "I like apple pie", " apple ") == 1.0
    assert score_output("contains", "I like pears", "apple") == 0.0
    assert score_output("regex", "the answer is 42.", r"\b4\d\b") == 1.0
    assert score_output("regex", "the answer is 52.", r"\b4\d\b") == 0.0


def test_parse_task_files_and_errors_name_the_line_and_field():
    t = parse_task_file("qa", jsonl({"input": "a?", "expected": "b"}), "qa.jsonl", "contains")
    assert (t.kind, t.scoring, t.metric_names()) == (GENERATE, "contains", ("qa/score",))
    mc = parse_task_file("mc", jsonl(*MC), "mc.jsonl")
    assert mc.kind == MULTIPLE_CHOICE and mc.metric_names() == ("mc/acc", "mc/acc_norm")
    assert mc.rows[1]["query"] == "water is"  # "context" is accepted as the query
    with pytest.raises(TaskFileError, match=r"qa.jsonl, line 2: field 'expected' must be a str"):
        parse_task_file("qa", jsonl({"input": "a", "expected": "b"}, {"input": "a"}), "qa.jsonl")
    with pytest.raises(TaskFileError, match=r"line 1: field 'expected' is not a valid regex"):
        parse_task_file("qa", jsonl({"input": "a", "expected": "("}), "qa.jsonl", "regex")
    with pytest.raises(TaskFileError, match=r"mc.jsonl, line 2: field 'gold' must be an index"):
        parse_task_file("mc", jsonl(MC[0], {**MC[1], "gold": 3}), "mc.jsonl")
    with pytest.raises(TaskFileError, match=r"line 1: invalid JSON"):
        parse_task_file("mc", b"{nope", "mc.jsonl")
    with pytest.raises(TaskFileError, match="task name"):
        parse_task_file("../x", jsonl(*MC), "mc.jsonl")
    with pytest.raises(TaskFileError, match="scored by log-likelihood"):
        parse_task_file("mc", jsonl(*MC), "mc.jsonl", "regex")
    with pytest.raises(TaskFileError, match="no rows"):
        parse_task_file("mc", b"\n", "mc.jsonl")


def test_choose_normalises_by_characters():
    # "a long word list" loses on total log-likelihood but wins per character
    assert choose([-2.0, -8.0], ["ab", "a long word list"]) == (0, 1)
    assert choose([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties: the first


@torch.no_grad()
def test_multiple_choice_task_scores_a_tiny_model(tiny):
    task = parse_task_file("mc", jsonl(*MC), "mc.jsonl")
    rows = [{"prompt": "say apple:", "completion": " apple"}, {"text": "the cat sat"}]
    result = evaluate_model(tiny, rows, tasks=[task], max_new_tokens=4)

    # the expected answers, from the model's own logits, one full sequence at a time
    model, tokenizer, device = load_for_inference(tiny)
    want_acc, want_norm = [], []
    for row in task.rows:
        ctx = tokenizer(row["query"])["input_ids"]
        assert ctx[0] == tokenizer.bos_token_id
        lls = []
        for choice in row["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            lls.append(sum(float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont)))
        got = choice_logliks(model, tokenizer, device, row["query"], row["choices"])
        assert got == pytest.approx(lls, rel=1e-4, abs=1e-4)  # padded batch vs one at a time
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i]))
        want_acc.append(float(best == row["gold"]))
        want_norm.append(float(best_norm == row["gold"]))
    assert result["task_scores"] == {"mc/acc": want_acc, "mc/acc_norm": want_norm}


def test_custom_task_and_per_row_loss_statistics(tiny):
    task = parse_task_file("qa", jsonl({"input": "say apple:", "expected": ""},
                                       {"input": "hello", "expected": "zzzz-never"}),
                           "qa.jsonl", "contains")
    rows = [{"prompt": "say apple:", "completion": " apple"},
            {"prompt": "a much longer prompt with more words:", "completion": " the end"},
            {"text": "the cat sat on the mat"}]
    result = evaluate_model(tiny, rows, tasks=[task], max_new_tokens=4, batch_size=2)
    # "" is contained in any output; a random tiny model never writes "zzzz-never"
    assert result["task_scores"] == {"qa/score": [1.0, 0.0]}
    out = result["outputs"]
    assert len(out["loss_sums"]) == 3 and out["loss_tokens"][2] > 0
    assert len(out["predictions"]) == 2 == len(result["outputs"]["references"])
    stats = Outputs(**out)
    assert METRICS["eval_loss"].compute(stats) == pytest.approx(result["eval_loss"], rel=1e-12)
    assert METRICS["exact_match"].compute(stats) == result["exact_match"]
