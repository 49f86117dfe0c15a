"""The methods registry: every JobSpec method loads, trains (loss falls), touches only its
trainable parameters, and round-trips through save_trainable / load_trainable; hardware the
spec cannot run on is refused up front."""

from __future__ import annotations

import typing
import warnings

import pytest
import torch

from llmstudio.jobspec import JobSpec, Method
from llmstudio.ml.tiny import build_tiny_model
from services.trainer import host
from services.trainer import methods as M
from services.trainer.methods import (
    REGISTRY,
    TrainableMismatch,
    UnsupportedOnHardware,
    check_hardware,
    load_for_training,
    load_trainable,
    save_trainable,
)
from tests.support.compare import relative_error

CPU = torch.device("cpu")
STEPS = 10
# per-method learning rates: the few-parameter methods (scaling vectors, virtual tokens) need
# larger steps to move the loss in 10 steps
LR = {"ia3": 0.2, "vera": 0.1, "prefix_tuning": 0.05, "prompt_tuning": 0.1, "p_tuning": 0.01,
      "lokr": 0.05, "oft": 0.02, "adalora": 0.05, "full": 5e-3}
ALL_METHODS = list(typing.get_args(Method))
# How far the logits of a model with a saved-and-loaded adapter may be from the trained model's,
# relative by norm, for every method on every CPU. The weights are equal (checked exactly), so
# only the kernels can differ. The worst: on CPUs with AVX512-BF16, bitsandbytes runs a 4-bit
# layer's eval forward in bf16 on weights it repacks (and unpacks, not bit-exactly, to save
# them), so one model may round in bf16 where the other did not, or differently. bf16 keeps 8
# significant bits (unit roundoff 2^-9); the tiny model chains 8 quantized matmuls (q/k/v, o,
# gate/up, down per layer), each rounding its input and weight: 16 roundings, added linearly in
# the worst case, 16 * 2^-9 = 2^-5 (seen: bf16 against fp32 1.4e-2, in this test 8e-3, 0 with
# fp32 kernels). Training moved the logits by ~1 by norm: a lost adapter is far outside.
LOGITS_RTOL = 2**-5


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("methods") / "tiny"))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 16), generator=g)
    return ids, torch.ones_like(ids)


def _spec(tiny: str, method: str, **kw) -> JobSpec:
    hp = {"max_steps": STEPS, **kw.pop("hyperparameters", {})}
    return JobSpec(base_model=tiny, dataset="ds", method=method, hyperparameters=hp, **kw)


