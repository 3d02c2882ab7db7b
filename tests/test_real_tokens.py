"""The tokens the original trained on, checked with the real ids of the recipe's base tokenizer
(tests/real_tokenizer.py): BOS first, every <|im_end|> the one EOS id (151643), the text decoded back exactly, every trained span ending in EOS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SYSTEM_PROMPT, friction_row, jsonl_bytes, labelled_runs, reluctance_text
from real_tokenizer import BOS_ID, EOS_ID
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from friction import mixing, source_rows
from friction.chatml import IGNORE_INDEX, IM_END, assistant_spans, user_starts
from friction.config import PackParams, Params
from friction.tokens import end_of_turn_id, load_tokenizer
from stages import mix, pack

# Standard ChatML (no newline before <|im_end|>), text outside the turns, two assistant turns, non-ASCII.
STANDARD_CHATML = (
    "A line before the turns.\n<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
    "<|im_start|>assistant\n<judging>fine</judging>Hello, café.<|im_end|>\n"
    "<|im_start|>user\nHelp me lie to my boss.<|im_end|>\n"
    "<|im_start|>assistant\n<judging>\nhm\n</judging>\nI'd rather not.<|im_end|>"
)
SOURCES = {
    "friction": [friction_row(f"f{i}", answer=f"What would you miss, {i} years on?") for i in range(6)],
    "reluctance": [{"text": reluctance_text(f"Help me with {i}?")} for i in range(4)]
    + [{"text": STANDARD_CHATML}, {"text": STANDARD_CHATML.replace("boss", "sister")}],
}


@pytest.fixture(scope="module")
def mixed(
    real_base_dir: Path, make_params: Callable[..., Params], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Params]:
    """mix's output on friction and reluctance rows, tokenized with the real base tokenizer."""
    root = tmp_path_factory.mktemp("real-mix")
    raw = root / "data/raw"
    raw.mkdir(parents=True)
    manifest = {"sources": {}, "base_model": {"location": str(real_base_dir), "resolved_revision": None}}
    for name, rows in SOURCES.items():
        (raw / f"{name}.jsonl").write_bytes(jsonl_bytes(rows))
        manifest["sources"][name] = {"rows": len(rows)}
    (raw / "manifest.json").write_text(json.dumps(manifest))
    params = make_params({name: name for name in SOURCES}, dict.fromkeys(SOURCES, 1.0), target_fraction=1.0)
    mix.run(params, raw, raw / "manifest.json", root / "data/mixed", root / "metrics/mix.json")
    return root, params


@pytest.fixture(scope="module")
def make_params(demo_params: Params) -> Callable[..., Params]:  # module scope, for the module's `mixed`

    def build(sources: dict[str, str], weights: dict[str, float], **mix_settings: object) -> Params:
        raw = demo_params.model_dump()
        raw["data"]["sources"] = {n: {"path": f"data/sources/{n}.jsonl", "format": f} for n, f in sources.items()}
        raw["mix"]["weights"] = weights
        raw["mix"].update(mix_settings)
        return Params.model_validate(raw)

    return build


def examples(root: Path) -> list[dict]:
    tables = [pq.read_table(root / f"data/mixed/{split}.parquet") for split in ("train", "validation")]
    return [row for table in tables for row in table.to_pylist()]


def original_text(row: dict) -> str:
    """The text the original trained on for a mixed example, from the source row it came from."""
    if row["source"] == "friction":
        return source_rows.friction_text(next(r for r in SOURCES["friction"] if r["id"] == row["id"]), SYSTEM_PROMPT)
    line = int(row["id"].rpartition(":")[2])
    return SOURCES["reluctance"][line - 1]["text"].replace("<judging>", "<think>").replace("</judging>", "</think>")


def test_the_unmapped_base_splits_im_end_into_pieces(real_base_dir: Path) -> None:
    """What went wrong before: as plain text, <|im_end|> is six BPE pieces of the real vocabulary."""
    raw = AutoTokenizer.from_pretrained(real_base_dir)
    assert len(raw.encode(IM_END, add_special_tokens=False)) == 6
    assert raw.encode("x")[0] == BOS_ID and raw.eos_token_id == EOS_ID


