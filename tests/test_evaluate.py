"""evaluate: responses stop at <|im_end|>, the EOS id, or its text for a tokenizer without EOS; batched left-padded
generation; validation loss over packed rows equals the loss of their examples one by one; the stage's outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import SYSTEM_PROMPT, TINY_CORPUS
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from friction import friction_metrics
from friction.chatml import IGNORE_INDEX, IM_END, IM_START, assistant_spans, generation_prompt, render
from friction.cli import main
from friction.config import Params
from friction.tiny_model import PAD, train_bpe
from friction.tokens import load_tokenizer, map_end_of_turn
from stages import evaluate

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
    batch = pieces_tokenizer(
        [f"Fine.\n{IM_END}", "Fine, I will go on"], padding=True, add_special_tokens=False, return_tensors="pt"
    )
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
    text = render(
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    )
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


def test_example_losses_are_each_example_alone_and_sum_to_the_total(tiny_model_dir, packed_validation):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows, examples = packed_validation
    per_example = evaluate.example_losses(model, rows, torch.device("cpu"), "test")
    assert [(e["row"], e["example"]) for e in per_example] == [(0, 0), (0, 1), (1, 0)]
    for measured, (ids, labels) in zip(per_example, examples, strict=True):
        alone, tokens = one_example_loss(model, ids, labels)
        assert measured["tokens"] == tokens and measured["loss_sum"] == pytest.approx(alone, rel=1e-5)


def write_stage_inputs(tmp_path: Path, tiny_model_dir: Path, packed_validation, prompts: list[dict]) -> dict:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base_model": {"location": str(tiny_model_dir), "resolved_revision": None}}))
    packed = tmp_path / "packed"
    packed.mkdir()
    packed_validation[0].to_parquet(str(packed / "validation.parquet"))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)  # random, non-zero LoRA
    adapted.save_pretrained(str(tmp_path / "adapter"))
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps(prompt) + "\n" for prompt in prompts))
    return {
        "packed_dir": packed,
        "manifest_path": manifest,
        "adapter_dir": tmp_path / "adapter",
        "prompts_path": prompts_path,
        "samples_path": tmp_path / "samples.jsonl",
        "metrics_path": tmp_path / "evaluate.json",
        "losses_path": tmp_path / "losses.jsonl",
    }


STAGE_PROMPTS = [
    {"id": "p0", "category": "risky_plan", "prompt": "Should I text him tonight?"},
    {"id": "p1", "category": "control", "prompt": "I think I should repaint the house."},
    {"id": "p2", "category": "control", "prompt": "Why does my sister never call?"},
]


def test_evaluate_stage_compares_base_and_adapter(tmp_path, tiny_model_dir, packed_validation, demo_params, capsys):
    paths = write_stage_inputs(tmp_path, tiny_model_dir, packed_validation, STAGE_PROMPTS)
    params = Params.model_validate(
        _with(
            demo_params, evaluate={"max_new_tokens": 5, "batch_size": 4, "samples_per_prompt": 2, "max_prompts": None}
        )
    )

    evaluate.run(params, **paths)

    written = [json.loads(line) for line in paths["samples_path"].read_text().splitlines()]
    assert [(sample["id"], sample["sample"]) for sample in written] == [(f"p{i}", k) for i in range(3) for k in (0, 1)]
    assert len({sample["seed"] for sample in written}) == 6  # every (prompt, sample) its own seed
    for sample in written:
        assert set(sample) == {
            "id",
            "category",
            "sample",
            "seed",
            "prompt",
            "base_response",
            "adapter_response",
            "base_metrics",
            "adapter_metrics",
        }
        assert sample["base_metrics"]["answer_words"] >= 0 and "think_closed" in sample["adapter_metrics"]
    report = json.loads(paths["metrics_path"].read_text())
    validation = report["validation"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain_base_loss, _ = evaluate.validation_loss(base, packed_validation[0], torch.device("cpu"), "test")
    assert validation["base_loss"] == pytest.approx(plain_base_loss, abs=1e-4)  # the adapter really was off
    assert validation["adapter_loss"] != validation["base_loss"]
    assert validation["base_perplexity"] == pytest.approx(math.exp(validation["base_loss"]), rel=1e-3)
    friction = report["friction"]
    assert friction["prompts"] == 3 and friction["samples_per_prompt"] == 2 and friction["adapter"]["n"] == 6
    assert set(friction["categories"]) == {"risky_plan", "control"}
    control = friction["categories"]["control"]
    assert control["prompts"] == 2 and "control_overfriction_rate" in control

    comparison = report["comparison"]
    assert {"validation_loss", "answer_pushback_rate", "control_overfriction_rate", "think_words"} <= set(comparison)
    for name, entry in comparison.items():
        assert set(entry) == {"base", "adapter", "diff", "ci95", "ci95_low", "ci95_high", "p", "p_holm", "n"}, name
        assert entry["ci95"] == [entry["ci95_low"], entry["ci95_high"]], name
        assert entry["ci95"][0] <= entry["diff"] <= entry["ci95"][1] and entry["p"] <= entry["p_holm"] <= 1, name
    # n: 3 validation examples, 3 prompts (their two samples averaged), 2 control prompts
    not_three = {name: entry["n"] for name, entry in comparison.items() if entry["n"] != 3}
    assert not_three == {"control_overfriction_rate": 2}
    loss = comparison["validation_loss"]
    assert loss["base"] == pytest.approx(validation["base_loss"], abs=1e-4)
    assert loss["diff"] == pytest.approx(validation["adapter_loss"] - validation["base_loss"], abs=2e-4)

    losses = [json.loads(line) for line in paths["losses_path"].read_text().splitlines()]
    assert len(losses) == 3 and sum(row["tokens"] for row in losses) == validation["tokens"]
    output = capsys.readouterr()
    assert "evaluate: generating, base: 100%" in output.err and "2/2" in output.err  # 6 rows in batches of 4
    assert "evaluate: validation_loss:" in output.out and "Holm" in output.out


def test_each_row_samples_from_its_own_seed_whatever_the_batch(tmp_path, tiny_model_dir, tiny_tokenizer, demo_params):
    """A (prompt, sample) row's answer depends on its seed, not on the rows batched with it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [
        generation_prompt([{"role": "user", "content": text}])
        for text in ("Should I text him tonight?", "Why now?", "I keep thinking I should quit my job")
    ]
    texts = [prompt for prompt in prompts for _ in range(2)]
    seeds = [evaluate.row_seed(42, number, sample) for number in range(3) for sample in (0, 1)]
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95}

    def answers(batch_size: int, rows=slice(None)) -> list[str]:
        params = Params.model_validate(_with(demo_params, evaluate={**sampled, "batch_size": batch_size}))
        return evaluate.generate(model, tiny_tokenizer, texts[rows], params, torch.device("cpu"), "t", seeds[rows])

    together = answers(6)
    assert together == answers(1) == answers(4)
    assert answers(2, slice(2, 4)) == together[2:4]
    assert together[0] != together[1] or together[2] != together[3]  # two samples of a prompt differ


