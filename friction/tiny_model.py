"""A tiny Qwen2-architecture model and tokenizer, built deterministically from code, for the demo recipe.

The recipe fine-tunes DeepSeek-R1-Distill-Qwen-7B, which cannot be downloaded or trained here. The demo stands in a
model with the same architecture (Qwen2: RoPE, grouped-query attention, SwiGLU, tied embeddings) and the same kind of
tokenizer as the base's (byte-level BPE with Qwen2's pre-tokenization; DeepSeek's BOS, added to every text, and EOS,
which the pipeline maps to ``<|im_end|>`` as for the real base; ``<think>`` and ``</think>`` single tokens; ChatML
markers plain text), but ~0.7M parameters and a few thousand tokens of vocabulary, so tokenizing, LoRA training and
generation run on a 2-core CPU in seconds. Weights are random from a fixed seed: the demo exercises the pipeline, not
the quality of the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from friction.chatml import CHAT_TEMPLATE, THINK_CLOSE, THINK_OPEN

# The base's (DeepSeek-R1-Distill-Qwen's) special tokens, so the demo exercises what the recipe's base does.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<|vision_pad|>"
SPECIAL_TOKENS = [EOS, BOS, PAD]

# Embedding rows are padded to a multiple of this, as Qwen pads its 151,665 tokens to 152,064 rows.
VOCAB_MULTIPLE = 64


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    # Qwen2Tokenizer ignores the pipeline stored in tokenizer.json and rebuilds this exact one on load, so training
    # with any other would give merges that encode differently after reload.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    added = [AddedToken(THINK_OPEN, normalized=False), AddedToken(THINK_CLOSE, normalized=False)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),  # the base's single-token <think> and </think> complete the vocabulary
        special_tokens=special_tokens,
        # Every byte gets a token even if the corpus lacks it, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens(added)
    if BOS in special_tokens:  # the base's tokenizer puts BOS before every text it encodes
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
        )
    return tokenizer


def build_tiny_model(
    texts: Iterable[str], out_dir: Path, *, tokenizer_vocab_size: int = 3000, seed: int = 0, **shape: Any
) -> None:
    """Train a tokenizer on ``texts`` and write it with a randomly initialised tiny Qwen2 model to ``out_dir``.

    The folder loads with ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` and is byte-identical on every
    rebuild from the same texts, vocabulary size and seed. ``shape``: Qwen2Config fields that replace the tiny ones
    (bench/ builds a model of Qwen2.5-0.5B's shape this way); a ``vocab_size`` there larger than the tokenizer's
    leaves embedding rows that no token of the tokenizer uses, as Qwen's own padded rows are.
    """
    tokenizer = Qwen2Tokenizer(
        # Saved as is, so tokenizer.json keeps the trained pipeline and a reload can be checked against it.
        tokenizer_object=train_bpe(texts, tokenizer_vocab_size),
        # Byte-level BPE can encode any text: no unk token.
        unk_token=None,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    bos_id, eos_id, pad_id = tokenizer.convert_tokens_to_ids([BOS, EOS, PAD])

    tiny = dict(
        vocab_size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=torch.float32,
    )
    config = Qwen2Config(**(tiny | shape))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def corpus_from_jsonl(paths: Iterable[Path]) -> Iterator[str]:
    """Yield every string in every JSON line of ``paths`` (recursing into objects and arrays), in file order."""
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield from _strings(json.loads(line))
