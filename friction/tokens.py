"""The base model's tokenizer as the original recipe used it: ``<|im_end|>`` is its end-of-sequence token.

The original called unsloth's ``get_chat_template(tokenizer)`` (chatml, ``map_eos_token=True``), which renamed the
content of the base's EOS token (DeepSeek-R1-Distill-Qwen's ``<｜end▁of▁sentence｜>``, id 151643) to ``<|im_end|>``,
keeping its id and adding no embedding row. So every ``<|im_end|>`` of the training text was that one id, and the
model learned to end its turn with EOS: any engine stops it without being told a stop string. `load_tokenizer` does
the same, for mix (the data), train (the tokenizer saved with the adapter) and evaluate (generation stops on it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from tokenizers import Encoding, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from friction.chatml import IM_END


def load_tokenizer(location: str | Path, revision: str | None) -> PreTrainedTokenizerBase:
    """The base's fast tokenizer with ``<|im_end|>`` mapped to its EOS id; a clear error if it cannot load."""
    return map_end_of_turn(load_unmapped_tokenizer(location, revision))


def load_unmapped_tokenizer(location: str | Path, revision: str | None) -> PreTrainedTokenizerBase:
    """The base's fast tokenizer as stored (its EOS not yet renamed); a clear error if it cannot load."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location), revision=revision)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise click.ClickException(f"{location}: cannot load the base model's tokenizer ({error})") from None
    if not tokenizer.is_fast:
        raise click.ClickException(f"{location}: the tokenizer has no fast version; offsets are needed")
    return tokenizer


def map_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make ``<|im_end|>`` one token that is the tokenizer's EOS, as the original's chat-template helper did.

    - ``<|im_end|>`` already a token (a Qwen-Instruct vocabulary): it becomes the EOS token.
    - Otherwise the EOS token's content is renamed to ``<|im_end|>``: same id, no new embedding row.
    - No EOS at all: left as it is; ``<|im_end|>`` stays plain text, and generation stops on the string instead.
    """
    if tokenizer.eos_token is None or tokenizer.eos_token == IM_END:
        return tokenizer
    if IM_END in tokenizer.get_vocab():
        tokenizer.eos_token = IM_END
        return tokenizer
    old = tokenizer.eos_token
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for added in state["added_tokens"]:
        if added["content"] == old:
            added["content"] = IM_END
    vocab = state["model"].get("vocab")
    if isinstance(vocab, dict) and old in vocab:  # a BPE trained with its special tokens holds them in its vocabulary
        vocab[IM_END] = vocab.pop(old)
    # A post-processor that appends EOS names it by content: it must name the renamed token.
    state["post_processor"] = _renamed(state.get("post_processor"), old)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))  # the fast tokenizer derives its added tokens from it
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token == old:  # the pad token was the EOS token: it is now the renamed one
        tokenizer.pad_token = IM_END
    return tokenizer


def _renamed(node: Any, old: str) -> Any:
    if isinstance(node, dict):
        return {key: _renamed(value, old) for key, value in node.items()}
    if isinstance(node, list):
        return [_renamed(value, old) for value in node]
    return IM_END if node == old else node


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id generation stops on: ``<|im_end|>`` as the EOS token; None if the tokenizer has no EOS."""
    if tokenizer.eos_token != IM_END:
        return None
    return tokenizer.eos_token_id


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[Encoding]:
    """The fast tokenizer's encodings of `texts`, with the special tokens it adds (its BOS): what `tokenizer(texts)`
    computes, from the Rust side directly, so that no token's id or offsets becomes a Python object unasked."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:  # as `tokenizer(texts)` would, untruncated
        backend.no_truncation()
        backend.no_padding()
    return backend.encode_batch(list(texts), add_special_tokens=True)
