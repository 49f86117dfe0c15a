"""Model folders for tests that need a base_model the scheduler accepts but never trains."""

from __future__ import annotations

import json
from pathlib import Path

# A small Llama's shape: enough for the memory estimate and the hardware checks.
SMALL_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256,
    "max_position_embeddings": 128,
}


def config_only_model(directory: Path, config: dict | None = None) -> Path:
    """`directory` holding only a config.json (SMALL_LLAMA unless `config`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(SMALL_LLAMA if config is None else config))
    return directory
