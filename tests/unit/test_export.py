"""Export: the adapter alone, and merged into the base as a plain transformers model.

Real training steps on a tiny Llama, real files, offline loads with plain transformers/peft."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmstudio import cli
from llmstudio.cli import models as cli_models
from llmstudio.config import Settings
from llmstudio.jobspec import JobSpec
from llmstudio.ml.export import ExportError, export_adapter, export_merged
from llmstudio.ml.tiny import CHAT_TEMPLATE, build_tiny_model
from llmstudio.natsserver import free_port
from llmstudio.storage import artifact_store_from_settings
from services.registry.app import build as build_registry
from services.trainer.recipes import TrainRequest, train
from tests.security.test_download import register_version
from tests.support.harness import put_api_key, running

ROWS = [{"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
        for w in ("apple", "river", "stone", "cat", "dog", "moon")]
PROMPTS = ["say apple twice:", "say moon twice:", "Reverse the order of the words: cat dog"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", autouse=True)
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def ckpt(model_dir, tmp_path_factory) -> Path:
    spec = JobSpec.model_validate({
        "base_model": model_dir, "dataset": "unit",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {"max_steps": 12, "batch_size": 4, "learning_rate": 2e-2, "seed": 3,
                            "log_every": 6},
    })
    result = train(TrainRequest(spec, ROWS, tmp_path_factory.mktemp("run")))
    assert result.adapter_dir is not None and (result.adapter_dir / "manifest.json").is_file()
    return result.adapter_dir


@pytest.fixture(scope="module")
def merged(ckpt, tmp_path_factory) -> Path:
    return export_merged(ckpt, tmp_path_factory.mktemp("exp") / "merged")


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _greedy(model, tok, prompt: str) -> list[int]:
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _logits(model, tok, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0]


def _write_manifest(ckpt: Path, step: int = 1) -> None:
    files = [{"path": p.relative_to(ckpt).as_posix(),
              "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    (ckpt / "manifest.json").write_text(json.dumps(
        {"format": "llmstudio.checkpoint.v1", "step": step, "files": files}))


def _files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


# -- merged ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_merged_generates_exactly_like_the_adapter_on_the_base(model_dir, ckpt, merged):
    tok = AutoTokenizer.from_pretrained(merged)  # the exported tokenizer, offline
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no peft
    assert not hasattr(plain, "peft_config")
    assert plain.dtype == torch.float32
    with_adapter = PeftModel.from_pretrained(_base(model_dir), str(ckpt)).eval()
    base = _base(model_dir)
    adapter_changed_something = False
    for prompt in PROMPTS:
        assert _greedy(plain, tok, prompt) == _greedy(with_adapter, tok, prompt), prompt
        merged_logits = _logits(plain, tok, prompt)
        adapter_logits = _logits(with_adapter, tok, prompt)
        torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
        if (merged_logits - _logits(base, tok, prompt)).abs().max() > 1e-2:
            adapter_changed_something = True
    assert adapter_changed_something, (
        "the adapter did not change the model: the test proves nothing")


@pytest.mark.slow
def test_merged_dir_is_safetensors_with_tokenizer_config_and_card(ckpt, merged):
    files = _files(merged)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "llmstudio_export.json"} <= files
    assert not [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    assert not {"optimizer.safetensors", "trainer_state.json", "manifest.json",
                "adapter_config.json", "adapter_model.safetensors"} & files
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert AutoTokenizer.from_pretrained(merged).chat_template == CHAT_TEMPLATE
    info = json.loads((merged / "llmstudio_export.json").read_text())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert info["export"] == "merged" and info["base_model"] == state["base_model"]
    assert info["checkpoint_step"] == 12 and info["method"] == "lora"
    assert state["base_model"] in (merged / "README.md").read_text()


@pytest.mark.slow
def test_merged_bfloat16(ckpt, tmp_path):
    out = export_merged(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_full_finetune_checkpoint_is_resaved(model_dir, tmp_path):
    model = _base(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    ckpt = tmp_path / "checkpoint-3"
    model.save_pretrained(ckpt)
    (ckpt / "optimizer.safetensors").write_bytes(b"not really")
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": 3, "base_model": model_dir, "spec": {"method": "full", "dataset": "d"}}))
    _write_manifest(ckpt, 3)
    out = export_merged(ckpt, tmp_path / "full")
    assert "optimizer.safetensors" not in _files(out) and "tokenizer.json" in _files(out)
    tok = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for prompt in PROMPTS:
        torch.testing.assert_close(_logits(reloaded, tok, prompt),
                                   _logits(model.eval(), tok, prompt))


# -- adapter ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_adapter_export_loads_with_peft(model_dir, ckpt, tmp_path):
    out = export_adapter(ckpt, tmp_path / "adapter", lineage={"model_name": "tiny-lora",
                                                              "model_version": 2})
    assert _files(out) == {"adapter_model.safetensors", "adapter_config.json", "README.md",
                           "llmstudio_export.json"}
    tok = AutoTokenizer.from_pretrained(model_dir)
    exported = PeftModel.from_pretrained(_base(model_dir), str(out)).eval()
    original = PeftModel.from_pretrained(_base(model_dir), str(ckpt)).eval()
    for prompt in PROMPTS:
        torch.testing.assert_close(_logits(exported, tok, prompt), _logits(original, tok, prompt))
    card = (out / "README.md").read_text()
    assert "tiny-lora v2" in card and model_dir in card and "library_name: peft" in card


def test_prompt_learning_adapter_exports_only_as_adapter(model_dir, tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    peft_model = get_peft_model(_base(model_dir), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft_model.save_pretrained(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": 1, "base_model": model_dir, "spec": {"method": "prefix_tuning"}}))
    _write_manifest(ckpt)
    with pytest.raises(ExportError, match="cannot be merged"):
        export_merged(ckpt, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    out = export_adapter(ckpt, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(model_dir), str(out))
    assert loaded.peft_config["default"].peft_type.value == "PREFIX_TUNING"


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.slow
def test_half_checkpoint_is_refused(ckpt, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(ckpt, half)
    (half / "manifest.json").unlink()
    for export in (export_adapter, export_merged):
        with pytest.raises(ExportError, match="no manifest.json"):
            export(half, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_tampered_checkpoint_is_refused(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with open(bad / "adapter_model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(ExportError, match="adapter_model.safetensors does not match"):
        export_merged(bad, tmp_path / "out")


@pytest.mark.slow
def test_existing_output_is_not_clobbered(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_adapter(ckpt, out)
    assert _files(out) == {"keep.txt"}
    export_adapter(ckpt, out, overwrite=True)
    assert "keep.txt" not in _files(out) and "adapter_model.safetensors" in _files(out)


# -- CLI -------------------------------------------------------------------------------------


def test_cli_parses_models_export():
    args = cli.build_parser().parse_args(
        ["models", "export", "tiny-lora@3", "--out", "exp", "--merged", "--base-model", "/m",
         "--json"])
    assert args.fn is cli_models.cmd_export
    assert (args.ref, args.out, args.merged, args.base_model, args.dtype, args.json) == (
        "tiny-lora@3", "exp", True, "/m", "float32", True)
    args = cli.build_parser().parse_args(["models", "export", "tiny-lora@3", "--out", "exp"])
    assert (args.merged, args.base_model) == (False, None)
    with pytest.raises(SystemExit):  # --out is required
        cli.build_parser().parse_args(["models", "export", "tiny-lora@3"])


def test_cli_without_torch_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` -> ImportError
    assert cli.main(["models", "export", "m@1", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'llm-studio[train]'" in err


@pytest.mark.slow
async def test_cli_downloads_the_checkpoint_and_exports(ckpt, nats_server, tmp_path, monkeypatch,
                                                        capsys):
    """The whole command against a real registry, which streams the checkpoint from its
    artifact store (DownloadArtifact): the CLI has no store settings."""
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path / "registry",
                        grpc_port=free_port(), artifact_store="file",
                        artifact_root=tmp_path / "artifacts")
    store = artifact_store_from_settings(settings)
    key = store.put_dir("tenants/acme/jobs/j1/checkpoint-12/", ckpt)
    viewer = await put_api_key(nats_server.url, "viewer", "acme")
    monkeypatch.setenv("LLMSTUDIO_ARTIFACT_ROOT", str(tmp_path / "nowhere"))  # not used
    common = ["--api-key", viewer, "--data-dir", str(tmp_path / "client")]
    async with running("registry", build_registry, settings) as port:
        monkeypatch.setenv("LLMSTUDIO_REGISTRY_ADDR", f"127.0.0.1:{port}")
        await register_version(settings, port, viewer, "j1", "tiny-lora", key, key, 1)
        out = tmp_path / "merged"
        rc = await asyncio.to_thread(cli.main, [
            "models", "export", "tiny-lora@1", "--out", str(out), "--merged", "--json", *common])
        assert rc == 0, capsys.readouterr().err
        printed = json.loads(capsys.readouterr().out)
        assert printed["path"] == str(out) and printed["kind"] == "merged"
        info = json.loads((out / "llmstudio_export.json").read_text())
        assert info["model_name"] == "tiny-lora" and info["job_id"] == "j1"
        assert "model.safetensors" in _files(out)
        assert not (tmp_path / "nowhere").exists()

        # a version whose checkpoint never finished uploading: a clear error, nothing written
        await register_version(settings, port, viewer, "j2", "tiny-lora",
                               "tenants/acme/jobs/j2/checkpoint-99",
                               "tenants/acme/jobs/j2/checkpoint-99", 2)
        rc = await asyncio.to_thread(cli.main, [
            "models", "export", "tiny-lora@2", "--out", str(tmp_path / "x"), *common])
        assert rc == 1 and "incomplete" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
