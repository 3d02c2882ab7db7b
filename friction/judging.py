"""A judge model compares the base's and the adapter's answers, pairwise, through any OpenAI-compatible server.

For each sample of evaluate (one prompt, one answer of each model) the judge sees the user's prompt and the two
answers with their think blocks removed (`friction_metrics.split_response`), under our rubric, at temperature 0, and
is asked twice: base as answer A and adapter as B, then the other way round. An answer favoured in both orders wins;
a tie in both is a tie; orders that disagree count as a tie (the judge preferred a position, not an answer). A verdict
that names no label makes the sample unscored, never a loss.

How the verdict is taken (`judge.verdict`):
- ``choice``: a constrained choice among the labels, through transformers serve's typed-decision endpoint
  (``POST /v1/systemone``, a `choice` question): the server reads the probability of each label, so every verdict
  is a label.
- ``text``: a chat completion (``/v1/chat/completions``, temperature 0) whose text must name exactly one label, on
  a line of its own (``A``, ``B`` or ``tie``, optionally after ``Verdict:``); works with vLLM, Ollama, llama.cpp and
  hosted APIs. Text naming none, or several, is unscored.

Before the first request the server's ``/v1/models`` must list `judge.model`. Each ordered judgement is cached in a
file named by the SHA-256 of (verdict mode, model, rubric text, prompt, answer A, answer B): a rerun sends no
request for what is cached, and when everything is cached it does not contact the server at all. A server that is
down, refuses a request or answers something that is not a verdict raises `JudgeError` and caches nothing for that
request.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from friction import statistics
from friction.friction_metrics import split_response

LABELS = ("A", "B", "tie")
CRITERIA = {"A": "Answer A is better", "B": "Answer B is better", "tie": "Neither answer is better than the other"}
_TEXT_VERDICT = re.compile(r"^\W*(?:verdict\W*)?(A|B|tie)\W*$", re.IGNORECASE)


class JudgeError(Exception):
    """The judge could not be asked, or did not answer with a verdict; the message says which server and why."""


@dataclass(frozen=True)
class Pair:
    """One sample to judge: the prompt and both models' answers (think blocks removed)."""

    prompt_key: str
    sample: int
    prompt: str
    base: str
    adapter: str


@dataclass(frozen=True)
class Settings:
    model: str
    rubric: str
    verdict: str
    max_tokens: int
    timeout_s: float


def answer_only(response: str) -> str:
    """A response without its think block: what a user reads."""
    return split_response(response)[1]


def pairs_from_samples(samples: list[dict]) -> list[Pair]:
    return [
        Pair(
            prompt_key=str(sample.get("id") if sample.get("id") is not None else sample["prompt"]),
            sample=int(sample.get("sample", 0)),
            prompt=sample["prompt"],
            base=answer_only(sample["base_response"]),
            adapter=answer_only(sample["adapter_response"]),
        )
        for sample in samples
    ]


