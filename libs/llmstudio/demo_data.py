"""The demo task: reverse the order of a few words. No torch here (the CLI and dataset use it).

    prompt:     "Reverse the order of the words: apple river stone\\nAnswer:"
    completion: " stone river apple"

SmolLM2-135M-Instruct cannot do it zero-shot: as a raw-text completion it never stops after
the reversed words and rarely reverses them correctly (exact match ~0%). The format is tiny and
perfectly regular, so a LoRA adapter learns it (and to emit EOS right after) in ~80 steps.
"""

from __future__ import annotations

import random
from typing import Any

# ~100 common short English words, each a single lowercase word.
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "house", "green", "water", "light", "table", "chair", "bread",
    "cloud", "music", "paper", "plant", "smile", "train", "horse", "night", "ocean", "sugar",
    "tiger", "lemon", "grass", "earth", "money", "heart", "glass", "dream", "field", "storm",
    "bird", "fish", "tree", "book", "door", "hand", "moon", "star", "rain", "snow",
    "fire", "wind", "road", "ship", "milk", "salt", "gold", "blue", "red", "cat",
    "dog", "sun", "sky", "sea", "hat", "cup", "pen", "box", "car", "bus",
    "egg", "key", "map", "bed", "ice", "owl", "bee", "ant", "fox", "cow",
    "king", "lamp", "leaf", "lake", "hill", "song", "game", "ring", "coat", "shoe",
    "bell", "nest", "rock", "sand", "wolf", "bear", "duck", "frog", "rose", "seed",
    "corn", "rice", "soup", "cake", "wall", "roof", "city", "town", "farm", "park",
)

PROMPT_PREFIX = "Reverse the order of the words: "
ANSWER_MARKER = "\nAnswer:"


def reversal_row(words: list[str]) -> dict[str, str]:
    """One prompt/completion row for `words`."""
    return {
        "prompt": f"{PROMPT_PREFIX}{' '.join(words)}{ANSWER_MARKER}",
        "completion": " " + " ".join(reversed(words)),
    }


def word_reversal_rows(n: int, seed: int, *, min_words: int = 3, max_words: int = 5) -> list[dict]:
    """`n` deterministic rows of the word-reversal task (distinct words within a row)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_words <= max_words <= len(WORDS):
        raise ValueError(f"need 1 <= min_words <= max_words <= {len(WORDS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        rows.append(reversal_row(rng.sample(WORDS, k)))
    return rows


# Measured with SmolLM2-135M-Instruct, fp32, torch 2.13 CPU, 2 threads, 640 train rows (seed 1),
# 40 validation rows (seed 1001): exact match 0.0 -> 1.0, eval loss 5.03 -> 0.006; train loss
# below 0.1 from about step 30. Attention-only LoRA, no dropout. Change these together with a
# new measurement.
DEMO_LORA: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
DEMO_HYPERPARAMETERS: dict[str, Any] = {
    "max_steps": 80,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 5,
    "weight_decay": 0.0,
    "max_seq_length": 64,
    "seed": 42,
    "log_every": 1,
    "checkpoint_every": 40,
}
DEMO_EVAL: dict[str, Any] = {"max_samples": 40, "max_new_tokens": 16}
DEMO_TRAIN_ROWS = 640
DEMO_VALIDATION_ROWS = 40


def demo_job_spec(model_dir: str, dataset_id: str, **overrides: Any) -> dict:
    """A JobSpec dict (validate with `JobSpec.model_validate`) for the word-reversal demo.

    `overrides` replace top-level keys (e.g. name=..., hyperparameters={...}).
    """
    spec: dict[str, Any] = {
        "base_model": model_dir,
        "dataset": dataset_id,
        "method": "lora",
        "lora": dict(DEMO_LORA),
        "hyperparameters": dict(DEMO_HYPERPARAMETERS),
        "eval": dict(DEMO_EVAL),
    }
    spec.update(overrides)
    return spec
