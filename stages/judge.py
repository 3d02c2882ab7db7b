"""judge: the optional judge stage, after evaluate. A judge model behind an OpenAI-compatible server compares the
base's and the adapter's answers pairwise (friction/judging.py says how); metrics/judge.json gets the adapter's win,
tie and loss with 95 % intervals.

Off by default (`judge.enabled: false`): the stage then only writes a metrics file saying so, without importing
any client, so `dvc repro` never needs a server. The server's base URL and key are read from the environment
variables that `judge.base_url_env` and `judge.api_key_env` name, and are written nowhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from friction import environment
from friction.artifacts import write_json
from friction.config import Params, load_params
from friction.pipeline import path_option


def run(params: Params, samples_path: Path, cache_dir: Path, metrics_path: Path) -> None:
    settings = params.judge
    if not settings.enabled:
        write_json(metrics_path, {"enabled": False, "reason": "judge.enabled is false in params.yaml"})
        click.echo(f"judge: off (judge.enabled: false) -> {metrics_path}")
        return
    from friction import judging

    rubric_path = Path(settings.rubric)
    if not rubric_path.is_file():
        raise click.ClickException(f"{rubric_path}: missing; judge.rubric names the judge's rubric")
    rubric = rubric_path.read_text(encoding="utf-8")
    samples = read_samples(samples_path)
    base_url = os.environ.get(settings.base_url_env, "").strip() or None
    api_key = os.environ.get(settings.api_key_env, "").strip() or "none"  # local servers take any key
    judge_settings = judging.Settings(settings.model, rubric, settings.verdict, settings.max_tokens, settings.timeout_s)
    try:
        results, requests = judging.judge_pairs(
            judging.pairs_from_samples(samples), judge_settings, judging.Cache(cache_dir), base_url, api_key
        )
    except judging.JudgeError as error:
        where = f"judge.model {settings.model!r}, ${settings.base_url_env}"
        raise click.ClickException(f"judge: {error} ({where})") from None
    report = {
        "enabled": True,
        "model": settings.model,
        "verdict": settings.verdict,
        "rubric": str(rubric_path),
        "requests_sent": requests,
        **judging.summary(results, params.seed),
    }
    write_json(metrics_path, report)
    click.echo(
        f"judge: {report['samples']} samples, {report['wins']} wins, {report['ties']} ties, "
        f"{report['losses']} losses, {report['unscoreds']} unscored; {requests} requests sent -> {metrics_path}"
    )


def read_samples(path: Path) -> list[dict]:
    """evaluate's samples: each line an object with a prompt and both responses."""
    if not path.is_file():
        raise click.ClickException(f"{path}: missing; run evaluate first (dvc repro evaluate)")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
            if not all(isinstance(sample.get(key), str) for key in ("prompt", "base_response", "adapter_response")):
                raise ValueError("needs string fields prompt, base_response and adapter_response")
        except (json.JSONDecodeError, ValueError, AttributeError) as error:
            raise click.ClickException(f"{path} line {number}: {error}") from None
        samples.append(sample)
    if not samples:
        raise click.ClickException(f"{path}: no samples")
    return samples


@click.command()
@path_option("--samples", "Output of evaluate: both models' answers.")
@path_option("--cache", "The judge's verdicts, one file each, kept between runs (git-ignored).")
@path_option("--metrics", "The adapter's win, tie and loss against the base, or that the judge is off.")
def main(samples: Path, cache: Path, metrics: Path) -> None:
    """Have a judge model (an OpenAI-compatible server) compare base and adapter answers; off unless judge.enabled."""
    recorded = environment.record("judge")  # warns before the work when the environment is not the lock's
    run(load_params(), samples, cache, metrics)
    environment.write_into(metrics, recorded)
