"""The adapter in hand: `friction chat`, `friction merge` and `friction push` on the demo's published adapter, and
their pieces (the end of a turn, the card for the Hub) on small inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from friction.chatml import IM_END
from friction.commands.chat import TurnStreamer, end_of_turn
from friction.commands.push import card_for_hub

ARTIFACT = "models/friction-adapter"
PROMPT = "I think I should repaint the whole house this weekend."


def friction(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["friction", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)


def base_and_adapter(workspace: Path):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(workspace / "data/sources/demo-base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, workspace / ARTIFACT).eval()


# --- pieces -------------------------------------------------------------------------------------------------------


def test_the_streamer_prints_the_reply_without_a_text_end_of_turn(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    streamer = TurnStreamer(tokenizer, echo=False)
    for piece in ("Wait until ", "morning.\n<|im", "_end|>", "<|im_start|>user"):  # the marker split across pieces
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)
    assert streamer.reply == "Wait until morning.\n"

    open_ended = TurnStreamer(tokenizer, echo=False)
    open_ended.on_finalized_text("a <|im")  # held back: it may be the marker's start
    assert open_ended.reply == "a "
    open_ended.on_finalized_text("possible", stream_end=True)
    assert open_ended.reply == "a <|impossible"


def test_a_turn_ends_at_eos_and_at_the_text_marker_only_when_eos_is_not_it(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos, stop_text = end_of_turn(tokenizer)
    assert eos == tokenizer.eos_token_id
    if tokenizer.encode(IM_END, add_special_tokens=False) != [eos]:
        assert stop_text is not None  # <|im_end|> is several pieces: matched as text
    tokenizer.add_special_tokens({"eos_token": IM_END})  # a tokenizer whose EOS is the end of turn, as the original's
    eos, stop_text = end_of_turn(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eos) == IM_END and stop_text is None


def test_the_card_pushed_to_the_hub_loads_the_adapter_from_the_hub():
    card = (
        'base = AutoModelForCausalLM.from_pretrained("acme/base", revision="abc", device_map="auto")\n'
        'model = PeftModel.from_pretrained(base, "models/friction-adapter")\n'
        'tokenizer = AutoTokenizer.from_pretrained("models/friction-adapter")\n'
    )
    hub = card_for_hub(card, "me/friction-lora")
    assert 'PeftModel.from_pretrained(base, "me/friction-lora")' in hub
    assert 'AutoTokenizer.from_pretrained("me/friction-lora")' in hub and '"acme/base"' in hub


# --- on the demo's adapter ----------------------------------------------------------------------------------------


@pytest.mark.needs_triton  # trains with TRL
@pytest.mark.e2e
def test_chat_replies_to_one_prompt_as_greedy_generation_does(made_demo):
    workspace, _, env = made_demo
    result = friction("chat", "--temperature", "0", "--max-new-tokens", "12", PROMPT, cwd=workspace, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    model = base_and_adapter(workspace)
    tokenizer = AutoTokenizer.from_pretrained(workspace / ARTIFACT)
    system = {"role": "system", "content": "You are a human-like AI assistant."}  # recipes/demo.yaml's system prompt
    messages = [system, {"role": "user", "content": PROMPT}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result.stdout.strip() == expected.split(IM_END)[0].strip()
    assert result.stdout.strip()

    at_head = friction(
        "chat", "--rev", "HEAD", "--temperature", "0", "--max-new-tokens", "12", PROMPT, cwd=workspace, env=env
    )
    assert at_head.returncode == 0, at_head.stderr[-3000:]
    assert at_head.stdout == result.stdout and "models/friction-adapter at HEAD" in at_head.stderr


@pytest.mark.needs_triton  # trains with TRL
@pytest.mark.e2e
def test_chat_without_a_prompt_is_a_conversation(made_demo):
    workspace, _, env = made_demo
    result = subprocess.run(
        ["friction", "chat", "--temperature", "0", "--max-new-tokens", "4"],
        input="Hello?\nAnd now?\n\n",
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model> ") == 2


@pytest.mark.needs_triton  # trains with TRL
@pytest.mark.e2e
def test_merged_model_gives_the_logits_of_base_plus_adapter(made_demo, tmp_path: Path):
    workspace, _, env = made_demo
    merged_dir = tmp_path / "merged"
    result = friction("merge", "--out", str(merged_dir), "--dtype", "fp32", cwd=workspace, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # transformers alone, no peft
    model = base_and_adapter(workspace)
    ids = AutoTokenizer.from_pretrained(merged_dir)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
        base_only = model.get_base_model()
        with model.disable_adapter():
            without = base_only(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, without, atol=1e-5)  # the adapter is in the merged weights


@pytest.mark.needs_triton  # trains with TRL
@pytest.mark.e2e
def test_push_dry_run_lists_the_folder_and_sends_nothing(made_demo):
    workspace, _, env = made_demo
    secret = "hf_not_a_real_token_0123456789"
    env = {**env, "HF_TOKEN": secret}
    result = friction("push", "--repo-id", "me/friction-demo", "--dry-run", cwd=workspace, env=env)
    assert result.returncode == 0, result.stderr
    assert "target: https://huggingface.co/me/friction-demo" in result.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "loss_curves.png"):
        assert f"  {name}  " in result.stdout
    assert "nothing sent" in result.stdout and secret not in result.stdout + result.stderr
    assert "base model data/sources/demo-base is a local folder" in result.stderr

    refused = friction("push", "--repo-id", "me/friction-demo", cwd=workspace, env=env)
    assert refused.returncode == 1 and "not pushing models/friction-adapter" in refused.stderr
    assert secret not in refused.stdout + refused.stderr


# --- merge never deletes what it did not write ------------------------------------------------------------------


@pytest.fixture
def adapter_workspace(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace as a user has it after training: models/ with the adapter, checkpoints and the published folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    published = tmp_path / ARTIFACT
    adapter.save_pretrained(str(published))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(str(published))
    (tmp_path / "models/adapter").mkdir()
    (tmp_path / "models/adapter/adapter_model.safetensors").write_bytes(b"weights of the trained adapter")
    (tmp_path / "models/checkpoints/checkpoint-4").mkdir(parents=True)
    (tmp_path / "models/checkpoints/checkpoint-4/trainer_state.json").write_text('{"global_step": 4}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


MERGE_ARGS = ["merge", "--adapter", ARTIFACT, "--dtype", "fp32"]


def every_file(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "--out .: is the current folder"),
        ("..", "--out ..: is a folder above the current one"),
        ("models", "--out models: holds adapter, checkpoints, friction-adapter, which merge did not write"),
        ("notes", "--out notes: holds ideas.txt, which merge did not write"),
        ("notes/ideas.txt", "--out notes/ideas.txt: is a file, not a folder"),
    ],
)
def test_merge_refuses_a_folder_holding_what_it_did_not_write(adapter_workspace: Path, out: str, message: str):
    from click.testing import CliRunner

    from friction.cli import main

    (adapter_workspace / "notes").mkdir()
    (adapter_workspace / "notes/ideas.txt").write_text("a week of notes")
    before = every_file(adapter_workspace)
    result = CliRunner().invoke(main, MERGE_ARGS + ["--out", out])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output and "give a new folder" in result.output, result.output
    assert every_file(adapter_workspace) == before  # nothing removed, nothing written
    assert not list(adapter_workspace.parent.glob(".*.partial")) and not list(adapter_workspace.glob("**/.*.partial"))


def test_merge_replaces_only_its_own_folder(adapter_workspace: Path):
    from click.testing import CliRunner

    from friction.cli import main

    first = CliRunner().invoke(main, MERGE_ARGS + ["--out", "merged"])
    assert first.exit_code == 0, first.output
    written = every_file(adapter_workspace / "merged")
    assert "model.safetensors" in written and "friction-merge.json" in written
    again = CliRunner().invoke(main, MERGE_ARGS + ["--out", "merged"])  # its own folder: replaced
    assert again.exit_code == 0, again.output
    assert every_file(adapter_workspace / "merged") == written

    (adapter_workspace / "merged/README.md").write_text("how we use this model")  # a person adds a file
    refused = CliRunner().invoke(main, MERGE_ARGS + ["--out", "merged"])
    assert refused.exit_code == 1 and "holds README.md, which merge did not write" in refused.output
    assert (adapter_workspace / "merged/README.md").read_text() == "how we use this model"


@pytest.mark.parametrize("what", ["tree", "blob"])
def test_chat_at_a_rev_naming_no_commit_is_a_clear_error(tmp_path: Path, what: str):
    from conftest import isolated_env

    env = {
        **isolated_env(tmp_path / "env"),
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@example.com",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@example.com",
    }
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=workspace, env=env, check=True)
    spec = "HEAD^{tree}" if what == "tree" else "HEAD:.dvc/.gitignore"
    object_id = subprocess.run(
        ["git", "rev-parse", spec], cwd=workspace, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = friction("chat", "--rev", object_id, "Hello?", cwd=workspace, env=env)
    assert result.returncode == 1, result.stderr
    assert f"--rev {object_id}: names a git {what}, not a commit" in result.stderr
    assert "Traceback" not in result.stderr
