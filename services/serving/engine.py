"""The serving engine: one loaded base model serving many LoRA adapters, with dynamic batching.

- Requests queue (bounded: `Overloaded` at once beyond `max_queue` waiting); a batching task
  takes up to `max_batch_size` of them (those that arrived while a batch ran, or within
  `batch_window_s` of the first) into one batch, left-padded, and runs it in a worker thread:
  a prefill, then one token per step for every row with the KV cache. Each row stops on its own
  (EOS, a stop string, max_tokens), streams its chunks as they come, and leaves the batch (its
  cache rows dropped); the batch ends when its last row does. Continuous batching: requests
  that arrive while a batch runs join it between two steps when it has room (their prompts
  prefilled together, then their caches left-padded and concatenated to the batch's), so a
  long generation does not hold a short one back; models whose cache cannot be merged so
  (sliding windows, recurrent state) run each batch to its end instead.
- Adapters: one peft model over the base. A batch whose rows all use the same adapter (or none)
  runs the plain LoRA forward with that adapter active (or the adapters disabled); a batch of
  mixed adapters runs peft's mixed-batch forward (`adapter_names=[...]`, "__base__" for rows
  without one). Adapters live in an LRU of bounded bytes (services.serving.adapters): adding
  one evicts the least recently used beyond `adapter_memory_bytes`, never one a queued or
  running request uses; removing one in use deletes it when its last request ends.
- Sampling: greedy at temperature 0 (token for token what transformers' `generate` gives on a
  single unpadded request), else temperature + top-p with the request's own generator, seeded
  by `seed` (the same seed, the same text).

The model runs in one worker thread; every change to the model (adapters in and out, the active
adapter) is made under one lock, between decode steps. No HTTP, gRPC or bus here: the serving
service wraps this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import warnings
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from services.serving.adapters import AdapterCache
from services.serving.batching import (
    Chunk,
    Overloaded,
    RowState,
    SamplingParams,
    next_tokens,
)

__all__ = ["Chunk", "Engine", "GenerationStream", "NoChatTemplate", "Overloaded",
           "SamplingParams"]

log = logging.getLogger(__name__)
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template: chat requests cannot be formatted."""


class EngineClosed(RuntimeError):
    pass


