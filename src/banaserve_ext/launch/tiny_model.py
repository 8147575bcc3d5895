# SPDX-License-Identifier: Apache-2.0
"""The embedded default model: a tiny random-weight Llama with a locally trained tokenizer.

No hub access is needed. The same ``seed`` always yields the same weights and tokenizer, so two
runs (and two servers) agree token for token. Used by ``banaserve launch`` when no model is given
and by the integration tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgumentError

_STAMP = "banaserve_tiny_model.json"


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    seed: int = 0


#: A plain "role: content" chat template, so ``/v1/chat/completions`` works on the tiny model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _corpus() -> list[str]:
    # A small deterministic English-ish corpus; enough for a byte-level BPE with ~1k merges.
    words = (
        "the quick brown fox jumps over a lazy dog while prefill and decode servers exchange "
        "key value caches across shared memory and sockets one layer at a time so that the first "
        "token arrives sooner and every request finishes with the same answer as a single server "
        "would give numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear too"
    ).split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12 + i % 9)))
    return lines


def _train_tokenizer(vocab_size: int):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def create_tiny_llama(path: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model to ``path`` (a directory) unless an identical one is already there.

    Returns the directory. Imports torch/transformers/tokenizers lazily.
    """
    spec = spec or TinyModelSpec()
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise InvalidArgumentError("num_attention_heads must be a multiple of num_key_value_heads")
    out = Path(path)
    stamp = out / _STAMP
    # the chat template is part of the stamp: directories made before it existed are rewritten
    want = json.dumps({**asdict(spec), "chat_template": CHAT_TEMPLATE}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want:
        return out

    from ..adapters.sglang.cpu_compat import install_torchvision_placeholders

    install_torchvision_placeholders()  # transformers' lazy imports reach torchvision
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        # every id below vocab_size is a valid input, also ids the small BPE never produces
        vocab_size=max(spec.vocab_size, len(tokenizer)),
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
        # larger than the default 0.02 so greedy argmax has clear winners (no bf16 near-ties)
        initializer_range=0.1,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp.write_text(want)
    return out