def _loss(pm, ids, am):
    logits = pm.model(input_ids=ids, attention_mask=am).logits[:, pm.logits_offset:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    return loss, logits


def _logits(pm, ids, am):
    pm.model.eval()
    with torch.no_grad():
        return _loss(pm, ids, am)[1]


def test_registry_covers_exactly_the_jobspec_methods():
    assert set(REGISTRY) == set(ALL_METHODS)
    assert len(REGISTRY) == len(ALL_METHODS)
    assert REGISTRY["full"].peft_config is None
    for name in ALL_METHODS:
        if name != "full":
            assert REGISTRY[name].peft_config(_spec("x", name), "llama") is not None, name


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_only_its_parameters_and_round_trips(method, tiny, batch, tmp_path):
    ids, am = batch
    spec = _spec(tiny, method)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = load_for_training(spec, tiny, CPU)
    assert pm.is_adapter == (method != "full")
    assert 0 < pm.num_trainable <= pm.num_total
    if pm.is_adapter:
        assert pm.num_trainable < 0.5 * pm.num_total
    trainable_names = {n for n, _ in pm.trainable}
    before = {n: p.detach().clone() for n, p in pm.model.named_parameters()}

    opt = torch.optim.AdamW([p for _, p in pm.trainable], lr=LR.get(method, 1e-2))
    losses = []
    for step in range(1, STEPS + 1):
        torch.manual_seed(step)
        loss, _ = _loss(pm, ids, am)
        if pm.extra_loss is not None:
            loss = loss + pm.extra_loss()
        loss.backward()
        opt.step()
        pm.after_backward(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, (method, losses)

    changed = {n for n, p in pm.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, method
    assert changed <= trainable_names, (method, sorted(changed - trainable_names)[:5])
    if pm.is_adapter:
        frozen = [n for n in before if n not in trainable_names]
        assert frozen and all(n not in changed for n in frozen)
        some_base = next(n for n in frozen if "layers.0" in n and n.endswith("weight"))
        assert some_base not in changed
    if method == "adalora":  # the rank budget was finalized on the last step
        assert pm.model.peft_config["default"].rank_pattern

    trained = _logits(pm, ids, am)
    save_trainable(pm, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files), files
    assert ("adapter_model.safetensors" if pm.is_adapter else "model.safetensors") in files

    torch.manual_seed(1234)  # a different random init for the fresh adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = load_for_training(spec, tiny, CPU)
    unloaded_error = relative_error(_logits(fresh, ids, am), trained)
    params_before = [p for _, p in fresh.trainable]
    load_trainable(fresh, tmp_path / "ckpt")
    assert [p for _, p in fresh.trainable] == params_before  # same objects: optimizer stays valid
    for (name, loaded), (_, saved) in zip(fresh.trainable, pm.trainable, strict=True):
        assert torch.equal(loaded.detach(), saved.detach()), name
    loaded_error = relative_error(_logits(fresh, ids, am), trained)
    assert loaded_error <= LOGITS_RTOL, loaded_error
    assert unloaded_error > 10 * LOGITS_RTOL, unloaded_error  # a lost adapter would fail above


def test_load_trainable_refuses_a_mismatched_checkpoint(tiny, tmp_path):
    pm = load_for_training(_spec(tiny, "lora"), tiny, CPU)
    save_trainable(pm, tmp_path / "r8")
    other = load_for_training(_spec(tiny, "lora", lora={"r": 4}), tiny, CPU)
    with pytest.raises(TrainableMismatch):
        load_trainable(other, tmp_path / "r8")
    ia3 = load_for_training(_spec(tiny, "ia3"), tiny, CPU)
    with pytest.raises(TrainableMismatch, match="do not match"):
        load_trainable(ia3, tmp_path / "r8")
    full = load_for_training(_spec(tiny, "full"), tiny, CPU)
    with pytest.raises(TrainableMismatch, match="model"):
        load_trainable(full, tmp_path / "r8")


def test_fp16_on_cpu_is_refused_before_loading(tiny, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must refuse before loading the model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", boom)
    spec = _spec(tiny, "lora", precision="fp16")
    with pytest.raises(UnsupportedOnHardware) as e:
        load_for_training(spec, tiny, CPU)
    assert "fp16" in str(e.value) and "GPU" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_cpu_refusals_say_why(tiny, monkeypatch):
    with pytest.raises(UnsupportedOnHardware, match="paged_adamw_8bit.*GPU"):
        check_hardware(_spec(tiny, "lora", hyperparameters={"optimizer": "paged_adamw_8bit"}), CPU)
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    monkeypatch.setattr(host, "cpu_info", lambda: avx2)
    with pytest.raises(UnsupportedOnHardware, match="25x slower.*fp32"):
        check_hardware(_spec(tiny, "lora", precision="bf16"), CPU)
    monkeypatch.setattr(host, "cpu_info", lambda: avx2.replace("fma", "avx512f avx512_bf16"))
    check_hardware(_spec(tiny, "lora", precision="bf16"), CPU)
    check_hardware(_spec(tiny, "qlora"), CPU)  # bitsandbytes imports here
    monkeypatch.setattr(M, "_bitsandbytes_importable", lambda: "ImportError: no module")
    with pytest.raises(UnsupportedOnHardware, match="qlora needs bitsandbytes"):
        check_hardware(_spec(tiny, "qlora"), CPU)


def test_adalora_schedule_without_budget_phase_is_refused(tiny):
    spec = _spec(tiny, "adalora", adalora={"tinit": 6, "tfinal": 4})
    with pytest.raises(ValueError, match="tinit"):
        REGISTRY["adalora"].peft_config(spec, "llama")


def test_defaults_per_architecture():
    assert M.default_target_modules("llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert M.default_target_modules("unknown-arch") == "all-linear"
    ia3 = REGISTRY["ia3"].peft_config(_spec("x", "ia3"), "llama")
    assert set(ia3.feedforward_modules) == {"down_proj"} <= set(ia3.target_modules)
    spec = _spec("x", "lora", lora={"target_modules": ["q_proj"]})
    dora = REGISTRY["dora"].peft_config(spec, "llama")
    assert set(dora.target_modules) == {"q_proj"} and dora.use_dora


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_gradient_checkpointing_keeps_gradients_flowing(method, tiny, batch):
    ids, am = batch
    spec = _spec(tiny, method, hyperparameters={"gradient_checkpointing": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = load_for_training(spec, tiny, CPU)
    base = pm.model.get_base_model() if pm.is_adapter else pm.model
    assert base.is_activation_checkpointing
    loss, _ = _loss(pm, ids, am)
    loss.backward()
    grads = {n: p.grad for n, p in pm.trainable}
    assert all(g is not None for g in grads.values()), method
    # LoRA's B starts at zero, so only B gets a gradient on the first step (A's is B^T ... = 0)
    moving = [n for n in grads if "lora_A" not in n]
    assert moving and all(grads[n].abs().sum() > 0 for n in moving), method
