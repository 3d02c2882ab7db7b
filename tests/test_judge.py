"""The judge stage: off by default in every recipe (a metrics file, no client, no server); on, end to end against a
real OpenAI-compatible server (`transformers serve` with the demo's tiny model on 127.0.0.1), both verdict paths,
both orders, the cache, and servers that are down or answer garbage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner
from openai_server import free_port, listening, requests_in_log, transformers_serve
from packaging.version import Version
from ruamel.yaml import YAML

from friction import judging
from stages.judge import main

REPO = Path(__file__).resolve().parents[1]
THINK = "<think>\nShould I agree? Maybe not.\n</think>\n"
SAMPLES = [
    {
        "id": "p1",
        "sample": 0,
        "category": "risky_plan",
        "prompt": "I'll quit my job tomorrow, good plan?",
        "base_response": f"{THINK}Yes, go for it.",
        "adapter_response": f"{THINK}I disagree. What would you miss?",
    },
    {
        "id": "p1",
        "sample": 1,
        "category": "risky_plan",
        "prompt": "I'll quit my job tomorrow, good plan?",
        "base_response": "Sure.",
        "adapter_response": "Maybe wait a week?",
    },
    {
        "id": "p2",
        "sample": 0,
        "category": "control",
        "prompt": "Is water wet?",
        "base_response": "Yes.",
        "adapter_response": "I'm not convinced that's right.",
    },
]


# --- off by default --------------------------------------------------------------------------------------------


RECIPES = ["params.yaml", *(f"recipes/{path.name}" for path in sorted((REPO / "recipes").glob("*.yaml")))]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_leaves_the_judge_off(recipe: str):
    params = YAML(typ="safe", pure=True).load((REPO / recipe).read_text())
    assert params["judge"]["enabled"] is False


def test_the_disabled_stage_writes_its_metrics_without_a_client(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((REPO / "recipes/demo.yaml").read_text())
    script = (
        "import sys, time; start = time.perf_counter(); from stages.judge import main\n"
        "try:\n main(['--samples', 'absent.jsonl', '--cache', 'cache', '--metrics', 'metrics/judge.json'])\n"
        "except SystemExit as done:\n assert done.code in (0, None), done.code\n"
        "print(round(time.perf_counter() - start, 3), 'openai' in sys.modules, 'friction.judging' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seconds, openai_imported, judging_imported = result.stdout.split()[-3:]
    assert (openai_imported, judging_imported) == ("False", "False")
    assert float(seconds) < 1.0  # the stage itself, after Python started
    metrics = json.loads((tmp_path / "metrics/judge.json").read_text())
    assert metrics.pop("environment")["lock"] == "requirements/lock.txt"  # what every stage records
    assert metrics == {"enabled": False, "reason": "judge.enabled is false in params.yaml"}
    assert not (tmp_path / "cache").exists()


# --- verdicts, orders, outcomes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("A", "A"),
        ("b.", "B"),
        ("Tie", "tie"),
        ("Verdict: B", "B"),
        ("**A**", "A"),
        ("I think A\nA", "A"),
        ("", None),
        ("A or B, hard to say", None),
        ("A\nB", None),
        ("The answer is better.", None),
    ],
)
def test_a_text_verdict_must_name_exactly_one_label(text: str, verdict: str | None):
    assert judging.parse_text_verdict(text) == verdict


@pytest.mark.parametrize(
    ("base_first", "adapter_first", "result"),
    [
        ("B", "A", "win"),
        ("A", "B", "loss"),
        ("tie", "tie", "tie"),
        ("A", "A", "tie"),
        ("B", "tie", "tie"),
        (None, "A", "unscored"),
        ("B", None, "unscored"),
    ],
)
def test_orders_that_disagree_are_a_tie_and_a_missing_verdict_is_unscored(base_first, adapter_first, result):
    assert judging.outcome(base_first, adapter_first) == result


def test_the_judge_reads_answers_without_their_think_block():
    pair = judging.pairs_from_samples(SAMPLES)[0]
    assert pair.base == "Yes, go for it." and pair.adapter == "I disagree. What would you miss?"


def test_summary_counts_and_intervals():
    results = [
        {"id": f"p{i}", "outcome": outcome}
        for i, outcome in enumerate(["win"] * 6 + ["loss"] * 2 + ["tie"] * 2 + ["unscored"])
    ]
    report = judging.summary(results, seed=0)
    assert (report["wins"], report["losses"], report["ties"], report["unscoreds"]) == (6, 2, 2, 1)
    assert report["prompts_scored"] == 10 and report["win_rate"]["value"] == 0.6
    assert report["adapter_score"]["value"] == pytest.approx(0.7)
    low, high = report["win_rate"]["ci95"]
    assert 0 <= low < 0.6 < high <= 1
    assert report["p_sign_test"] == pytest.approx(0.2891, abs=1e-4)  # binomial 6 of 8, two-sided


# --- end to end against transformers serve ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny model, as `make demo` builds it."""
    out = tmp_path_factory.mktemp("judge-model") / "demo-base"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["friction", "demo-base", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def server(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL, access log) of transformers serve; after the module, nothing listens on its port."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with transformers_serve(demo_base, log) as base_url:
        yield base_url, log
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    assert not listening(port), f"transformers serve still listens on {port}"


def workspace(tmp_path: Path, model: str, verdict: str) -> Path:
    """A folder with params.yaml (the demo recipe, judge on), the rubric and evaluate's samples."""
    params = YAML(typ="safe", pure=True).load((REPO / "recipes/demo.yaml").read_text())
    params["judge"].update({"enabled": True, "model": model, "verdict": verdict, "timeout_s": 60})
    yaml = YAML(typ="safe", pure=True)
    with (tmp_path / "params.yaml").open("w") as handle:
        yaml.dump(params, handle)
    (tmp_path / "data/eval").mkdir(parents=True)
    (tmp_path / "data/eval/judge_rubric.md").write_text((REPO / "data/eval/judge_rubric.md").read_text())
    (tmp_path / "data/eval/samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return tmp_path


def run_judge(folder: Path, base_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(folder)
    argv = ["--samples", "data/eval/samples.jsonl", "--cache", ".judge-cache", "--metrics", "metrics/judge.json"]
    environment = {"FRICTION_JUDGE_BASE_URL": base_url, "FRICTION_JUDGE_API_KEY": "sk-test"}
    return CliRunner().invoke(main, argv, env=environment)


def cached_entries(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((folder / ".judge-cache").glob("*/*.json"))]


# transformers serve 5.17 (the unsloth set's) lists only models of the Hugging Face cache on /v1/models, not the local
# folder it serves, so the judge's check that the server lists judge.model cannot pass against it; 5.24 lists it.
SERVE_LISTS_ITS_FOLDER = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"),
    reason=f"transformers serve {transformers.__version__} does not list the folder it serves on /v1/models",
)


@SERVE_LISTS_ITS_FOLDER
def test_a_constrained_choice_always_gives_a_verdict_and_the_cache_saves_every_request(
    server, demo_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    base_url, log = server
    folder = workspace(tmp_path, str(demo_base), "choice")
    before = {path: requests_in_log(log, path) for path in ("/v1/systemone", "/v1/models", "/v1/chat/completions")}

    result = run_judge(folder, base_url, monkeypatch)

    assert result.exit_code == 0, result.output
    sent = {path: requests_in_log(log, path) - count for path, count in before.items()}
    assert sent == {"/v1/systemone": 2 * len(SAMPLES), "/v1/models": 1, "/v1/chat/completions": 0}  # both orders
    report = json.loads((folder / "metrics/judge.json").read_text())
    assert report["unscoreds"] == 0 and report["wins"] + report["ties"] + report["losses"] == len(SAMPLES)
    assert report["requests_sent"] == 2 * len(SAMPLES) + 1 and report["model"] == str(demo_base)
    assert all(entry["verdict"] in judging.LABELS for entry in cached_entries(folder))
    assert len(cached_entries(folder)) == 2 * len(SAMPLES)
    text = (folder / "metrics/judge.json").read_text() + result.output
    assert "sk-test" not in text and base_url not in text  # neither key nor URL is written anywhere

    again = run_judge(folder, base_url, monkeypatch)

    assert again.exit_code == 0, again.output
    assert {path: requests_in_log(log, path) - count for path, count in before.items()} == sent  # nothing sent
    rerun = json.loads((folder / "metrics/judge.json").read_text())
    assert rerun["requests_sent"] == 0 and {**rerun, "requests_sent": report["requests_sent"]} == report


@SERVE_LISTS_ITS_FOLDER
def test_free_text_that_names_no_label_is_unscored(server, demo_base: Path, tmp_path: Path, monkeypatch):
    base_url, log = server
    folder = workspace(tmp_path, str(demo_base), "text")
    before = requests_in_log(log, "/v1/chat/completions")

    result = run_judge(folder, base_url, monkeypatch)

    assert result.exit_code == 0, result.output
    assert requests_in_log(log, "/v1/chat/completions") - before == 2 * len(SAMPLES)
    entries = cached_entries(folder)
    assert len(entries) == 2 * len(SAMPLES) and all(isinstance(entry["raw"], str) for entry in entries)
    # The random model's text: each verdict is what its text names, or none.
    assert all(entry["verdict"] == judging.parse_text_verdict(entry["raw"]) for entry in entries)
    report = json.loads((folder / "metrics/judge.json").read_text())
    unscored_samples = report["unscoreds"]
    assert unscored_samples >= sum(1 for entry in entries if entry["verdict"] is None) / 2
    assert report["wins"] + report["ties"] + report["losses"] + unscored_samples == len(SAMPLES)


def test_a_model_the_server_does_not_list_is_refused(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base_url, log = server
    folder = workspace(tmp_path, "no-such-judge", "choice")
    before = requests_in_log(log, "/v1/systemone")
    result = run_judge(folder, base_url, monkeypatch)
    assert result.exit_code == 1 and "does not list judge.model 'no-such-judge'" in result.output, result.output
    assert "Traceback" not in result.output and requests_in_log(log, "/v1/systemone") == before
    assert cached_entries(folder) == [] and not (folder / "metrics/judge.json").exists()


def test_a_server_that_is_down_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = workspace(tmp_path, "judge", "text")
    port = free_port()
    result = run_judge(folder, f"http://127.0.0.1:{port}/v1", monkeypatch)
    assert result.exit_code == 1 and "cannot reach the judge server" in result.output, result.output
    assert "Traceback" not in result.output and cached_entries(folder) == []


class Garbage(BaseHTTPRequestHandler):
    """An 'OpenAI-compatible' server that lists the model, then answers nonsense."""

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        listing = {"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "me"}]}
        self._send(200, json.dumps(listing).encode(), "application/json")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.endswith("/systemone"):
            self._send(200, json.dumps({"answers": {"verdict": {"choice": "maybe"}}}).encode(), "application/json")
        else:
            self._send(200, b"<html>upstream timed out</html>", "text/html")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def garbage_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("verdict", "message"), [("text", "/chat/completions"), ("choice", "chose 'maybe'")])
def test_garbage_is_an_error_and_nothing_is_cached(garbage_server, tmp_path, monkeypatch, verdict, message):
    folder = workspace(tmp_path, "judge", verdict)
    result = run_judge(folder, garbage_server, monkeypatch)
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and cached_entries(folder) == []


def test_an_enabled_judge_without_a_server_url_says_which_variable(tmp_path: Path, monkeypatch):
    folder = workspace(tmp_path, "judge", "text")
    monkeypatch.delenv("FRICTION_JUDGE_BASE_URL", raising=False)
    monkeypatch.chdir(folder)
    argv = ["--samples", "data/eval/samples.jsonl", "--cache", ".judge-cache", "--metrics", "m.json"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1 and "$FRICTION_JUDGE_BASE_URL" in result.output, result.output
    assert "no judge server" in result.output and "Traceback" not in result.output


def test_a_missing_rubric_or_bad_samples_are_named(tmp_path: Path, monkeypatch):
    folder = workspace(tmp_path, "judge", "text")
    (folder / "data/eval/samples.jsonl").write_text('{"prompt": "q", "base_response": "a"}\n')
    result = run_judge(folder, "http://127.0.0.1:9/v1", monkeypatch)
    assert result.exit_code == 1, result.output
    assert "samples.jsonl line 1: needs string fields prompt, base_response and adapter_response" in result.output
    (folder / "data/eval/judge_rubric.md").unlink()
    result = run_judge(folder, "http://127.0.0.1:9/v1", monkeypatch)
    assert result.exit_code == 1 and "judge_rubric.md: missing; judge.rubric names" in result.output, result.output
