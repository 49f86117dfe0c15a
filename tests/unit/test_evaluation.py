"""evaluate_model: loss over learned tokens + batched greedy exact match, base vs a fine-tune
(an adapter, or the full weights of a `method: full` job)."""

from __future__ import annotations

import math

import pytest

from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import CheckpointError, checkpoint_kind
from llmstudio.ml.evaluation import evaluate_model
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.recipes import TrainRequest, train

# Prompts of different lengths, so left padding matters in a batch; two chat rows too.
ROWS = [
    {"prompt": "say apple:", "completion": " apple apple"},
    {"prompt": "please say the river word:", "completion": " river"},
    {"prompt": "the stone, say it now please:", "completion": " stone cat"},
    {"messages": [{"role": "user", "content": "dog?"}, {"role": "assistant", "content": "moon"}]},
    {"messages": [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "a long question about the sun and sky"},
        {"role": "assistant", "content": "sky sun"},
    ]},
]


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # trains


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model that memorized ROWS (LoRA on every projection, high LR)."""
    model_dir = str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))
    spec = JobSpec(
        base_model=model_dir,
        dataset="unit",
        lora={"r": 16, "alpha": 32, "dropout": 0.0,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"]},
        hyperparameters={"max_steps": 40, "batch_size": 5, "learning_rate": 1e-2, "seed": 3},
    )
    result = train(TrainRequest(spec, ROWS, tmp_path_factory.mktemp("out")))
    return model_dir, str(result.adapter_dir)


@pytest.fixture(scope="module")
def full_checkpoint(trained, tmp_path_factory):
    """A `method: full` checkpoint of the same base: every weight trained on ROWS."""
    spec = JobSpec(
        base_model=trained[0], dataset="unit", method="full",
        hyperparameters={"max_steps": 6, "batch_size": 5, "learning_rate": 3e-3, "seed": 3},
    )
    return str(train(TrainRequest(spec, ROWS, tmp_path_factory.mktemp("full"))).adapter_dir)


@pytest.fixture(scope="module")
def base_report(trained):
    return evaluate_model(trained[0], ROWS, max_new_tokens=8, batch_size=4)


@pytest.fixture(scope="module")
def tuned_report(trained):
    return evaluate_model(trained[0], ROWS, checkpoint_dir=trained[1], max_new_tokens=8,
                          batch_size=4)


def test_memorized_rows_give_exact_match_one(tuned_report):
    assert tuned_report["exact_match"] == 1.0, tuned_report["examples"]
    assert tuned_report["samples"] == len(ROWS)
    ex = tuned_report["examples"]
    assert len(ex) == 5
    assert ex[0] == {"prompt": "say apple:", "reference": " apple apple",
                     "prediction": " apple apple"}
    assert ex[3]["prompt"].endswith("<|im_start|>assistant\n") and ex[3]["prediction"] == "moon"


def test_base_model_fails_and_adapter_differs(base_report, tuned_report):
    assert base_report["exact_match"] == 0.0
    assert math.isfinite(base_report["eval_loss"]) and math.isfinite(tuned_report["eval_loss"])
    assert tuned_report["eval_loss"] < base_report["eval_loss"] - 1.0
    assert tuned_report["perplexity"] == pytest.approx(math.exp(tuned_report["eval_loss"]))
    # loss counts exactly the learned tokens: completion + EOS, or assistant turn + markers
    assert base_report["loss_tokens"] == tuned_report["loss_tokens"] > len(ROWS)
    base_preds = [e["prediction"] for e in base_report["examples"]]
    tuned_preds = [e["prediction"] for e in tuned_report["examples"]]
    assert base_preds != tuned_preds


def test_batching_with_left_padding_matches_one_by_one(trained, tuned_report):
    progress = []
    single = evaluate_model(trained[0], ROWS, checkpoint_dir=trained[1], max_new_tokens=8,
                            batch_size=1, progress=lambda d, t: progress.append((d, t)))
    assert single["examples"] == tuned_report["examples"]
    assert single["eval_loss"] == pytest.approx(tuned_report["eval_loss"], rel=1e-4)
    assert progress[-1] == (2 * len(ROWS), 2 * len(ROWS))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_max_samples_limits_generation_not_loss(trained, tuned_report):
    report = evaluate_model(trained[0], ROWS, checkpoint_dir=trained[1], max_samples=2,
                            max_new_tokens=8)
    assert report["samples"] == 2 and len(report["examples"]) == 2
    assert report["loss_tokens"] == tuned_report["loss_tokens"]
    assert report["eval_loss"] == pytest.approx(tuned_report["eval_loss"], rel=1e-4)


def test_full_fine_tune_checkpoint_is_evaluated_with_its_own_weights(
    trained, full_checkpoint, base_report
):
    assert checkpoint_kind(full_checkpoint) == "full"
    report = evaluate_model(trained[0], ROWS, checkpoint_dir=full_checkpoint, max_new_tokens=8,
                            batch_size=4)
    # the trained weights, not the base's: six steps on these very rows lower their loss
    assert report["eval_loss"] < base_report["eval_loss"] - 1.0
    assert report["loss_tokens"] == base_report["loss_tokens"]  # the base's tokenizer
    assert report["samples"] == len(ROWS)


def test_a_directory_that_is_no_checkpoint_is_refused_by_name(trained, tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: neither an adapter"):
        evaluate_model(trained[0], ROWS, checkpoint_dir=str(tmp_path))