class _Request:
    """A queued or running generation; its chunks go to the caller's event loop."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                 internal: str | None, max_new: int, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.internal = internal  # the adapter's peft name, pinned while this request lives
        self.max_new = max_new
        self.loop = loop
        self.queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.cancelled = False  # set by the caller (stream closed); read by the worker
        self.released = False

    def emit(self, item: Chunk | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class GenerationStream(AsyncIterator[Chunk]):
    """The chunks of one generation: `async for chunk in engine.generate(...)` (or
    `stream = await engine.generate(...)`). Closing it (aclose) before its last chunk cancels
    the request: it leaves its batch at the next step."""

    def __init__(self, engine: Engine, request: _Request):
        self._engine = engine
        self._request = request
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    def __await__(self) -> Generator[Any, None, GenerationStream]:
        return self
        yield  # a generator: `await stream` gives the stream itself

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        item = await self._request.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    async def aclose(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel(self._request)

    def __del__(self) -> None:
        if not self._done:
            self._request.cancelled = True


def _best_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _param_bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class Engine:
    """One loaded base model (fp32 on CPU; the device's best dtype on GPU) serving many
    adapters."""

    def __init__(self, base_model_dir: str, *, max_batch_size: int = 8, max_queue: int = 64,
                 adapter_memory_bytes: int = 512 * 2**20, device: str | None = None,
                 tokenizer_dir: str | None = None, batch_window_s: float = 0.002,
                 dtype: torch.dtype | None = None, continuous_batching: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model_dir = str(base_model_dir)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or _best_dtype(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or self.model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        self.model: Any = model.to(self.device).eval()
        self.peft: Any = None  # a PeftModel over self.model once an adapter is added
        self._mode: str | None = None  # the active adapter's internal name; None: disabled
        self._model_lock = threading.RLock()
        self._adapters = AdapterCache(adapter_memory_bytes)
        self._base_bytes = _param_bytes(self.model.parameters())
        self._eos_ids = frozenset(self._find_eos_ids())
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self._eos_ids, default=0))
        self._max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._pending: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.continuous_batching = continuous_batching
        self._cache_mergeable = self._check_cache_mergeable()
        self.batches_run = 0  # how many batches ran, and their sizes (observability, tests)
        self.batch_sizes: list[int] = []
        self.joined = 0  # requests admitted into a running batch
        self.peak_rows = 0  # the most rows one model call ran

    def _check_cache_mergeable(self) -> bool:
        """Continuous batching pads and concatenates KV caches: only plain dynamic layers (no
        sliding window, no linear attention state) can be merged that way."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        layers = getattr(cache, "layers", None) or []
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @classmethod
    def for_full_model(cls, model_dir: str, **kw: Any) -> Engine:
        """A merged or full fine-tune: its own model (every weight is the checkpoint's); the
        tokenizer from `tokenizer_dir=` when the checkpoint has none."""
        return cls(model_dir, **kw)

    # -- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the tokenizer's chat template, with the generation prompt
        (the assistant's turn opened)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplate(f"the tokenizer of {self.model_dir} has no chat template")
        ids: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt, special tokens (BOS) added as the tokenizer does."""
        return [int(t) for t in self.tokenizer(prompt)["input_ids"]]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _find_eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        for tid in found + [self.tokenizer.eos_token_id]:
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))
        return ids

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Load a peft LoRA adapter (adapter_config.json + adapter_model.safetensors) on the
        base (a no-op when `name` is loaded from the same dir already), then evict the least
        recently used adapters beyond the memory budget (never one in use). Blocking (disk + at
        most one decode step): from a loop, use asyncio.to_thread."""
        from peft import PeftModel

        path = str(adapter_dir)
        with self._model_lock:
            loaded = self._adapters.path_of(name)
            if loaded == path:
                return  # two callers raced to load it: the first did
            if loaded is not None:
                raise ValueError(f"adapter {name!r} is already loaded from {loaded}")
            internal = self._adapters.new_internal_name()
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.model, path, adapter_name=internal, is_trainable=False,
                    autocast_adapter_dtype=False, low_cpu_mem_usage=True)
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=internal, is_trainable=False,
                                       autocast_adapter_dtype=False, low_cpu_mem_usage=True)
            for p in self.peft.parameters():
                p.requires_grad_(False)
            self._mode = "?"  # peft may have changed the active adapter: set it again
            nbytes = _param_bytes(p for n, p in self.peft.named_parameters()
                                  if f".{internal}." in n)
            self._adapters.add(name, internal, path, nbytes)
            for old in self._adapters.evictions(keep=name):
                self._delete(old)

    @contextlib.contextmanager
    def hold_adapter(self, name: str) -> Iterator[None]:
        """Keep `name` loaded (not evicted by later add_adapter calls, deleted by remove_adapter
        only at the end) while the block runs: from loading it to the end of a request that will
        use it. KeyError if it is not loaded."""
        internal = self._adapters.pin(name)
        try:
            yield
        finally:
            doomed = self._adapters.unpin(internal)
            if doomed is not None:
                self._delete(doomed)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def adapters(self) -> list[str]:
        return self._adapters.names()

    def remove_adapter(self, name: str) -> None:
        """Unload `name` (KeyError if not loaded). Requests already using it finish with it;
        it is deleted from the model when the last one ends."""
        internal = self._adapters.remove(name)
        if internal is not None:
            with self._model_lock:
                self._delete(internal)

    def _delete(self, internal: str) -> None:
        with self._model_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter X was active, now Y": _activate sets it
            if self.peft is None:
                return
            self.peft.delete_adapter(internal)
            self._mode = "?"

    def memory_bytes(self) -> dict:
        """Parameter bytes: the base model's, and each loaded adapter's."""
        sizes = self._adapters.sizes()
        return {"base": self._base_bytes, "adapters": sizes,
                "adapters_total": self._adapters.total_bytes()}

    # -- requests -----------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 adapter: str | None = None) -> GenerationStream:
        """Queue a generation and return its stream of chunks. Raises at once: `Overloaded`
        when `max_queue` requests already wait, KeyError for an adapter not loaded, ValueError
        for bad parameters or a prompt that leaves no room in the context."""
        if self._closed or self._wakeup is None:
            raise EngineClosed("the engine is not running (start() it first)")
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        max_new = params.max_tokens
        if self._max_context:
            room = self._max_context - len(prompt_ids)
            if room < 1:
                raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the model's "
                                 f"context of {self._max_context} tokens")
            max_new = min(max_new, room)
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} requests already queued "
                             f"(max_queue={self.max_queue})")
        internal = self._adapters.pin(adapter) if adapter is not None else None
        req = _Request([int(t) for t in prompt_ids], params, adapter, internal, max_new,
                       asyncio.get_running_loop())
        self._pending.append(req)
        self._wakeup.set()
        return GenerationStream(self, req)

    def queued(self) -> int:
        return len(self._pending)

    def _cancel(self, req: _Request) -> None:
        req.cancelled = True
        try:
            self._pending.remove(req)
        except ValueError:
            return  # running (the worker drops it) or done
        self._release(req)

    def _release(self, req: _Request) -> None:
        """The request is over: unpin its adapter (and delete it if it was removed meanwhile)."""
        if req.released:
            return
        req.released = True
        if req.internal is not None:
            doomed = self._adapters.unpin(req.internal)
            if doomed is not None:
                self._delete(doomed)

    # -- the batching loop --------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._closed = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="serving-engine")
        self._task = asyncio.create_task(self._loop(), name="serving-engine")

    async def close(self) -> None:
        """Stop: queued requests fail with EngineClosed, running ones stop at the next step."""
        self._closed = True
        while self._pending:
            req = self._pending.popleft()
            req.emit(EngineClosed("the engine closed"))
            self._release(req)
        for req in list(self._running):
            req.cancelled = True
            req.emit(EngineClosed("the engine closed"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
            self._executor = None
        self._wakeup = None

    async def _loop(self) -> None:
        assert self._wakeup is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        idle = True
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                idle = True
            if idle and self.batch_window_s > 0 and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.batch_window_s)  # let a burst arrive together
            batch: list[_Request] = []
            while self._pending and len(batch) < self.max_batch_size:
                req = self._pending.popleft()
                if req.cancelled:
                    self._release(req)
                else:
                    batch.append(req)
            if not batch:
                continue
            self._running = batch
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            finally:
                self._running = []
            idle = False

    # -- the worker thread --------------------------------------------------------------------

    def _run_batch(self, batch: list[_Request]) -> None:
        self.batches_run += 1
        self.batch_sizes.append(len(batch))
        try:
            with torch.inference_mode():
                self._decode(batch)
        except Exception as e:  # noqa: BLE001 - every row's caller gets the error
            log.exception("serving batch failed")
            for req in batch:
                req.emit(e)
        finally:
            for req in batch:
                self._release(req)

    def _forward(self, adapters: list[str | None], **inputs: Any) -> torch.Tensor:
        """Last-position logits (fp32) of one model call, with each row's adapter."""
        self.peak_rows = max(self.peak_rows, len(adapters))
        with self._model_lock:
            model = self.model
            if self.peft is not None:
                loaded = self._adapters.loaded_internals()
                names = [a if a in loaded else None for a in adapters]
                unique = set(names)
                if len(unique) == 1:
                    self._activate(names[0])
                else:
                    self._activate(BASE)
                    model = self.peft
                    inputs["adapter_names"] = [a or BASE for a in names]
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :].to(dtype=torch.float32)

    def _activate(self, internal: str | None) -> None:
        """Adapters disabled (None), one active, or all enabled for a mixed batch (BASE)."""
        if self._mode == internal:
            return
        tuner = self.peft.base_model
        if internal is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            if internal != BASE:
                self.peft.set_adapter(internal)
        self._mode = internal

    def _decode(self, batch: list[_Request]) -> None:
        """Run `batch` to its end. `batch` is the running list: requests admitted between steps
        (continuous batching) are appended to it, so every one is released at the end."""
        state = self._prefill(list(batch))
        while True:
            tokens = self._advance(state)
            if self.continuous_batching and len(state.reqs) < self.max_batch_size:
                joining = self._take_pending(self.max_batch_size - len(state.reqs))
                if joining:
                    batch.extend(joining)
                    self.joined += len(joining)
                    new = self._prefill(joining)
                    new_tokens = self._advance(new)
                    if not state.reqs:  # every row was done: the joining rows go on alone
                        state, tokens = new, new_tokens
                    elif new.reqs:
                        tokens = self._merge(state, tokens, new, new_tokens)
            if not state.reqs:
                return
            step_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
            state.mask = torch.cat([state.mask, state.mask.new_ones((len(tokens), 1))], dim=-1)
            state.last_pos = state.last_pos + 1
            state.logits = self._forward([r.internal for r in state.reqs], input_ids=step_ids,
                                         attention_mask=state.mask, position_ids=state.last_pos,
                                         past_key_values=state.cache)

    def _prefill(self, reqs: list[_Request]) -> _BatchState:
        """Left-pad the prompts of `reqs` into one batch and run it: its cache and the logits
        of every row's first new token."""
        from transformers import DynamicCache

        rows = [RowState.create(self.tokenizer, r.prompt_ids, r.params, self._eos_ids,
                                r.max_new, self.device) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward([r.internal for r in reqs], input_ids=ids, attention_mask=mask,
                               position_ids=positions, past_key_values=cache)
        return _BatchState(reqs, rows, cache, mask, positions[:, -1:], logits)

    def _advance(self, state: _BatchState) -> list[int]:
        """Pick every row's next token, stream what it gives, drop the rows that are done (or
        cancelled) from the state; return the kept rows' tokens, to feed next."""
        tokens = next_tokens(state.logits, state.rows)
        keep: list[int] = []
        for i, (req, row, tok) in enumerate(zip(state.reqs, state.rows, tokens, strict=True)):
            if req.cancelled:
                self._release(req)
                continue
            chunk = row.advance(tok)
            if chunk is None or chunk.finish_reason is None:
                keep.append(i)
            else:
                self._release(req)  # first: its adapter may go as the caller reads this
            if chunk is not None:
                req.emit(chunk)
        if len(keep) < len(state.reqs):
            state.select(keep)
        return [tokens[i] for i in keep]

    def _take_pending(self, room: int) -> list[_Request]:
        if not self._pending or not self._cache_mergeable:
            return []
        out: list[_Request] = []
        while len(out) < room:
            try:
                req = self._pending.popleft()
            except IndexError:
                break
            if req.cancelled:
                self._release(req)
            else:
                out.append(req)
        return out

    def _merge(self, state: _BatchState, tokens: list[int], new: _BatchState,
               new_tokens: list[int]) -> list[int]:
        """Append the rows of `new` to `state`: caches and masks left-padded to one length."""
        old_len, new_len = state.mask.shape[1], new.mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(state.cache.layers, new.cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                a = torch.nn.functional.pad(a, (0, 0, width - old_len, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - new_len, 0))
                setattr(old_layer, attr, torch.cat([a, b], dim=0))
        state.mask = torch.cat([
            torch.nn.functional.pad(state.mask, (width - old_len, 0)),
            torch.nn.functional.pad(new.mask, (width - new_len, 0)),
        ])
        state.last_pos = torch.cat([state.last_pos, new.last_pos])
        state.reqs += new.reqs
        state.rows += new.rows
        return tokens + new_tokens


class _BatchState:
    """A running batch in the worker: its requests and rows, KV cache, attention mask, and each
    row's last position; `logits` are the rows' next-token logits."""

    def __init__(self, reqs: list[_Request], rows: list[RowState], cache: Any,
                 mask: torch.Tensor, last_pos: torch.Tensor, logits: torch.Tensor):
        self.reqs, self.rows, self.cache = reqs, rows, cache
        self.mask, self.last_pos, self.logits = mask, last_pos, logits

    def select(self, keep: list[int]) -> None:
        self.reqs = [self.reqs[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last_pos = self.mask[index], self.last_pos[index]
