"""pin: replace every Hub revision in params.yaml that is a branch or tag by the commit it resolves to now.

Online the Hub says which commit a revision names (repo metadata only, nothing is downloaded); with HF_HUB_OFFLINE=1
the refs of the local Hugging Face cache do, which is the commit an offline fetch would use. params.yaml is rewritten
with ruamel's round-trip mode, so comments and layout survive and only the revision values change. The changed
parameters make the next `dvc repro` rerun fetch, and from then on upstream pushes cannot change the data.
"""

from __future__ import annotations

import io
from pathlib import Path

import click
from huggingface_hub import HfApi, is_offline_mode, scan_cache_dir
from huggingface_hub.constants import HF_HUB_CACHE
from huggingface_hub.errors import CacheNotFound
from ruamel.yaml import YAML

from friction.config import PARAMS_FILE, Params
from friction.hub import (
    TRANSPORT_ERRORS,
    HubRepo,
    Resolved,
    hub_errors_explained,
    hub_repos,
    is_commit,
    last_fetch_commits,
)


def resolve_on_hub(repo: HubRepo) -> str:
    with hub_errors_explained(repo):
        try:
            commit = HfApi().repo_info(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision).sha
        except TRANSPORT_ERRORS as error:  # DNS failure, refused connection, timeout: hub passes them through
            raise click.ClickException(
                f"{repo.described}: cannot reach the Hub ({error}); set HF_HUB_OFFLINE=1 to pin from the local "
                "Hugging Face cache"
            ) from None
    if commit is None:
        raise click.ClickException(f"{repo.described}: the Hub did not say which commit that is")
    return commit


def resolve_in_cache(repo: HubRepo) -> str:
    try:
        cached = scan_cache_dir().repos
    except CacheNotFound:
        cached = frozenset()
    for entry in cached:
        if (entry.repo_id, entry.repo_type) == (repo.repo_id, repo.repo_type):
            for revision in entry.revisions:
                if repo.revision in revision.refs:
                    return revision.commit_hash
    raise click.ClickException(
        f"{repo.revision_key}: {repo.repo_type} {repo.repo_id!r} at revision {repo.revision!r} is not in the local "
        f"Hugging Face cache ({HF_HUB_CACHE}); unset HF_HUB_OFFLINE to ask the Hub"
    )


def write_revisions(path: Path, commits: dict[HubRepo, str]) -> None:
    """Set each repo's revision to its commit in the YAML file at `path`, leaving every other byte as it was."""
    yaml = YAML()  # round-trip: keeps comments, key order, flow lists and quoting
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    # ruamel writes None as an empty value; params.yaml spells it `null`.
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yaml.load(path.read_text(encoding="utf-8"))
    for repo, commit in commits.items():
        *parents, key = repo.revision_path
        mapping = document
        for parent in parents:
            mapping = mapping[parent]
        if key in mapping:
            mapping[key] = commit
        else:  # a source relying on the default revision "main": write it right after its `hub`
            mapping.insert(list(mapping).index("hub") + 1, key, commit)
    text = io.StringIO()
    yaml.dump(document, text)
    path.write_text(text.getvalue(), encoding="utf-8")


def run(params: Params, path: Path = PARAMS_FILE) -> None:
    resolve = resolve_in_cache if is_offline_mode() else resolve_on_hub
    # Every revision is resolved before params.yaml is touched: one failure leaves the file as it was.
    commits = {repo: resolve(repo) for repo in hub_repos(params) if not is_commit(repo.revision)}
    if not commits:
        click.echo(f"pin: nothing to pin: no Hub revision in {path} is a branch or tag")
        return
    write_revisions(path, commits)
    fetched = last_fetch_commits()
    for repo, commit in commits.items():
        click.echo(f"pin: {repo.revision_key}: {repo.revision} -> {commit}")
        last = fetched.get(repo.revision_key)
        if last is not None and last.moved_to(Resolved(repo.repo_id, repo.revision, commit)):
            # Pinning is meant to freeze the data; here it would change it.
            click.echo(
                f"pin: warning: {repo.revision_key}: the last fetch got commit {last.commit}, but {repo.revision!r} "
                f"is now {commit}: the next `dvc repro` fetches new data. To keep the data you have, set "
                f"{repo.revision_key}: {last.commit} instead.",
                err=True,
            )