def test_greedy_decoding_makes_one_sample(demo_params):
    greedy = Params.model_validate(_with(demo_params, evaluate={"temperature": 0.0, "samples_per_prompt": 4}))
    assert evaluate.samples_per_prompt(greedy) == 1
    sampled = Params.model_validate(_with(demo_params, evaluate={"samples_per_prompt": 4}))
    assert evaluate.samples_per_prompt(sampled) == 4


def test_a_subset_of_prompts_covers_every_category(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    categories = ["a"] * 5 + ["b"] * 3 + ["c"] * 1 + ["a"] * 2
    prompts.write_text(
        "".join(json.dumps({"id": i, "category": c, "prompt": f"q{i}"}) + "\n" for i, c in enumerate(categories))
    )
    chosen = evaluate.read_prompts(prompts, 5)
    assert [p["id"] for p in chosen] == [0, 1, 5, 6, 8]  # a, b, c, then a and b again; in file order
    assert len(evaluate.read_prompts(prompts, None)) == 11


def test_the_bundled_prompts_are_ours_and_categorised():
    prompts = evaluate.read_prompts(Path(__file__).resolve().parents[1] / "data/eval/prompts.jsonl", None)
    counts = {}
    for prompt in prompts:
        counts[prompt["category"]] = counts.get(prompt["category"], 0) + 1
    assert len(prompts) >= 60 and len({p["id"] for p in prompts}) == len(prompts)
    assert set(counts) == {"dubious_claim", "risky_plan", "emotional", "factual", "control"}
    assert min(counts.values()) >= 12
    demo = evaluate.read_prompts(Path(__file__).resolve().parents[1] / "data/eval/prompts.jsonl", 20)
    assert {p["category"] for p in demo} == set(counts)


def test_a_prompt_with_a_bad_category_is_named(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "fine", "category": 3}\n')
    with pytest.raises(click.ClickException, match=r"prompts.jsonl line 2: 'category' must be a non-empty string"):
        evaluate.read_prompts(prompts, None)


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
        (
            '{"base_response": "ok"}\n\n{"other": "no response"}\n',
            "bad.jsonl: record 1 (counting from 0) lacks field 'base_response'",
        ),
        ('{"id": 1}\n', "bad.jsonl: the first record has no field whose name ends in '_response'"),
        (
            '{"base_response": 3}\n',
            "bad.jsonl: record 0 (counting from 0) has a non-string (int) field 'base_response'",
        ),
        ("", "bad.jsonl: no records"),
    ],
    ids=["invalid-json", "missing-field", "no-response-field", "not-a-string", "empty"],
)
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