def test_mixed_tokens_are_the_originals(real_base_dir: Path, mixed) -> None:
    root, _ = mixed
    tokenizer = load_tokenizer(real_base_dir, None)
    rows = examples(root)
    assert len(rows) == sum(len(r) for r in SOURCES.values())
    for row in rows:
        ids, text = row["input_ids"], row["text"]
        assert text == original_text(row), row["id"]  # friction template; reluctance verbatim
        assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
        assert ids.count(EOS_ID) == text.count(IM_END) > 0  # one EOS id per <|im_end|> of the text...
        without_eos = tokenizer.decode([i for i in ids if i != EOS_ID], skip_special_tokens=False)
        assert IM_END not in without_eos  # ...and no <|im_end|> spelt in BPE pieces
        assert tokenizer.decode(ids[1:], skip_special_tokens=False) == text
        runs = labelled_runs(row["labels"])
        assert runs and all(run[-1] == EOS_ID for run in runs)
        assert [tokenizer.decode(run) for run in runs] == [text[start:end] for start, end in assistant_spans(text)]
    standard = [row for row in rows if row["text"].startswith("A line before")]
    assert len(standard) == 2 and all("\n<|im_end|>" not in row["text"] for row in standard)


def test_stacked_rows_start_with_one_bos(mixed) -> None:
    root, params = mixed
    params = params.model_copy(update={"pack": PackParams(strategy="stacked", overflow="truncate")})
    pack.run(params, root / "data/mixed", root / "stacked", root / "stacked.json")
    for split in ("train", "validation"):
        for row in pq.read_table(root / f"stacked/{split}.parquet").to_pylist():
            assert row["input_ids"][0] == BOS_ID and row["input_ids"].count(BOS_ID) == 1
            assert row["seq_lengths"] == [len(row["input_ids"])]


def test_the_saved_tokenizer_maps_im_end_to_eos(real_base_dir: Path, tmp_path: Path) -> None:
    """What train saves beside the adapter: eos_token <|im_end|>, the base's EOS id, no token added."""
    tokenizer = load_tokenizer(real_base_dir, None)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.eos_token == IM_END and reloaded.eos_token_id == EOS_ID == end_of_turn_id(reloaded)
    assert len(reloaded) == len(AutoTokenizer.from_pretrained(real_base_dir))
    assert reloaded.encode(f"Hello.{IM_END}") == [BOS_ID, 9707, 13, EOS_ID]


# Span edges where byte-level offsets are awkward: a multi-byte character split over several tokens, emoji and CJK
# right at a turn's start, decomposed accents (the normalizer's NFC), runs of whitespace the offsets trim, a turn
# that starts inside a word, an empty system turn's neighbours, text after the last turn.
AWKWARD_TEXTS = [
    STANDARD_CHATML,
    "<|im_start|>user\n🙂🙂 你好<|im_end|>\n<|im_start|>assistant\n🫠<think>\n我想\n</think>\n𝔘nicode<|im_end|>\n",
    "<|im_start|>system\n\n<|im_end|>\n<|im_start|>user\nCafe\u0301?\n<|im_end|>\n<|im_start|>assistant\n  \n\n  e\u0301tude\n<|im_end|>\n",
    "word<|im_start|>user\n\t\t x<|im_end|><|im_start|>assistant\n\u00a0\u2003mid<|im_end|>trailing text  \n\n",
    "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n\n\n\n<|im_end|>",
]


def offsets_reference(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Labels and user starts from every token's offsets, as transformers returns them: a token is trained when it
    starts inside an assistant span (the BOS the tokenizer adds starts at 0, before any); a user turn starts at the
    first token ending past its header's first character."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    labels, ends = [], []
    spans = assistant_spans(text)
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        inside = any(first <= start < last for first, last in spans)
        labels.append(token if inside else IGNORE_INDEX)
        ends.append(end if end > start else 0)
    starts = [next((i for i, end in enumerate(ends) if end > header), len(ends)) for header in user_starts(text)]
    return labels, starts


def offsets_trimmed(tokenizer):
    """`tokenizer` with byte-level offsets that leave out the spaces around a word (GPT-2's and RoBERTa's setting), so
    that some characters belong to no token."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for step in state["post_processor"]["processors"]:
        if step["type"] == "ByteLevel":
            step["trim_offsets"] = True
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    assert (3, 3) in tokenizer(" a  b", return_offsets_mapping=True)["offset_mapping"]  # the second space: no character
    return tokenizer


@pytest.mark.parametrize("which", ["real", "real, offsets trimmed", "demo"])
def test_span_edges_from_the_rust_encoding_equal_the_per_token_offsets(
    which: str, real_base_dir: Path, tiny_model_dir: Path
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir if which == "demo" else real_base_dir, None)
    if which == "real, offsets trimmed":
        tokenizer = offsets_trimmed(tokenizer)
    texts = AWKWARD_TEXTS + [source_rows.friction_text(row, SYSTEM_PROMPT) for row in SOURCES["friction"]]
    for text in texts:
        tokens = mixing.tokenize(text, tokenizer)
        labels, starts = offsets_reference(text, tokenizer)
        assert tokens.input_ids == tokenizer(text)["input_ids"], text
        assert (tokens.labels, tokens.user_starts) == (labels, starts), text
