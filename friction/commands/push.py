"""`friction push`: upload the published adapter folder to a Hugging Face model repository with huggingface_hub.

The folder goes as it is, in one commit, except that the card's usage snippet, which loads the adapter from its
local folder, loads it from the repository instead. The token is huggingface_hub's own (HF_TOKEN or `hf auth login`);
it is never read, printed or written here.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from friction.adapter import base_reference
from stages.card import CARD

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SNIPPET_ADAPTER = re.compile(r'PeftModel\.from_pretrained\(base, "([^"]+)"\)')


def card_for_hub(card_text: str, repo_id: str) -> str:
    """The card with every mention of the adapter's local folder in its usage snippet replaced by `repo_id`."""
    found = SNIPPET_ADAPTER.search(card_text)
    if found is None:
        return card_text
    return card_text.replace(f'"{found.group(1)}"', f'"{repo_id}"')


def files_of(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def problems(folder: Path) -> list[str]:
    """What would make the uploaded adapter unusable by whoever downloads it."""
    location, _ = base_reference(folder)
    found = []
    if Path(location).is_dir() or location.startswith((".", "/")) or location.count("/") >= 2:
        found.append(
            f"its base model {location} is a local folder: nobody who downloads the adapter can load it "
            "(and the Hub refuses a card whose base_model is not a Hub id)"
        )
    if not (folder / CARD).is_file():
        found.append(f"{folder} has no {CARD} (the model card the card stage writes)")
    return found


def run(folder: Path, repo_id: str, private: bool, dry_run: bool, message: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError

    if not REPO_ID.match(repo_id):
        raise click.ClickException(f"--repo-id {repo_id!r}: write it USER/NAME or ORG/NAME")
    files = files_of(folder)
    visibility = "private" if private else "public"
    click.echo(f"target: https://huggingface.co/{repo_id} (model repository, {visibility} if created)")
    for path in files:
        note = " (usage snippet loads the adapter from the repository)" if path.name == CARD else ""
        click.echo(f"  {path.relative_to(folder)}  {path.stat().st_size:,} bytes{note}")
    found = problems(folder)
    if dry_run:
        for problem in found:
            click.echo(f"warning: a real push would stop here: {problem}", err=True)
        click.echo(f"dry run: {len(files)} files listed, nothing sent")
        return
    if found:
        raise click.ClickException(f"not pushing {folder}: {'; '.join(found)}")
    operations = [
        CommitOperationAdd(
            path_in_repo=str(path.relative_to(folder)),
            path_or_fileobj=card_for_hub(path.read_text(encoding="utf-8"), repo_id).encode()
            if path.name == CARD
            else path,
        )
        for path in files
    ]
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except HfHubHTTPError as error:  # 401 without a token, 403 without write access; the message names no token
        raise click.ClickException(
            f"pushing to {repo_id} failed: {error}; log in with `hf auth login` or set "
            "HF_TOKEN to a token with write access"
        ) from None
    click.echo(f"pushed {len(files)} files: {commit.commit_url}")
