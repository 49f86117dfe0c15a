"""What every recipe is asked (`TrainRequest`) and what it answers (`TrainResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from llmstudio.jobspec import JobSpec


def _ignore(_: dict) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class TrainRequest:
    """One training run: the spec (its base_model is the model to load), the rows, where the
    checkpoints go; the callbacks through which the caller follows and steers the run; where
    to resume.

    on_metrics(metrics)          every `log_every` steps (rank 0 only)
    on_checkpoint(path, step)    once a checkpoint is complete on disk (rank 0 only); training
                                 waits for it (the worker uploads the checkpoint there)
    should_stop()                asked at every step boundary; True stops the run with a
                                 checkpoint of the last finished step
    """

    spec: JobSpec
    rows: list[dict]
    out_dir: Path
    _: KW_ONLY
    eval_rows: list[dict] | None = None  # the validation split (eval_every, early_stopping)
    on_metrics: Callable[[dict], None] = _ignore
    on_checkpoint: Callable[[Path, int], None] | None = None
    should_stop: Callable[[], bool] = _never
    resume_from: Path | None = None  # a checkpoint directory written by the same recipe

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.resume_from is not None:
            self.resume_from = Path(self.resume_from)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    first_loss: float
    tokens_seen: int
    adapter_dir: Path | None  # the last checkpoint written (None if no step ran)
    stopped: bool  # should_stop() asked to stop (cancel / shutdown)
    stop_reason: str = "max_steps"  # max_steps | stopped | early_stopping: <why>
    eval_loss: float | None = None  # the last evaluation's loss, if any ran
