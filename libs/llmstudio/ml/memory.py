"""Memory pre-flight: how many bytes one training process of a job needs, before it runs.

Pure Python, no torch: the scheduler estimates at submit time (returned in Job.memory_estimate)
and places the job only on a worker that reports at least that much free memory.

The estimate is per process and has four parts (bytes):

* weights     the base model as loaded for training, plus any adapter. Training keeps fp32
              weights (fp32 master weights under bf16/fp16 mixed precision, fp32 on a CPU);
              qlora stores the linear layers in 4 bits (0.5 B/param + one fp32 absmax per
              64-value block = 0.5625 B), lora_8bit in 8 bits (1 B + the same block scales);
              embeddings and norms stay in the compute dtype.
* gradients   4 B per trainable parameter (fp32 gradients).
* optimizer   AdamW keeps two fp32 moments: 8 B per trainable parameter; the 8-bit AdamW
              variants (bitsandbytes) 2 B.
* activations what the forward pass keeps for the backward pass, after Korthikanti et al.,
              "Reducing Activation Recomputation in Large Transformer Models" (2022, arXiv
              2205.05198, section 4.1): one transformer layer stores
                  s * b * h * (34 + 5 * a * s / h)   bytes with 16-bit activations
              (s sequence length, b micro-batch, h hidden size, a attention heads); fp32
              activations take twice that. With gradient checkpointing (full recomputation,
              section 4.2) only each layer's input is kept (s*b*h values per layer) plus one
              layer's full activations while it is recomputed. The logits come on top:
              b * s * vocab * 4 B, twice (the fp32 logits and the loss's softmax / gradient).
              DPO and ORPO run the chosen and the rejected completion: twice the activations.

FSDP shards weights, gradients and optimizer state over the processes; DDP replicates them.
Parameter counts come from the Hugging Face config.json: the exact llama formula for the
llama family (gated MLP, grouped-query attention), a generic GPT-style formula otherwise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llmstudio.jobspec import METHODS, JobSpec
from llmstudio.ml.targets import default_target_modules

KEYS = ("weights", "gradients", "optimizer", "activations", "total")

# Architectures with llama's layout: q/k/v/o projections, gate/up/down MLP, RMS norms.
LLAMA_LIKE = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm",
})

QUANT_BLOCK_OVERHEAD = 4 / 64  # one fp32 absmax per 64-value block (bitsandbytes)


class _Arch:
    """The dimensions that matter, read from a config.json."""

    def __init__(self, cfg: dict[str, Any]):
        self.model_type = str(cfg.get("model_type", ""))
        self.hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model", "dim")
        self.layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
        self.heads = _first_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
        self.vocab = _first_int(cfg, "vocab_size")
        self.llama = self.model_type in LLAMA_LIKE or (
            "num_key_value_heads" in cfg and "intermediate_size" in cfg)
        self.intermediate = _first_int(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff") \
            or 4 * self.hidden
        self.kv_heads = _first_int(cfg, "num_key_value_heads") or self.heads
        self.head_dim = _first_int(cfg, "head_dim") or (
            self.hidden // self.heads if self.heads else 0)
        self.positions = 0 if self.llama else _first_int(cfg, "n_positions")  # learned positions
        self.tied = bool(cfg.get("tie_word_embeddings", not self.llama))
        self.attention_bias = bool(cfg.get("attention_bias", not self.llama))
        self.mlp_bias = bool(cfg.get("mlp_bias", not self.llama))
        self.experts = _first_int(cfg, "num_local_experts", "num_experts") or 1

    @property
    def known(self) -> bool:
        return bool(self.hidden and self.layers and self.heads and self.vocab)

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Per-layer linear modules: name -> (in features, out features, count per layer)."""
        h, hd = self.hidden, self.head_dim
        if self.llama:
            return {
                "q_proj": (h, self.heads * hd, 1),
                "k_proj": (h, self.kv_heads * hd, 1),
                "v_proj": (h, self.kv_heads * hd, 1),
                "o_proj": (self.heads * hd, h, 1),
                "gate_proj": (h, self.intermediate, self.experts),
                "up_proj": (h, self.intermediate, self.experts),
                "down_proj": (self.intermediate, h, self.experts),
            }
        return {  # GPT-2 naming; other architectures have the same shapes under other names
            "c_attn": (h, 3 * h, 1),
            "c_proj": (h, h, 1),
            "c_fc": (h, self.intermediate, 1),
            "mlp.c_proj": (self.intermediate, h, 1),
        }

    def layer_linear_params(self) -> int:
        total = sum(i * o * n for i, o, n in self.linears().values())
        if self.llama:
            attn_out = self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
            total += attn_out + self.hidden if self.attention_bias else 0
            total += (2 * self.intermediate + self.hidden) * self.experts if self.mlp_bias else 0
        else:
            total += 3 * self.hidden + self.hidden + self.intermediate + self.hidden  # biases
        return total

    def layer_other_params(self) -> int:
        """Norms (and a MoE router): kept unquantized."""
        norms = 2 * self.hidden * (1 if self.llama else 2)  # RMSNorm weight / LayerNorm w+b
        router = self.hidden * self.experts if self.experts > 1 else 0
        return norms + router

    def embedding_params(self) -> int:
        embed = self.vocab * self.hidden + self.positions * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        final_norm = self.hidden * (1 if self.llama else 2)
        return embed + head + final_norm


