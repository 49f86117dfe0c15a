"""Data parallel: 2 CPU processes (gloo) match one process at the same global batch size, with
DDP and with FSDP (sharded parameters, gradients and optimizer state); FSDP checkpoints hold
the full state, and resume. The runs are compared as floating point allows (`divergence`), and
a run with a rank's gradients dropped is shown to fail that comparison."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import OPTIMIZER_FILE
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.distributed import train_distributed
from services.trainer.methods import load_for_training, save_trainable
from services.trainer.recipes import TrainRequest, TrainResult
from tests.support.compare import relative_error, relative_errors
from tests.support.rank_faults import DropsGradientsOfItsRank

ROWS = [
    {"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
    for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree", "bird")
]
LR, STEPS = 1e-2, 4
ADAPTER, FULL = "adapter_model.safetensors", "model.safetensors"

# How far apart two runs that differ only in the order of their sums (the ranks' all-reduce,
# the sharded optimizer) may end, relative by norm. fp32 rounds each operation to 2^-24 ≈ 6e-8,
# so gradients agree to ~1e-6 by norm. AdamW then steps each coordinate by lr·m̂/(√v̂ + eps),
# dividing out its scale: a coordinate whose gradient is a near-cancelling sum (or ~eps) still
# steps by up to lr, with its rounding noise amplified up to lr/eps; one weight of 8,192 was
# seen 2.3e-5 (2e-3·lr) apart. By norm such a weight counts against the whole update, which is
# ~lr·steps·√N (N = 64 to 32,768 per tensor here): even ~1,000 weights that far apart stay
# under 1e-3. The moments m, v average gradients (squared): the same ~1e-6. The loss moves by
# ∇L·(Δa − Δb), at most 1e-3 of what training moved it: the same bound. (Seen: ~1e-6 for LoRA,
# ~1e-5 for the full fine-tune.) A real sharding bug (a rank's gradient lost, a shard not
# reduced) changes most coordinates' steps by ~lr: an error of order 1 (seen 0.85, by
# `test_a_dropped_rank_gradient_fails_the_comparison`).
RTOL = 1e-3


class Run(NamedTuple):
    result: TrainResult
    metrics: list[dict]
    checkpoints: list[int]


def make_spec(
    model_dir: str, *, processes: int, batch_size: int, strategy: str = "ddp", method: str = "lora"
) -> JobSpec:
    return JobSpec(
        base_model=model_dir, dataset="unit", method=method,
        lora={"r": 8, "alpha": 16, "dropout": 0.0},  # dropout masks differ per rank otherwise
        hyperparameters={"max_steps": STEPS, "batch_size": batch_size, "learning_rate": LR,
                         "seed": 5, "log_every": 1, "checkpoint_every": 2,
                         "gradient_accumulation_steps": 2},
        distributed={"num_processes": processes, "strategy": strategy},
    )


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def train(spec: JobSpec, out, rows: list[dict] = ROWS, **kwargs) -> Run:
    metrics, ckpts = [], []
    result = train_distributed(TrainRequest(
        spec, rows, out, on_metrics=metrics.append, on_checkpoint=lambda p, s: ckpts.append(s),
        **kwargs,
    ))
    return Run(result, metrics, ckpts)


def initial_weights(spec: JobSpec, out) -> dict[str, torch.Tensor]:
    """The trainable weights a run of `spec` starts from, re-created as the recipe does (torch
    seeded with the spec's seed, then the model loaded), in its checkpoint's layout."""
    torch.manual_seed(spec.hyperparameters.seed)
    prepared = load_for_training(spec, spec.base_model, torch.device("cpu"))
    save_trainable(prepared, out)
    return load_file(str(out / (ADAPTER if prepared.is_adapter else FULL)))


def divergence(a: Run, b: Run, init: dict[str, torch.Tensor], file: str = ADAPTER
               ) -> dict[str, float]:
    """Relative errors by norm of run `a` against run `b`: the weight updates (trained − init)
    per tensor (`update/<name>`) and as one vector (`update`), the same for the optimizer's
    moments (`exp_avg`, `exp_avg_sq`), and the worst step's loss (`loss`)."""
    a_dir, b_dir = a.result.adapter_dir, b.result.adapter_dir
    a_w, b_w = load_file(str(a_dir / file)), load_file(str(b_dir / file))
    assert sorted(a_w) == sorted(b_w) == sorted(init)
    # init is re-created, not read from the run: AdamW moves a coordinate by at most ~lr per
    # step (bias-corrected |m̂/√v̂| ≤ 1.01 for t ≤ 4, by Cauchy-Schwarz), so a larger update
    # means the init is not the run's and the errors below would be divided by garbage
    largest = max(float((b_w[k] - init[k]).abs().max()) for k in init)
    assert 0 < largest <= 1.1 * LR * STEPS, largest
    errors = relative_errors({k: a_w[k] - init[k] for k in init},
                             {k: b_w[k] - init[k] for k in init}, "update")

    a_opt, b_opt = load_file(str(a_dir / OPTIMIZER_FILE)), load_file(str(b_dir / OPTIMIZER_FILE))
    assert sorted(a_opt) == sorted(b_opt)
    for moment in ("exp_avg", "exp_avg_sq"):
        keys = [k for k in b_opt if k.endswith(f"/{moment}")]
        assert len(keys) == len(init), moment
        errors |= relative_errors({k: a_opt[k] for k in keys}, {k: b_opt[k] for k in keys},
                                  moment)
    for k in (k for k in b_opt if k.endswith("/step")):
        assert torch.equal(a_opt[k], b_opt[k]), k

    assert [m["step"] for m in a.metrics] == [m["step"] for m in b.metrics]
    errors["loss"] = max(relative_error(torch.tensor(x["loss"]), torch.tensor(y["loss"]))
                         for x, y in zip(a.metrics, b.metrics, strict=True))
    return errors


def assert_same_training(a: Run, b: Run, init: dict[str, torch.Tensor], file: str = ADAPTER):
    """`a` and `b` trained the same, up to the rounding noise RTOL allows."""
    errors = divergence(a, b, init, file)
    beyond = sorted(((e, k) for k, e in errors.items() if not e <= RTOL), reverse=True)
    assert not beyond, f"relative errors by norm above {RTOL}: {beyond[:8]}"


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory) -> Run:
    """The reference: one process, batch size 4 (the global batch of 2 processes x 2)."""
    return train(make_spec(model_dir, processes=1, batch_size=4), tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="module")
