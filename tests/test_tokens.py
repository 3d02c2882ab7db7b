"""friction.tokens: <|im_end|> becomes the EOS token as the original's chat-template helper made it, for each kind of
tokenizer: an EOS to rename, <|im_end|> already a token, no EOS at all."""

from __future__ import annotations

import pytest
from conftest import TINY_CORPUS
from transformers import PreTrainedTokenizerFast

from friction.chatml import IM_END
from friction.tiny_model import EOS, PAD, train_bpe
from friction.tokens import end_of_turn_id, map_end_of_turn


def tokenizer_with(special_tokens: list[str], **roles: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(TINY_CORPUS, 300, special_tokens), **roles)


def test_the_eos_token_is_renamed_in_place() -> None:
    tokenizer = tokenizer_with([EOS, PAD], eos_token=EOS, pad_token=PAD)
    eos_id, size = tokenizer.eos_token_id, len(tokenizer)
    mapped = map_end_of_turn(tokenizer)
    assert (mapped.eos_token, mapped.eos_token_id, len(mapped)) == (IM_END, eos_id, size)
    assert mapped.encode(f"ok\n{IM_END}\n")[-2] == eos_id and EOS not in mapped.get_vocab()
    assert end_of_turn_id(mapped) == eos_id


def test_a_pad_token_that_was_the_eos_follows_it() -> None:
    mapped = map_end_of_turn(tokenizer_with([EOS], eos_token=EOS, pad_token=EOS))
    assert mapped.pad_token == IM_END and mapped.pad_token_id == mapped.eos_token_id


def test_an_im_end_token_becomes_the_eos() -> None:
    tokenizer = tokenizer_with([EOS, IM_END], eos_token=EOS)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    mapped = map_end_of_turn(tokenizer)
    assert (mapped.eos_token, mapped.eos_token_id) == (IM_END, im_end_id)
    assert mapped.convert_tokens_to_ids(EOS) != im_end_id  # the old EOS is left alone


def test_without_eos_nothing_changes_and_generation_matches_the_text() -> None:
    tokenizer = tokenizer_with([PAD], pad_token=PAD)
    mapped = map_end_of_turn(tokenizer)
    assert mapped.eos_token is None and end_of_turn_id(mapped) is None
    assert len(mapped.encode(IM_END, add_special_tokens=False)) > 1


@pytest.mark.parametrize("text", ["", "plain words, 12 of them", "<think>\nhm\n</think>\nNo."])
def test_mapping_changes_no_other_encoding(text: str) -> None:
    plain = tokenizer_with([EOS, PAD], eos_token=EOS, pad_token=PAD)
    mapped = map_end_of_turn(tokenizer_with([EOS, PAD], eos_token=EOS, pad_token=PAD))
    assert mapped.encode(text) == plain.encode(text)
    turns = mapped.encode(f"{text}\n{IM_END}\n{text}\n{IM_END}", add_special_tokens=False)
    assert turns.count(mapped.eos_token_id) == 2
