from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from friction.chatml import IM_END, IM_START, render
from friction.tiny_model import BOS, EOS, PAD, build_tiny_model, corpus_from_jsonl
from friction.tokens import load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2026, the team trained 12345 models; 7 of them failed!",
    "Question: what is 3 + 4? Answer: 7.\nThen multiply by 10, giving 70.",
    f"{IM_START}user\nHow many apples are left?\n{IM_END}\n",
    f"{IM_START}assistant\n<think>\nFive minus two is three.\n</think>\nThree apples.\n{IM_END}\n",
    "Lines\n\nwith  double  spaces, tabs\tand (brackets) [ok] {fine} -- dashes...",
    "She said: \"don't stop\", and we'll keep going — it's fine.",
]

PROBES = [
    "2026 12345",
    f"{IM_START}user\nhi\n{IM_END}",
    "café naïve",
    "Hello, world!\n\n  indented line\twith tab",
    "unseen words: zygote, quixotic, 3.14159",
    "emoji 🙂 and 中文 text",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n4"},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(CORPUS, out_dir, tokenizer_vocab_size=400)
    return out_dir


def test_reloaded_tokenizer_matches_trained_one(built: Path) -> None:
    # AutoTokenizer rebuilds Qwen2's pre-tokenizer; the file keeps the pipeline the merges were trained with.
    loaded = AutoTokenizer.from_pretrained(built)
    raw = Tokenizer.from_file(str(built / "tokenizer.json"))
    for text in PROBES:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert loaded.decode(ids) == text


def test_special_tokens_are_the_bases(built: Path) -> None:
    """Like DeepSeek-R1-Distill-Qwen's: BOS before every text, an EOS, single-token <think>, ChatML markers as text."""
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    for token in (BOS, EOS, PAD, "<think>", "</think>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    for marker in (IM_START, IM_END):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) > 1
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert tokenizer.model_max_length == 4096


def test_pipeline_maps_im_end_to_the_eos_id(built: Path) -> None:
    eos_id = AutoTokenizer.from_pretrained(built).eos_token_id
    tokenizer = load_tokenizer(built, None)
    assert tokenizer.eos_token == IM_END and tokenizer.eos_token_id == eos_id
    assert tokenizer.encode(f"hi\n{IM_END}", add_special_tokens=False)[-1] == eos_id
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(built))  # renamed, not added


def test_chat_template_matches_render(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == BOS + render(MESSAGES)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_rebuild_is_byte_identical(built: Path, tmp_path: Path) -> None:
    build_tiny_model(CORPUS, tmp_path / "again", tokenizer_vocab_size=400)
    assert _hashes(tmp_path / "again") == _hashes(built)


def test_model_size_and_generation(tmp_path: Path) -> None:
    # A seeded pseudo-text with enough distinct words for the trainer to reach the full 3,000-token vocabulary.
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choices(words, k=12)) + f" {rng.randint(0, 99999)}.\n" for _ in range(2000)]
    build_tiny_model(texts, tmp_path, tokenizer_vocab_size=3000)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(tokenizer) == 3000
    assert 3000 <= model.config.vocab_size < 3064
    assert 300_000 < model.num_parameters() < 2_000_000
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    inputs = tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert inputs["input_ids"].shape[1] < output.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_shape_overrides_the_config_and_leaves_the_tokenizer_alone(tmp_path: Path) -> None:
    """bench/ builds Qwen2.5-0.5B's shape this way: the 151,936-row vocabulary must reach the model, not the BPE."""
    build_tiny_model(CORPUS, tmp_path, tokenizer_vocab_size=400, vocab_size=4096, num_hidden_layers=3)
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (4096, 3, 128)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) <= 400


def test_corpus_from_jsonl_walks_nested_values(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(
        json.dumps({"q": "one", "meta": {"tags": ["two", {"deep": "three"}], "n": 4, "ok": True}})
        + "\n\n"
        + json.dumps(["four", None, 5.0])
        + "\n",
        encoding="utf-8",
    )
    second.write_text(json.dumps({"messages": [{"role": "user", "content": "five"}]}) + "\n", encoding="utf-8")
    assert list(corpus_from_jsonl([first, second])) == ["one", "two", "three", "four", "user", "five"]
