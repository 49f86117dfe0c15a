"""The serving engine (services.serving.engine): one tiny base, two LoRA adapters, dynamic
batching. Greedy output equals transformers' generate token for token; concurrent streams of
mixed adapters equal each stream alone; the queue is bounded; stop strings, seeds, the adapter
LRU; the second adapter costs adapter-sized memory (RSS, measured in a fresh process)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmstudio.ml.tiny import build_tiny_model
from services.serving.batching import IncrementalDecoder, StopMatcher
from services.serving.engine import Engine, NoChatTemplate, Overloaded, SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the engine's, and the reference's
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "Hello! How are you?",
    "say apple:",
    "Reverse the order of the words: apple river stone",
    "a b c",
    "the stone, say it now please:",
    "What is 2 + 3?",
    "one two three four five six seven eight nine ten",
    "dog?",
]


def make_adapter(base: Path, dest: Path, seed: int, targets: list[str], r: int = 8) -> Path:
    """A peft LoRA adapter of `base` with random non-zero B (no training: outputs differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                            init_lora_weights=False))
    peft.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    base = build_tiny_model(root / "base")
    a1 = make_adapter(base, root / "a1", 1, ["q_proj", "v_proj"])
    a2 = make_adapter(base, root / "a2", 2, ALL_LINEAR)
    a3 = make_adapter(base, root / "a3", 3, ["q_proj", "v_proj"])
    return base, a1, a2, a3


@pytest.fixture
async def engine(models):
    base, a1, a2, _ = models
    eng = Engine(str(base), max_batch_size=8, batch_window_s=0.01, device=DEVICE)
    eng.add_adapter("tuned.v1", a1)
    eng.add_adapter("tuned.v2", a2)
    await eng.start()
    yield eng
    await eng.close()


async def collect(stream):
    chunks = [c async for c in stream]
    ids = [t for c in chunks for t in c.token_ids]
    return ids, "".join(c.text for c in chunks), chunks


