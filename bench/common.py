"""Writing a benchmark's numbers: bench/results/<name>.json with value, baseline and ratio."""

from __future__ import annotations

import json
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, *, value: float, baseline: float, unit: str, **extra) -> dict:
    result = {
        "name": name, "value": value, "baseline": baseline, "ratio": value / baseline,
        "unit": unit, "machine": platform.platform(), **extra,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result