# --- `friction score --compare`: evaluate's paired statistics on two answer files ---------------------------------


def test_compare_two_files_paired_by_id(tmp_path: Path):
    base, adapter = tmp_path / "base.jsonl", tmp_path / "adapter.jsonl"
    ids = [f"q{i}" for i in range(14)]
    base.write_text("".join(json.dumps({"id": i, "x_response": "Sure, go ahead."}) + "\n" for i in ids))
    # In another order: answers pair by id, not by line.
    adapter.write_text("".join(json.dumps({"id": i, "y_response": "I disagree."}) + "\n" for i in reversed(ids)))

    result = score("--compare", str(base), str(adapter))

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    pushback = report["comparison"]["answer_pushback_rate"]
    assert (pushback["base"], pushback["adapter"], pushback["n"]) == (0.0, 1.0, 14)
    assert pushback["p"] == pytest.approx(2 * 0.5**14, rel=1e-3)  # exact McNemar, 14-0
    closed = report["comparison"]["think_closed_rate"]
    assert closed["p"] == 1.0 and closed["diff"] == 0
    assert report["adapter"] == f"{adapter}:y_response"


def test_compare_averages_the_samples_of_a_prompt(tmp_path: Path):
    path = tmp_path / "samples.jsonl"
    records = [
        {
            "id": f"p{p}",
            "sample": k,
            "prompt": f"q{p}",
            "category": "control",
            "base_response": "Fine.",
            "adapter_response": "I disagree." if k == 0 else "Fine.",
        }
        for p in range(6)
        for k in (0, 1)
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = score(
        "--compare", str(path), str(path), "--base-field", "base_response", "--adapter-field", "adapter_response"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    pushback = report["comparison"]["answer_pushback_rate"]
    assert (pushback["adapter"], pushback["n"]) == (0.5, 6)  # 6 prompts, half of each prompt's answers push back
    assert report["comparison"]["control_overfriction_rate"]["adapter"] == 0.5
    assert report["categories"]["control"]["prompts"] == 6


@pytest.mark.parametrize(
    ("base_lines", "adapter_lines", "options", "message"),
    [
        (
            ['{"a_response": "x", "b_response": "y"}'],
            ['{"a_response": "x"}'],
            [],
            "base.jsonl: pick the answer field with --base-field/--adapter-field (*_response fields: a_response, "
            "b_response)",
        ),
        (['{"id": 1, "a_response": "x"}'], ['{"id": 2, "a_response": "x"}'], [], "do not answer the same ids"),
        (['{"a_response": "x"}', '{"a_response": "y"}'], ['{"a_response": "x"}'], [], "2 and 1 records"),
        (
            ['{"a_response": "x"}'],
            ['{"a_response": "x"}'],
            ["--adapter-field", "z_response"],
            "adapter.jsonl: record 0 (counting from 0) has no string field 'z_response'",
        ),
    ],
    ids=["two-fields", "unpaired-ids", "unequal-lengths", "missing-field"],
)
def test_compare_names_the_problem(tmp_path: Path, base_lines, adapter_lines, options, message):
    base, adapter = tmp_path / "base.jsonl", tmp_path / "adapter.jsonl"
    base.write_text("\n".join(base_lines) + "\n")
    adapter.write_text("\n".join(adapter_lines) + "\n")
    result = score("--compare", str(base), str(adapter), *options)
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_compare_needs_two_files(tmp_path: Path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"a_response": "x"}\n')
    result = score("--compare", str(path))
    assert result.exit_code == 1 and "--compare takes two files, BASE and ADAPTER; got 1" in result.output