def lora_init(model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    return initial_weights(make_spec(model_dir, processes=1, batch_size=4),
                           tmp_path_factory.mktemp("init"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(single, lora_init, model_dir, strategy,
                                                          tmp_path):
    two = train(make_spec(model_dir, processes=2, batch_size=2, strategy=strategy),
                tmp_path / strategy)
    assert two.result.steps == single.result.steps == STEPS
    assert single.checkpoints == two.checkpoints == [2, 4]  # rank 0 alone reports (and writes)
    assert [m["step"] for m in two.metrics] == [1, 2, 3, 4]  # rank 0 alone reports metrics
    assert [m["epoch"] for m in single.metrics] == [m["epoch"] for m in two.metrics]
    assert two.metrics[-1]["loss"] < two.metrics[0]["loss"]
    assert two.result.tokens_seen == single.result.tokens_seen
    # full (unsharded) weights and optimizer state, as one process writes them
    assert_same_training(two, single, lora_init)
    assert sorted(p.name for p in (tmp_path / strategy).iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


@pytest.mark.slow
def test_a_dropped_rank_gradient_fails_the_comparison(single, lora_init, model_dir, tmp_path):
    """The comparison is tight enough for a real sharding bug: rank 1's gradients zeroed
    before FSDP reduces them (tests.support.rank_faults) leave every loss plausible but put
    the updates an error of order 1 (not RTOL) away from the one-process run's."""
    rows = [DropsGradientsOfItsRank(ROWS[0]), *ROWS[1:]]
    buggy = train(make_spec(model_dir, processes=2, batch_size=2, strategy="fsdp"),
                  tmp_path / "buggy", rows)
    assert buggy.metrics[-1]["loss"] < buggy.metrics[0]["loss"]  # it still trains
    errors = divergence(buggy, single, lora_init)
    assert errors["update"] > 100 * RTOL and errors["exp_avg_sq"] > 100 * RTOL, errors
    with pytest.raises(AssertionError, match="relative errors by norm above"):
        assert_same_training(buggy, single, lora_init)


@pytest.mark.slow
def test_fsdp_resumes_its_checkpoint(single, lora_init, model_dir, tmp_path):
    """An FSDP run resumed from a single process's step-2 checkpoint ends where the single
    process did: the checkpoint format is the same, and the full optimizer state is sharded
    back (a wrong moment would show in the moments and the step-3 and step-4 losses)."""
    spec = make_spec(model_dir, processes=2, batch_size=2, strategy="fsdp")
    resumed = train(spec, tmp_path / "resumed",
                    resume_from=single.result.adapter_dir.parent / "checkpoint-2")
    assert resumed.result.steps == STEPS and resumed.checkpoints == [4]
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    assert_same_training(resumed, single._replace(metrics=single.metrics[2:]), lora_init)


@pytest.mark.slow
def test_fsdp_full_fine_tune_matches_one_process(model_dir, tmp_path):
    """Full fine-tune: every weight sharded (embeddings and the tied output head in the root
    group); the checkpoint holds the whole model, unsharded."""
    specs = {name: make_spec(model_dir, processes=n, batch_size=4 // n, strategy=strategy,
                             method="full")
             for name, n, strategy in (("one", 1, "ddp"), ("fsdp", 2, "fsdp"))}
    one, two = (train(spec, tmp_path / name) for name, spec in specs.items())
    init = initial_weights(specs["one"], tmp_path / "init")
    assert_same_training(two, one, init, FULL)


@pytest.mark.parametrize("method", ["qlora", "lora_8bit", "adalora", "prompt_tuning"])
def test_fsdp_refuses_methods_it_does_not_shard(method):
    with pytest.raises(ValueError, match=f"fsdp does not support method {method}; use ddp"):
        make_spec("unused", processes=2, batch_size=2, strategy="fsdp", method=method)


def test_fsdp_refuses_8bit_optimizers():
    spec = make_spec("unused", processes=2, batch_size=2).model_dump()
    spec["distributed"]["strategy"] = "fsdp"
    spec["hyperparameters"]["optimizer"] = "adamw_8bit"
    with pytest.raises(ValueError, match="fsdp does not support optimizer adamw_8bit"):
        JobSpec.model_validate(spec)