def _first_int(cfg: dict[str, Any], *names: str) -> int:
    for name in names:
        value = cfg.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return int(value)
    return 0


def param_count(model_config: dict[str, Any]) -> int:
    """The model's parameter count from its config.json (0 if the config says too little)."""
    arch = _Arch(_text_config(model_config))
    if not arch.known:
        return 0
    per_layer = arch.layer_linear_params() + arch.layer_other_params()
    return arch.layers * per_layer + arch.embedding_params()


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under text_config."""
    inner = cfg.get("text_config")
    return inner if isinstance(inner, dict) and "hidden_size" not in cfg else cfg


def _targets(arch: _Arch, spec: JobSpec) -> list[tuple[int, int, int]]:
    """(in, out, count per layer) of every linear module the adapter wraps."""
    linears = arch.linears()
    # what the trainer adapts (llmstudio.ml.targets): the spec's modules, else the default
    wanted = spec.lora.target_modules or default_target_modules(arch.model_type)
    if wanted == ["all-linear"] or wanted == "all-linear":
        return list(linears.values())
    shapes = []
    for name in [wanted] if isinstance(wanted, str) else wanted:
        short = name.rsplit(".", 1)[-1]
        # a name this architecture does not have: assume a hidden x hidden projection
        shapes.append(linears.get(name) or linears.get(short) or (arch.hidden, arch.hidden, 1))
    return shapes


def trainable_params(model_config: dict[str, Any], spec: JobSpec) -> int:
    """Parameters the optimizer updates: all of them for `full`, the adapter's otherwise."""
    cfg = _text_config(model_config)
    arch = _Arch(cfg)
    if not arch.known:
        return 0
    method, traits = spec.method, METHODS[spec.method]
    if not traits.peft:
        return param_count(cfg)
    if traits.prompt_learning:
        tokens = spec.prompt.num_virtual_tokens
        if method == "prefix_tuning":  # a key and a value per layer per virtual token
            return tokens * 2 * arch.layers * arch.hidden
        if method == "p_tuning":  # the embeddings plus the prompt encoder MLP
            enc = spec.prompt.encoder_hidden_size
            return tokens * arch.hidden + 2 * arch.hidden * enc + enc * enc
        return tokens * arch.hidden
    targets = _targets(arch, spec)
    if method == "ia3":  # one scaling vector per targeted module
        return arch.layers * sum(o * n for _, o, n in targets)
    r = spec.adalora.init_r if method == "adalora" else spec.lora.r
    # LoRA: A (r x in) + B (out x r) per targeted linear; LoHa two such pairs; DoRA adds a
    # magnitude vector (out); VeRA shares frozen A/B and trains two vectors (r + out);
    # OFT, LoKr: taken as LoRA-sized (the same order of magnitude).
    per_module = {
        "loha": lambda i, o: 2 * r * (i + o),
        "dora": lambda i, o: r * (i + o) + o,
        "vera": lambda i, o: r + o,
    }.get(method, lambda i, o: r * (i + o))
    return arch.layers * sum(per_module(i, o) * n for i, o, n in targets)


def estimate_memory(model_config: dict[str, Any], spec: JobSpec) -> dict[str, float]:
    """Bytes one training process needs: weights, gradients, optimizer, activations, total.

    {} when the config has no recognizable dimensions: nothing is known, nothing is checked."""
    cfg = _text_config(model_config or {})
    arch = _Arch(cfg)
    if not arch.known:
        return {}
    hp = spec.hyperparameters
    mixed = spec.precision in ("bf16", "fp16")

    # weights
    linear = arch.layers * arch.layer_linear_params()
    other = arch.layers * arch.layer_other_params() + arch.embedding_params()
    trainable = trainable_params(cfg, spec)
    traits = METHODS[spec.method]
    if traits.quantized_bits:
        weights = (linear * (traits.quantized_bits / 8 + QUANT_BLOCK_OVERHEAD)
                   + other * (2 if mixed else 4))
    else:
        weights = (linear + other) * 4.0
    if traits.peft:
        weights += trainable * 4.0  # the adapter, fp32
    elif spec.objective == "dpo":
        weights *= 2  # a frozen reference copy (adapters use the base model as reference)

    gradients = trainable * 4.0
    optimizer = trainable * (8.0 if hp.optimizer == "adamw" else 2.0)

    shards = spec.distributed.num_processes if spec.distributed.strategy == "fsdp" else 1
    weights, gradients, optimizer = weights / shards, gradients / shards, optimizer / shards

    # activations (Korthikanti et al. 2022; see the module docstring)
    b, s, h, a = hp.batch_size, hp.max_seq_length, arch.hidden, arch.heads
    if traits.prompt_learning:
        s += spec.prompt.num_virtual_tokens
    scale = 1.0 if mixed else 2.0  # the formula counts 16-bit activations
    layer_full = s * b * h * (34 + 5 * a * s / h) * scale
    if hp.gradient_checkpointing:
        activations = arch.layers * s * b * h * 2 * scale + layer_full
    else:
        activations = arch.layers * layer_full
    activations += b * s * arch.vocab * 4.0 * 2
    if spec.objective in ("dpo", "orpo"):
        activations *= 2

    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer,
             "activations": activations}
    parts = {k: float(math.ceil(v)) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def model_config_of(base_model: str) -> dict[str, Any] | None:
    """<base_model>/config.json as a dict, or None (a hub id, no file, not JSON)."""
    path = Path(os.path.expanduser(base_model)) / "config.json"
    try:
        with path.open(encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
