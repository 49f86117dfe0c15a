"""Token lengths and previews with a base model's tokenizer, exactly as the trainer encodes rows
(`llmstudio.ml.data.encode_example`: chat template, loss masks). Imported only when a request
names a base model: transformers and torch stay out of the service's memory otherwise."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmstudio.errors import FailedPrecondition, InvalidArgument

NO_TRUNCATION = 1 << 30


def load_tokenizer(base_model: str):
    """The tokenizer of a local model directory, or of a hub id where there is network."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FailedPrecondition("base_model: token statistics and previews need transformers "
                                 "in the dataset service (install llm-studio[train])") from None

    local = Path(base_model).is_dir()
    try:
        return AutoTokenizer.from_pretrained(base_model, local_files_only=local)
    except (OSError, ValueError) as e:
        raise InvalidArgument("base_model", f"cannot load a tokenizer from {base_model!r}: "
                                            f"{str(e).splitlines()[0]}") from None


def token_counter(tokenizer) -> Callable[[dict], int]:
    from llmstudio.ml.data import encode_example

    def count(row: dict) -> int:
        with _rows_the_tokenizer_cannot_encode():
            return len(encode_example(tokenizer, row, NO_TRUNCATION)["input_ids"])

    return count


@contextmanager
def _rows_the_tokenizer_cannot_encode():
    """A row the base model's tokenizer cannot encode (no chat template, a template error) is
    the base model's problem: INVALID_ARGUMENT naming it, not an internal error."""
    from jinja2 import TemplateError

    from llmstudio.ml.data import RowError

    try:
        yield
    except (RowError, TemplateError) as e:
        raise InvalidArgument(
            "base_model", f"its tokenizer cannot encode these rows: {e}") from None


def _learned_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The learned tokens' text, one contiguous run per line (e.g. one per assistant turn)."""
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return "\n".join(tokenizer.decode(run) for run in runs)


def preview_row(tokenizer, row: dict, max_length: int) -> dict[str, Any]:
    from llmstudio.ml.data import encode_example

    with _rows_the_tokenizer_cannot_encode():
        full = encode_example(tokenizer, row, NO_TRUNCATION)["input_ids"]
        example = encode_example(tokenizer, row, max_length)
    ids, labels = example["input_ids"], example["labels"]
    return {
        "rendered": tokenizer.decode(ids),
        "learned": _learned_text(tokenizer, ids, labels),
        "num_tokens": len(ids),
        "learned_tokens": sum(1 for label in labels if label != -100),
        "truncated": len(full) > max_length,
    }