def greedy(n: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def hf_generate(engine: Engine, adapter: Path | None, prompt_ids: list[int],
                n: int) -> list[int]:
    """transformers' greedy generate on the engine's model dir, device and dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype)
    model = model.to(engine.device).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).eval()
    out = model.generate(torch.tensor([prompt_ids], device=engine.device), max_new_tokens=n,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()


async def test_greedy_equals_transformers_generate(engine, models):
    _, a1, a2, _ = models
    outputs = {}
    for adapter, path in [(None, None), ("tuned.v1", a1), ("tuned.v2", a2)]:
        for prompt in PROMPTS[:3]:
            ids = engine.encode(prompt)
            got, text, chunks = await collect(engine.generate(ids, greedy(), adapter))
            assert got == hf_generate(engine, path, ids, 24), (adapter, prompt)
            assert text == engine.decode(got)
            last = chunks[-1]
            assert last.finish_reason in ("stop", "length")
            assert (last.prompt_tokens, last.completion_tokens) == (len(ids), len(got))
            assert all(c.finish_reason is None for c in chunks[:-1])
            outputs[adapter, prompt] = got
    for prompt in PROMPTS[:3]:  # each adapter really changes the model
        assert len({tuple(outputs[a, prompt]) for a in (None, "tuned.v1", "tuned.v2")}) == 3


async def test_concurrent_mixed_adapters_equal_alone_and_batch(engine):
    jobs = [(engine.encode(p), [None, "tuned.v1", "tuned.v2"][i % 3])
            for i, p in enumerate(PROMPTS)]
    t0 = time.perf_counter()
    alone = [await collect(engine.generate(ids, greedy(32), a)) for ids, a in jobs]
    sequential_s = time.perf_counter() - t0
    engine.peak_rows = 0
    t0 = time.perf_counter()
    together = await asyncio.gather(*(collect(engine.generate(ids, greedy(32), a))
                                      for ids, a in jobs))
    concurrent_s = time.perf_counter() - t0
    for (ids_alone, text_alone, _), (ids_batch, text_batch, _) in zip(alone, together,
                                                                       strict=True):
        assert ids_batch == ids_alone
        assert text_batch == text_alone
    assert engine.peak_rows == 8  # one batch, left padded, three adapters in it
    tokens = sum(len(ids) for ids, _, _ in together)
    print(f"\n8 streams, {tokens} tokens: sequential {tokens / sequential_s:.0f} tok/s, "
          f"concurrent {tokens / concurrent_s:.0f} tok/s "
          f"({sequential_s / concurrent_s:.2f}x)")


async def test_requests_arriving_during_a_batch_join_it(engine):
    """Continuous batching: requests arriving while a long generation runs join its batch
    between two steps (prefilled, caches merged) and give what they give alone; so does it."""
    long_ids = engine.encode(PROMPTS[6])
    jobs = [(engine.encode(p), a) for p, a in
            [(PROMPTS[1], "tuned.v1"), (PROMPTS[2], None), (PROMPTS[0], "tuned.v2")]]
    long_alone = await collect(engine.generate(long_ids, greedy(60)))
    alone = [await collect(engine.generate(ids, greedy(12), a)) for ids, a in jobs]
    engine.peak_rows, joined = 0, engine.joined
    long_stream = engine.generate(long_ids, greedy(60))
    first = await long_stream.__anext__()  # the long one runs, alone in its batch
    late = [engine.generate(ids, greedy(12), a) for ids, a in jobs]
    outs = await asyncio.gather(collect(long_stream), *(collect(s) for s in late))
    assert list(first.token_ids) + outs[0][0] == long_alone[0]
    for (ids_alone, text_alone, _), (ids_late, text_late, _) in zip(alone, outs[1:],
                                                                     strict=True):
        assert (ids_late, text_late) == (ids_alone, text_alone)
    assert engine.peak_rows == 4 and engine.joined - joined >= 3


async def test_without_continuous_batching_they_form_the_next_batch(models):
    eng = Engine(str(models[0]), batch_window_s=0, continuous_batching=False, device=DEVICE)
    await eng.start()
    try:
        first = asyncio.ensure_future(collect(eng.generate(eng.encode(PROMPTS[0]), greedy(40))))
        while not eng._running:
            await asyncio.sleep(0.001)
        later = [eng.generate(eng.encode(p), greedy(8)) for p in PROMPTS[1:4]]
        outs = await asyncio.gather(first, *(collect(s) for s in later))
        assert all(o[2][-1].finish_reason for o in outs)
        assert eng.batch_sizes == [1, 3]
    finally:
        await eng.close()


async def test_queue_is_bounded(models):
    base = models[0]
    eng = Engine(str(base), max_batch_size=1, max_queue=2, batch_window_s=0, device=DEVICE)
    await eng.start()
    try:
        ids = eng.encode(PROMPTS[0])
        running = eng.generate(ids, SamplingParams(max_tokens=400, temperature=0.8, seed=1))
        await running.__anext__()  # it is in the (only) batch
        queued = [eng.generate(ids, greedy(4)) for _ in range(2)]
        with pytest.raises(Overloaded):
            eng.generate(ids, greedy(4))
        assert eng.queued() == 2
        await running.aclose()  # cancelled: leaves its batch, the queued ones run
        for stream in queued:
            _, _, chunks = await collect(stream)
            assert chunks[-1].finish_reason in ("stop", "length")
        _, _, chunks = await collect(eng.generate(ids, greedy(4)))  # room again
        assert chunks[-1].finish_reason is not None
    finally:
        await eng.close()


async def test_stop_strings(engine):
    ids = engine.encode(PROMPTS[2])
    full_ids, full, _ = await collect(engine.generate(ids, greedy(30)))
    stop = full[10:13]
    assert stop and full.find(stop) >= 5
    _, text, chunks = await collect(engine.generate(ids, greedy(30, stop=("zzzz", stop))))
    assert text == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert stop not in "".join(c.text for c in chunks)


async def test_seeded_sampling_is_reproducible(engine):
    ids = engine.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=20, temperature=1.5, top_p=0.9, seed=7)
    one, _, _ = await collect(engine.generate(ids, params, "tuned.v2"))
    # the same seed in a batch with other requests: the same tokens
    batch = await asyncio.gather(
        collect(engine.generate(ids, params, "tuned.v2")),
        collect(engine.generate(engine.encode(PROMPTS[1]), greedy(5))),
        collect(engine.generate(ids, SamplingParams(max_tokens=20, temperature=1.5, seed=8),
                                "tuned.v2")))
    assert batch[0][0] == one
    assert batch[2][0] != one
    greedy_ids, _, _ = await collect(engine.generate(ids, greedy(20), "tuned.v2"))
    assert one != greedy_ids


def test_incremental_decoding_never_breaks_utf8(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    text = " héllo wörld ✓ 日本語 🙂 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    dec = IncrementalDecoder(tok, tok("prompt")["input_ids"])
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) + dec.flush() == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_a_partial_stop():
    m = StopMatcher(("END",))
    assert m.feed("abc E") == "abc "  # "E" may begin END
    assert m.feed("N") == ""
    assert m.feed("X") == "ENX"  # it did not
    assert m.feed("yE") == "y"
    assert m.feed("ND tail") == "" and m.stopped
    assert m.text == "abc ENXy"


async def test_chat_prompt_uses_the_template(engine):
    ids = engine.chat_prompt([{"role": "user", "content": "dog?"}])
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    engine.tokenizer.chat_template = None
    with pytest.raises(NoChatTemplate):
        engine.chat_prompt([{"role": "user", "content": "dog?"}])


async def test_adapter_lru_evicts_least_recently_used_never_one_in_use(models):
    base, a1, a2, a3 = models
    eng = Engine(str(base), batch_window_s=0, device=DEVICE)
    eng.add_adapter("one", a1)
    size = eng.memory_bytes()["adapters"]["one"]
    assert size == sum(p.numel() * p.element_size()
                       for n, p in eng.peft.named_parameters() if "lora_" in n)
    eng._adapters.budget_bytes = 2 * size  # a1 and a3 are the same size: room for two
    eng.add_adapter("three", a3)
    eng.add_adapter("three", a3)  # already loaded from there: nothing to do
    with pytest.raises(ValueError, match="already loaded"):
        eng.add_adapter("three", a2)
    await eng.start()
    try:
        ids = eng.encode(PROMPTS[0])
        alone_one, _, _ = await collect(eng.generate(ids, greedy(), "one"))  # "three" is LRU
        eng.add_adapter("two", a2)  # bigger: evicts both others
        assert eng.adapters() == ["two"]
        eng.add_adapter("one", a1)  # over budget with "two": "two" goes
        assert eng.adapters() == ["one"]
        # in use: neither evicted by an add nor deleted by a remove until its request ends
        stream = eng.generate(ids, greedy(), "one")
        first = await stream.__anext__()
        eng.add_adapter("three", a3)
        eng.add_adapter("two", a2)
        assert eng.has_adapter("one")
        eng.remove_adapter("one")
        assert not eng.has_adapter("one")
        with pytest.raises(KeyError):
            eng.generate(ids, greedy(), "one")
        rest, _, _ = await collect(stream)
        assert list(first.token_ids) + rest == alone_one  # finished with its adapter
        assert eng.adapters() == ["two"]
        assert set(eng.peft.peft_config) == eng._adapters.loaded_internals()  # one deleted
        assert len(eng._adapters.loaded_internals()) == 1
        eng.remove_adapter("two")
        base_ids, _, _ = await collect(eng.generate(ids, greedy()))
        assert base_ids == hf_generate(eng, None, ids, 24)  # no adapter left: the base again
    finally:
        await eng.close()


RSS_SCRIPT = """
import json, sys
import psutil
from llmstudio.ml.allocator import release_free_memory, return_freed_tensors_to_os
return_freed_tensors_to_os()
from services.serving.engine import Engine
base, a1, a2 = sys.argv[1:4]
proc = psutil.Process()
def rss():
    release_free_memory()
    return proc.memory_info().rss
engine = Engine(base, device="cpu")
engine.add_adapter("one", a1)  # the first also imports and wraps (peft)
before = rss()
engine.add_adapter("two", a2)
print(json.dumps({"growth": rss() - before, **engine.memory_bytes()}))
"""


def test_second_adapter_costs_adapter_sized_memory(tmp_path):
    """Measured in a fresh process (RSS, glibc's mmap threshold pinned so freed tensors leave):
    a base of ~39 MB, adapters of ~2 MB; adding the second grows RSS by about its size."""
    base = build_tiny_model(tmp_path / "mid", hidden=512, layers=4)
    a1 = make_adapter(base, tmp_path / "a1", 1, ALL_LINEAR, r=16)
    a2 = make_adapter(base, tmp_path / "a2", 2, ALL_LINEAR, r=16)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(base), str(a1), str(a2)],
                         capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    base_bytes, adapter_bytes = m["base"], m["adapters"]["two"]
    files = sum(p.stat().st_size for p in a2.glob("*.safetensors"))
    print(f"\nbase {base_bytes} B, adapter {adapter_bytes} B (file {files} B), "
          f"RSS growth for the second adapter {m['growth']} B")
    assert abs(adapter_bytes - files) < 64 * 1024  # the parameters are the file's tensors
    assert base_bytes > 10 * adapter_bytes
    assert m["growth"] < 2 * adapter_bytes + base_bytes // 8  # far below a second base
