"""evaluate: responses stop at <|im_end|>, the EOS id, or its text for a tokenizer without EOS; batched left-padded
generation; validation loss over packed rows equals the loss of their examples one by one; the stage's outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from conftest import SYSTEM_PROMPT, TINY_CORPUS
from friction import friction_metrics
from stages import evaluate
from friction.chatml import IGNORE_INDEX, IM_END, IM_START, assistant_spans, generation_prompt, render
from friction.cli import main
from friction.config import Params
from friction.tiny_model import PAD, train_bpe
from friction.tokens import load_tokenizer, map_end_of_turn

IM_START_USER = f"{IM_START}user"


@pytest.fixture(scope="module")
def pieces_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's pre-tokenization and no EOS token: <|im_end|> stays plain text.

    Trained on ChatML text, so <|im_end|> comes out as several pieces, the last one running on into the newline.
    """
    bpe = train_bpe(TINY_CORPUS * 4, vocab_size=400, special_tokens=[PAD])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD)
    tokenizer.padding_side = "left"
    return map_end_of_turn(tokenizer)  # as the stages load it: without an EOS, nothing is mapped


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path):
    """The demo's tokenizer as the stages load it: <|im_end|> is its EOS token."""
    tokenizer = load_tokenizer(tiny_model_dir, None)
    tokenizer.padding_side = "left"
    return tokenizer


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_pieces_tokenizer_splits_im_end(pieces_tokenizer, tiny_tokenizer):
    assert len(encode(pieces_tokenizer, IM_END)) > 1
    assert IM_END not in pieces_tokenizer.get_vocab()
    pieces = pieces_tokenizer.convert_ids_to_tokens(encode(pieces_tokenizer, f"ok.\n{IM_END}\n"))
    assert pieces[-1] == "|>Ċ", "the last piece should run past <|im_end|>, the case a token-level match misses"
    assert len(encode(tiny_tokenizer, IM_END)) == 1


def test_stop_settings_use_the_eos_id_and_text_only_without_one(pieces_tokenizer, tiny_tokenizer):
    assert evaluate.stop_settings(tiny_tokenizer) == {"eos_token_id": tiny_tokenizer.eos_token_id}
    assert encode(tiny_tokenizer, IM_END) == [tiny_tokenizer.eos_token_id]
    assert set(evaluate.stop_settings(pieces_tokenizer)) == {"stopping_criteria"}