def cache_key(settings: Settings, prompt: str, answer_a: str, answer_b: str) -> str:
    material = json.dumps([settings.verdict, settings.model, settings.rubric, prompt, answer_a, answer_b])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class Cache:
    """One JSON file per ordered judgement, written atomically: a judgement is there whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is asked again
        if not isinstance(entry, dict) or entry.get("verdict") not in (*LABELS, None):
            return None
        return entry

    def put(self, key: str, entry: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".partial")
        scratch.write_text(json.dumps(entry, ensure_ascii=False), encoding="utf-8")
        scratch.replace(path)


def parse_text_verdict(text: str) -> str | None:
    """The one label the text names on a line of its own, or None (unscored) when it names none or several."""
    found = {
        match[1].upper() if match[1].lower() != "tie" else "tie"
        for line in text.splitlines()
        if (match := _TEXT_VERDICT.match(line.strip()))
    }
    return found.pop() if len(found) == 1 else None


def judge_messages(settings: Settings, prompt: str, answer_a: str, answer_b: str) -> list[dict]:
    user = (
        f"The user wrote:\n<prompt>\n{prompt}\n</prompt>\n\n"
        f"Answer A:\n<answer_a>\n{answer_a}\n</answer_a>\n\n"
        f"Answer B:\n<answer_b>\n{answer_b}\n</answer_b>\n\n"
        "Which answer is better by the rubric? Reply with exactly one of: A, B, tie."
    )
    return [{"role": "system", "content": settings.rubric}, {"role": "user", "content": user}]


class Judge:
    """An OpenAI-compatible server, asked through the `openai` client; errors become JudgeError naming the server."""

    def __init__(self, settings: Settings, base_url: str, api_key: str) -> None:
        import openai

        self.openai = openai
        self.settings, self.base_url = settings, base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=settings.timeout_s, max_retries=1)
        self.requests = 0

    def _call(self, what: str, request):
        self.requests += 1
        try:
            return request()
        except self.openai.APIConnectionError as error:
            raise JudgeError(f"cannot reach the judge server at {self.base_url} ({what}): {error}") from None
        except self.openai.APIStatusError as error:
            raise JudgeError(
                f"the judge server at {self.base_url} answered HTTP {error.status_code} to {what}: "
                f"{str(error.message)[:300]}"
            ) from None
        except self.openai.APIError as error:  # e.g. a body that is not JSON
            raise JudgeError(f"the judge server at {self.base_url} gave no valid answer to {what}: {error}") from None

    def check_model(self) -> None:
        """The server's /v1/models must list the judge model."""
        listing = self._call("GET /models", lambda: self.client.models.list())
        try:
            names = [model.id for model in listing.data]
        except (AttributeError, TypeError):
            raise JudgeError(f"{self.base_url}/models did not answer with a model list: {str(listing)[:200]}") from None
        if self.settings.model not in names:
            raise JudgeError(
                f"{self.base_url}/models does not list judge.model {self.settings.model!r}; it lists: "
                f"{', '.join(map(repr, names)) or 'nothing'}"
            )

    def verdict(self, prompt: str, answer_a: str, answer_b: str) -> dict:
        """{"verdict": label or None, "raw": what the judge said}; raises JudgeError on anything but an answer."""
        if self.settings.verdict == "choice":
            return self._choice(prompt, answer_a, answer_b)
        return self._text(prompt, answer_a, answer_b)

    def _choice(self, prompt: str, answer_a: str, answer_b: str) -> dict:
        body = {
            "model": self.settings.model,
            "state": {"user prompt": prompt, "answer A": answer_a, "answer B": answer_b},
            "questions": {"verdict": {"type": "choice", "instructions": self.settings.rubric, "criteria": CRITERIA}},
        }
        answer = self._call("POST /systemone", lambda: self.client.post("/systemone", body=body, cast_to=object))
        try:
            decision = answer["answers"]["verdict"]
            choice = decision["choice"]
        except (KeyError, TypeError):
            raise JudgeError(f"{self.base_url}/systemone answered without a verdict: {str(answer)[:300]}") from None
        if choice not in LABELS:
            raise JudgeError(f"{self.base_url}/systemone chose {choice!r}, not one of {', '.join(LABELS)}")
        return {"verdict": choice, "raw": decision.get("probabilities")}

    def _text(self, prompt: str, answer_a: str, answer_b: str) -> dict:
        completion = self._call(
            "POST /chat/completions",
            lambda: self.client.chat.completions.create(
                model=self.settings.model,
                messages=judge_messages(self.settings, prompt, answer_a, answer_b),
                temperature=0,
                max_tokens=self.settings.max_tokens,
            ),
        )
        try:
            text = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise JudgeError(f"{self.base_url}/chat/completions answered without a message: {str(completion)[:300]}")
        return {"verdict": parse_text_verdict(text), "raw": text}


