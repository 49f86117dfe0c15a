"""A tiny Llama + locally trained BPE tokenizer, for tests (no hub, no download, < 1 s).

The tokenizer is byte-level BPE (any text round-trips exactly), adds BOS like Llama's does,
and carries a ChatML chat template, so the same code paths run as with a real instruct model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llmstudio.demo_data import WORDS

BOS, EOS, PAD = "<s>", "<|im_end|>", "<pad>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = (
    "the of and to a in is it you that he was for on are as with his they i at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her would "
    "make like him into time has look two more write go see number no way could people my than "
    "first been call who its now find long down day did get come made may part over new sound "
    "take only little work know place year live me back give most very after thing our just "
    "name good sentence man think say great where help through much before line right too mean "
    "old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind picture again change off play spell air away animal "
    "point page letter mother answer found study still learn should world high every near add "
    "food between own below country last school father keep never start hello yes thanks please "
    "user assistant system question reverse order words answer sum plus minus equals"
)


def _corpus() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [
        " ".join(letters),
        " ".join(letters.upper()),
        " ".join("0123456789"),
        " ".join(str(i) for i in range(100)),
        "Reverse the order of the words: apple river stone\nAnswer: stone river apple",
        "Hello! How are you? I am fine, thanks. What is 2 + 3? It is 5.",
        ". , ; : ! ? ' \" ( ) [ ] { } - + = * / \\ _ # @ & % $ < > | ~ `",
    ]
    words = list(WORDS) + _COMMON.split()
    for i in range(0, len(words), 8):
        chunk = words[i : i + 8]
        lines.append(" ".join(chunk))
        lines.append(" ".join(w.capitalize() for w in chunk))
    return lines * 4


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    dest: Path,
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    initializer_range: float = 0.2,
) -> Path:
    """Build (once) a random tiny LlamaForCausalLM + tokenizer in `dest`; return `dest`.

    `initializer_range` is 10x the Llama default: with the usual 0.02 the frozen, tied
    embeddings of a 64-wide random model cap the logits so low that LoRA cannot push the loss
    much below log(vocab); at 0.2 a LoRA adapter memorizes a few rows in ~30 steps.
    """
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
