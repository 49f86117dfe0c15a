"""Training recipes, chosen by the spec's objective from one table (as torchtune's recipes).

    train(TrainRequest(spec, rows, out_dir, ...))  ->  TrainResult

    sft.py          sft, pretrain: the trainer's own loop (data parallel, FSDP, packing,
                    evaluation and early stopping)
    preference.py   dpo, orpo: through TRL

Each recipe reads top to bottom in its own file; what they share lives beside them
(request.py, ../methods.py, ../optim.py, ../parallel.py, llmstudio.ml.checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

from . import preference, sft
from .request import TrainRequest, TrainResult

Recipe = Callable[[TrainRequest], TrainResult]

# Every JobSpec objective, and the recipe that trains it (a unit test checks the names).
RECIPES: dict[str, Recipe] = {
    "sft": sft.train,
    "pretrain": sft.train,
    "dpo": preference.train,
    "orpo": preference.train,
}


def train(request: TrainRequest) -> TrainResult:
    """Run the recipe of `request.spec.objective`."""
    return RECIPES[request.spec.objective](request)


__all__ = ["RECIPES", "Recipe", "TrainRequest", "TrainResult", "train"]