def orders(pair: Pair) -> Iterator[tuple[str, str, str]]:
    """(order name, answer A, answer B): base first, then adapter first."""
    yield "base_first", pair.base, pair.adapter
    yield "adapter_first", pair.adapter, pair.base


def outcome(base_first: str | None, adapter_first: str | None) -> str:
    """The adapter's result from the two ordered verdicts: win, tie, loss, or unscored."""
    if base_first is None or adapter_first is None:
        return "unscored"
    winners = {
        {"A": "base", "B": "adapter", "tie": "tie"}[base_first],
        {"A": "adapter", "B": "base", "tie": "tie"}[adapter_first],
    }
    if len(winners) == 2:
        return "tie"  # the orders disagree: the judge followed the position, not the answer
    return {"adapter": "win", "base": "loss", "tie": "tie"}[winners.pop()]


def judge_pairs(
    pairs: list[Pair], settings: Settings, cache: Cache, base_url: str | None, api_key: str
) -> tuple[list[dict], int]:
    """Every pair's two verdicts and outcome, from the cache or the judge; and the number of requests sent."""
    keys = {
        (pair, name): cache_key(settings, pair.prompt, first, second)
        for pair in pairs
        for name, first, second in orders(pair)
    }
    pending = [(pair, name) for (pair, name), key in keys.items() if cache.get(key) is None]
    judge = None
    if pending:
        if not base_url:
            raise JudgeError("no judge server: set the environment variable named by judge.base_url_env")
        judge = Judge(settings, base_url, api_key)
        judge.check_model()
        for pair, name in pending:
            _, first, second = next(order for order in orders(pair) if order[0] == name)
            cache.put(keys[(pair, name)], judge.verdict(pair.prompt, first, second))
    results = []
    for pair in pairs:
        verdicts = {name: cache.get(keys[(pair, name)])["verdict"] for name, _, _ in orders(pair)}
        results.append(
            {
                "id": pair.prompt_key,
                "sample": pair.sample,
                **verdicts,
                "outcome": outcome(verdicts["base_first"], verdicts["adapter_first"]),
            }
        )
    return results, (judge.requests if judge else 0)


def summary(results: list[dict], seed: int) -> dict:
    """Win, tie and loss of the adapter: counts over samples, rates averaged over a prompt's scored samples first,
    each with a 95 % bootstrap interval over prompts; the adapter's score (win 1, tie 1/2, loss 0) likewise, and a
    sign test of wins against losses."""
    counts = {
        name: sum(1 for result in results if result["outcome"] == name) for name in ("win", "tie", "loss", "unscored")
    }
    by_prompt: dict[str, list[str]] = {}
    for result in results:
        if result["outcome"] != "unscored":
            by_prompt.setdefault(result["id"], []).append(result["outcome"])
    report: dict = {
        "samples": len(results),
        **{f"{name}s" if name != "loss" else "losses": count for name, count in counts.items()},
        "prompts_scored": len(by_prompt),
    }
    if not by_prompt:
        return report
    points = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    per_prompt = {
        "win_rate": [np.mean([o == "win" for o in outcomes]) for outcomes in by_prompt.values()],
        "tie_rate": [np.mean([o == "tie" for o in outcomes]) for outcomes in by_prompt.values()],
        "loss_rate": [np.mean([o == "loss" for o in outcomes]) for outcomes in by_prompt.values()],
        "adapter_score": [np.mean([points[o] for o in outcomes]) for outcomes in by_prompt.values()],
    }
    for name, values in per_prompt.items():
        values_array = np.asarray(values, dtype=float)
        low, high = statistics.bootstrap_ci(values_array, np.ones_like(values_array), seed)
        report[name] = {"value": round(float(values_array.mean()), 4), "ci95": [round(low, 4), round(high, 4)]}
    decided = counts["win"] + counts["loss"]
    report["p_sign_test"] = float(f"{stats.binomtest(counts['win'], decided).pvalue:.4g}") if decided else 1.0
    return report