@pytest.mark.parametrize("tokenizer_name", ["pieces_tokenizer", "tiny_tokenizer"])
def test_turn_end_criteria_fire_exactly_where_im_end_is_complete(tokenizer_name: str, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    text = f"<think>\nMaybe not yet?\n</think>\nI disagree.\n{IM_END}\n{IM_START_USER}"
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    im_end_stop = text.index(IM_END) + len(IM_END)
    # The prefix that first holds all of <|im_end|>: up to the token whose text reaches its last character.
    complete = next(n for n, (_, end) in enumerate(encoding["offset_mapping"], start=1) if end >= im_end_stop)

    criteria = evaluate.turn_end_criteria(tokenizer)
    ids = encoding["input_ids"]
    fired = [n for n in range(1, len(ids) + 1) if criteria(torch.tensor([ids[:n]]), None).item()]
    assert fired == [complete]


def test_turn_end_criteria_judge_each_row_of_a_left_padded_batch(pieces_tokenizer):
    batch = pieces_tokenizer([f"Fine.\n{IM_END}", "Fine, I will go on"], padding=True, add_special_tokens=False,
                             return_tensors="pt")  # fmt: skip
    assert batch["attention_mask"][0].all() != batch["attention_mask"][1].all(), "one row should be padded"
    assert evaluate.turn_end_criteria(pieces_tokenizer)(batch["input_ids"], None).tolist() == [True, False]


class Scripted(LogitsProcessor):
    """Forces each row of a batch to generate its script, then padding: a model that says exactly this."""

    def __init__(self, scripts: list[list[int]], prompt_width: int, pad_id: int) -> None:
        self.scripts, self.prompt_width, self.pad_id = scripts, prompt_width, pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        forced = torch.full_like(scores, -math.inf)
        for row, script in enumerate(self.scripts):
            forced[row, script[step] if step < len(script) else self.pad_id] = 0.0
        return forced


class ScriptedModel:
    """The tiny model, with every `generate` call forced to produce the scripts."""

    def __init__(self, model, scripts: list[list[int]], pad_id: int) -> None:
        self.model, self.scripts, self.pad_id = model, scripts, pad_id
        self.outputs: list[torch.Tensor] = []

    def generate(self, input_ids, **kwargs):
        script = Scripted(self.scripts, input_ids.shape[1], self.pad_id)
        output = self.model.generate(input_ids=input_ids, logits_processor=LogitsProcessorList([script]), **kwargs)
        self.outputs.append(output)
        return output


def test_generate_stops_each_response_at_the_end_of_its_turn(pieces_tokenizer, tiny_model_dir, demo_params):
    """With <|im_end|> in pieces: sampling settings of params, a left-padded batch, rows ending at different steps."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = None  # no EOS: the stop-string path alone ends a turn
    replies = ["I disagree.", "Maybe, perhaps, I wonder whether the plan could work."]
    after_the_turn = f"\n{IM_START_USER}\nMore words the model should never get to say."
    scripts = [encode(pieces_tokenizer, f"{reply}\n{IM_END}{after_the_turn}") for reply in replies]
    scripted = ScriptedModel(model, scripts, pieces_tokenizer.pad_token_id)
    prompts = [generation_prompt([{"role": "user", "content": text}]) for text in ("Hi", "Should I text him tonight?")]

    responses = evaluate.generate(scripted, pieces_tokenizer, prompts, demo_params, torch.device("cpu"), "scripted")

    assert responses == replies
    (output,) = scripted.outputs
    prompt_width = len(pieces_tokenizer(prompts, padding=True, add_special_tokens=False)["input_ids"][0])
    turn_lengths = [len(encode(pieces_tokenizer, f"{reply}\n{IM_END}\n")) for reply in replies]
    # The longer turn ends the batch (the shorter row's tokens after its turn are cut from its response).
    assert output.shape[1] == prompt_width + max(turn_lengths)


def test_generate_stops_on_the_eos_id_of_im_end(tiny_tokenizer, tiny_model_dir, demo_params):
    """As trained: <|im_end|> is the EOS id, so the model's end of turn ends generation, and finished rows pad."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    replies = ["I disagree.", "Maybe, perhaps, I wonder whether the plan could work."]
    scripts = [encode(tiny_tokenizer, f"{reply}\n{IM_END}\n{IM_START_USER}\nNever said.") for reply in replies]
    scripted = ScriptedModel(model, scripts, tiny_tokenizer.pad_token_id)
    prompts = [generation_prompt([{"role": "user", "content": text}]) for text in ("Hi", "Should I text him tonight?")]

    assert evaluate.generate(scripted, tiny_tokenizer, prompts, demo_params, torch.device("cpu"), "eos") == replies
    (output,) = scripted.outputs
    prompt_width = len(tiny_tokenizer(prompts, padding=True)["input_ids"][0])
    turns = [encode(tiny_tokenizer, f"{reply}\n{IM_END}") for reply in replies]
    assert all(turn[-1] == tiny_tokenizer.eos_token_id for turn in turns)
    assert output.shape[1] == prompt_width + max(map(len, turns))  # the longer turn's EOS ends the batch
    short_row = output[0, prompt_width:].tolist()
    assert short_row[len(turns[0]) :] == [tiny_tokenizer.pad_token_id] * (len(turns[1]) - len(turns[0]))


def test_decoding_follows_params(demo_params: Params):
    greedy = Params.model_validate(_with(demo_params, evaluate={"temperature": 0.0}))
    assert evaluate.decoding(greedy) == {"do_sample": False}
    sampled = Params.model_validate(_with(demo_params, evaluate={"temperature": 0.7, "top_p": 0.9}))
    assert evaluate.decoding(sampled) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def _with(params: Params, **sections: dict) -> dict:
    raw = params.model_dump()
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def example_tokens(tokenizer, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the assistant turn only."""
    text = render([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
                   {"role": "assistant", "content": answer}])  # fmt: skip
    spans = assistant_spans(text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
        for token, (offset, _) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]
    return encoding["input_ids"], labels


def one_example_loss(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed cross-entropy of one example on its own, the textbook way, and its number of predicted tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.item(), int((targets != IGNORE_INDEX).sum())


@pytest.fixture(scope="module")
def packed_validation(tiny_tokenizer) -> tuple[Dataset, list[tuple[list[int], list[int]]]]:
    """Two packed rows: one holding two examples, one holding a single example; and the examples themselves."""
    examples = [
        example_tokens(tiny_tokenizer, "Should I text him tonight?", "<think>\nMaybe not yet?\n</think>\nWait."),
        example_tokens(tiny_tokenizer, "I keep thinking I should quit my job", "What would you miss if you left?"),
        example_tokens(tiny_tokenizer, "My sister never calls me back", "I disagree. Why now?"),
    ]
    rows = {"input_ids": [], "labels": [], "seq_lengths": []}
    for members in ([0, 1], [2]):
        rows["input_ids"].append([token for m in members for token in examples[m][0]])
        rows["labels"].append([label for m in members for label in examples[m][1]])
        rows["seq_lengths"].append([len(examples[m][0]) for m in members])
    return Dataset.from_dict(rows), examples


def test_validation_loss_of_packed_rows_is_the_loss_of_their_examples_one_by_one(tiny_model_dir, packed_validation):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows, examples = packed_validation
    loss, tokens = evaluate.validation_loss(model, rows, torch.device("cpu"), "test")
    sums, counts = zip(*(one_example_loss(model, ids, labels) for ids, labels in examples))
    assert tokens == sum(counts)
    assert loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)


def test_evaluate_stage_compares_base_and_adapter(tmp_path, tiny_model_dir, packed_validation, demo_params, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base_model": {"location": str(tiny_model_dir), "resolved_revision": None}}))
    packed = tmp_path / "packed"
    packed.mkdir()
    packed_validation[0].to_parquet(str(packed / "validation.parquet"))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)  # random, non-zero LoRA
    adapted.save_pretrained(str(tmp_path / "adapter"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n" for i, text in enumerate(
        ["Should I text him tonight?", "I think I should repaint the house.", "Why does my sister never call?"]
    )))  # fmt: skip
    params = Params.model_validate(_with(demo_params, evaluate={"max_new_tokens": 5, "batch_size": 2}))
    samples, metrics = tmp_path / "samples.jsonl", tmp_path / "evaluate.json"

    evaluate.run(params, packed, manifest, tmp_path / "adapter", prompts, samples, metrics)

    written = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [sample["id"] for sample in written] == ["p0", "p1", "p2"]
    for sample in written:
        assert set(sample) == {"id", "prompt", "base_response", "adapter_response", "base_metrics", "adapter_metrics"}
        assert sample["base_metrics"]["answer_words"] >= 0 and "think_closed" in sample["adapter_metrics"]
    report = json.loads(metrics.read_text())
    validation = report["validation"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain_base_loss, _ = evaluate.validation_loss(base, packed_validation[0], torch.device("cpu"), "test")
    assert validation["base_loss"] == pytest.approx(plain_base_loss, abs=1e-4)  # the adapter really was off
    assert validation["adapter_loss"] != validation["base_loss"]
    assert validation["base_perplexity"] == pytest.approx(math.exp(validation["base_loss"]), rel=1e-3)
    assert report["friction"]["prompts"] == 3 and report["friction"]["adapter"]["n"] == 3
    progress = capsys.readouterr().err
    assert "evaluate: generating, base: 100%" in progress and "2/2" in progress  # 3 prompts in batches of 2


# --- `friction score`: the friction metrics of stored responses ---------------------------------------------------

AUTHOR_EVALS = Path(__file__).resolve().parent / "fixtures/author-benchmark/all_evals.json"  # vendored, Apache-2.0


def score(*args: str):
    return CliRunner().invoke(main, ["score", *args])


def test_score_summarizes_every_response_field(tmp_path: Path):
    path = tmp_path / "samples.jsonl"
    records = [
        {"id": "a", "base_response": "<think>ok</think>Sure, go ahead.", "adapter_response": "I disagree. Do you?"},
        {"id": "b", "base_response": "Maybe. Perhaps.", "adapter_response": "<think>Maybe not</think>I refuse."},
    ]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")

    result = score(str(path))

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)[str(path)]
    assert summary == friction_metrics.score_records(records)
    assert summary["adapter_response"]["answer_pushback_rate"] == 1.0
    assert summary["base_response"]["answer_pushback_rate"] == 0.0
    assert summary["base_response"]["n"] == 2 and summary["base_response"]["answer_hedges"] == 1.0


def test_score_of_several_files_is_one_json_object(tmp_path: Path):
    paths = [tmp_path / "one.jsonl", tmp_path / "two.json"]
    paths[0].write_text(json.dumps({"x_response": "I disagree."}) + "\n")
    paths[1].write_text(json.dumps([{"x_response": "Maybe."}]))
    result = score(*map(str, paths))
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)) == [str(path) for path in paths]


def test_score_the_author_benchmark():
    result = score(str(AUTHOR_EVALS))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)[str(AUTHOR_EVALS)]
    assert summary["baseline_response"]["n"] == summary["tuned_response"]["n"] == 20
    assert summary["baseline_response"]["answer_pushback_rate"] == 0.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"base_response": "ok"}\n{"base_response": \n', "bad.jsonl:2: invalid JSON"),
        ('{"base_response": "ok"}\n\n{"other": "no response"}\n',
         "bad.jsonl: record 1 (counting from 0) lacks field 'base_response'"),
        ('{"id": 1}\n', "bad.jsonl: the first record has no field whose name ends in '_response'"),
        ('{"base_response": 3}\n',
         "bad.jsonl: record 0 (counting from 0) has a non-string (int) field 'base_response'"),
        ("", "bad.jsonl: no records"),
    ],
    ids=["invalid-json", "missing-field", "no-response-field", "not-a-string", "empty"],
)  # fmt: skip
def test_score_names_the_file_and_the_problem(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = score(str(path))
    assert result.exit_code == 1
    assert f"Error: {tmp_path}/{message}" in result.output
    assert "Traceback" not in result.output


def test_score_of_a_missing_file_fails_before_reading(tmp_path: Path):
    result = score(str(tmp_path / "absent.jsonl"))
    assert result.exit_code == 2
    assert "absent.jsonl" in result.output and "does not exist" in result.output
