"""The per-request pieces of the serving engine's decode loop: sampling parameters, streamed
chunks, incremental detokenization with stop strings, and next-token selection.

No model, no asyncio here: llmstudio's serving engine (services.serving.engine) drives these from
its worker thread, one `RowState` per request in a batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to
CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one (leading-space tokenizers)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a generation. `token_ids` are the tokens generated since the last
    chunk (the EOS token included, as vLLM counts it); `text` is their new text, decoded
    incrementally (never a broken UTF-8 sequence, never a stop string or what follows it)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" on the last chunk, else None
    prompt_tokens: int = 0  # set on the last chunk (usage)
    completion_tokens: int = 0


class Overloaded(Exception):
    """The engine's bounded queue is full: retry later (HTTP 429 / RESOURCE_EXHAUSTED)."""


class IncrementalDecoder:
    """Text of a growing token sequence, piece by piece, as `tokenizer.decode` of the whole would
    give it: each piece is the decode of a window (a few earlier tokens for context, then the new
    ones) minus the decode of its context, held back while it ends in an incomplete UTF-8
    character (the offsets scheme of TGI and vLLM, O(1) tokens decoded per step)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int, *, final: bool = False) -> str:
        if token_id >= 0:
            self.ids.append(token_id)
        return self._piece(final)

    def flush(self) -> str:
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


@dataclass
class StopMatcher:
    """Finds the first stop string in a growing text; says how much of the text is safe to
    stream (not possibly the start of a stop string)."""

    stop: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    stopped: bool = False

    def feed(self, piece: str, *, final: bool = False) -> str:
        """Add `piece`; return the text that can be streamed now. After a stop string is found,
        `stopped` is True and the returned text ends before it."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                out = self.text[self.emitted : end] if end > self.emitted else ""
                self.emitted = max(self.emitted, end)
                self.text = self.text[:end]
                return out
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the unstreamed text that begins a stop string."""
        tail = self.text[self.emitted :]
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best


@dataclass
class RowState:
    """One request's progress in a running batch (worker thread only)."""

    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    decoder: IncrementalDecoder
    matcher: StopMatcher
    max_new: int
    generator: torch.Generator | None = None
    generated: int = 0
    unsent: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def create(cls, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
               eos_ids: frozenset[int], max_new: int, device: torch.device) -> RowState:
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return cls(prompt_ids, params, eos_ids, IncrementalDecoder(tokenizer, prompt_ids),
                   StopMatcher(params.stop), max_new, gen)

    def advance(self, token_id: int) -> Chunk | None:
        """Take the next token; return the chunk to stream now (None when there is no new text
        yet and the row goes on)."""
        self.generated += 1
        self.unsent.append(token_id)
        if token_id in self.eos_ids:
            text = self.matcher.feed(self.decoder.flush(), final=True)
            self.finish_reason = "stop"
        else:
            last = self.generated >= self.max_new
            text = self.matcher.feed(self.decoder.push(token_id, final=last), final=last)
            if self.matcher.stopped:
                self.finish_reason = "stop"
            elif last:
                self.finish_reason = "length"
        if self.finish_reason is None and not text:
            return None
        chunk = Chunk(text, tuple(self.unsent), self.finish_reason)
        if self.finish_reason is not None:
            chunk = Chunk(text, tuple(self.unsent), self.finish_reason,
                          prompt_tokens=len(self.prompt_ids), completion_tokens=self.generated)
        self.unsent = []
        return chunk


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits (1-D) with every token outside the smallest set whose probability reaches `top_p`
    set to -inf (the most likely token always stays), as transformers' TopPLogitsWarper."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-1] = False
    mask = remove.scatter(0, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def next_tokens(logits: torch.Tensor, rows: list[RowState]) -> list[int]:
    """The next token of every row from its last-position logits [rows, vocab] (fp32): argmax
    for greedy rows (as transformers' greedy search), else temperature, top-p and a draw from the
    row's own seeded generator."""
    out = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.params.greedy:
            continue
        scores = top_p_filter(logits[i] / row.params.temperature, row.params.top_p)
        probs = scores.softmax(dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
    return [int(t) for t in out]
