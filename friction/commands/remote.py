"""The DVC remote that every clone and every experiment of this repository pushes to and pulls from.

A relative local URL is a trap: DVC resolves it against each clone's own .dvc/ folder (so clones never share it),
and `dvc exp push` resolved `../dvc-remote` to `/dvc-remote` at the filesystem root. So a local path is always
written absolute. `friction remote URL` writes the remote to .dvc/config, which git shares with every clone;
`--local` writes .dvc/config.local, this clone's own.

When no remote is set at all, `make setup` (and `make demo`) make a folder on this machine the default of this clone
only: the remote ONE_MACHINE in .dvc/config.local. DVC lets .dvc/config.local win over .dvc/config, so once a shared
remote is set that one-machine default would still take every `dvc push`: `friction remote URL` removes it. Any other
local override is the user's own choice and is kept, but said: which remote `dvc push` uses here, and how to drop it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import click

NAME = "storage"
ONE_MACHINE = "one-machine"
"""The name of make setup's one-machine default remote (.dvc/config.local), which a shared remote replaces."""
ONE_MACHINE_FOLDER = "dvc-remote"
"""The folder make setup points that default at; clones set up before ONE_MACHINE existed named it NAME."""
SCHEME = re.compile(r"^(\w+)://")
# URL scheme -> (the DVC plugin module it needs, the pip extra of dvc that installs it)
PLUGINS = {
    "s3": ("dvc_s3", "s3"),
    "gs": ("dvc_gs", "gs"),
    "gcs": ("dvc_gs", "gs"),
    "ssh": ("dvc_ssh", "ssh"),
    "azure": ("dvc_azure", "azure"),
    "gdrive": ("dvc_gdrive", "gdrive"),
    "oss": ("dvc_oss", "oss"),
    "hdfs": ("dvc_hdfs", "hdfs"),
    "webhdfs": ("dvc_webhdfs", "webhdfs"),
    "webdav": ("dvc_webdav", "webdav"),
    "webdavs": ("dvc_webdav", "webdav"),
    "http": ("dvc_http", "http"),
    "https": ("dvc_http", "http"),
}
HOW_TO_SET = "set it with `make remote URL=<path or s3://, gs://, ssh://... URL>` and commit .dvc/config"


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)


def current() -> tuple[str, str] | None:
    """The default remote DVC uses here, merged over every config level: (name, URL), or None when none is set."""
    from dvc.config import Config, ConfigError

    try:
        config = Config.from_cwd(validate=True)
    except ConfigError as error:
        raise click.ClickException(f"DVC's configuration is invalid: {error}") from None
    name = config["core"].get("remote")
    if not name:
        return None
    remote = config["remote"].get(name)
    if remote is None:
        raise click.ClickException(f"core.remote names DVC remote {name!r}, which no config file defines; {HOW_TO_SET}")
    return name, str(remote["url"])


def normalised(url: str) -> str:
    """`url` as DVC should store it: a local path made absolute (see the module's docstring), other URLs as given."""
    match = SCHEME.match(url)
    if match is None:
        return str(Path(url).expanduser().resolve())
    if match.group(1) == "file":
        return str(Path(url.removeprefix("file://")).resolve())
    return url


def missing_plugin(url: str) -> str | None:
    """The pip command that installs DVC's support for `url`'s scheme, when it is not installed; else None."""
    match = SCHEME.match(url)
    if match is None or match.group(1) == "file":
        return None
    scheme = match.group(1)
    if scheme not in PLUGINS:
        raise click.ClickException(f"{url}: DVC has no remote type for {scheme}:// (known: {', '.join(PLUGINS)})")
    module, extra = PLUGINS[scheme]
    if importlib.util.find_spec(module) is None:
        from importlib.metadata import version

        return f"pip install 'dvc[{extra}]=={version('dvc')}'"
    return None


def set_remote(url: str, local: bool, name: str = NAME) -> str:
    """Make `url` the default remote, in .dvc/config (shared through git) or .dvc/config.local; return the URL kept."""
    kept = normalised(url)
    result = dvc("remote", "add", "--force", "--default", *(["--local"] if local else []), name, kept)
    if result.returncode != 0:
        raise click.ClickException(f"dvc remote add failed: {result.stderr.strip() or result.stdout.strip()}")
    return kept


def local_config() -> dict:
    """What .dvc/config.local (this clone's own level) holds, unmerged."""
    from dvc.config import Config, ConfigError

    try:
        return Config.from_cwd(validate=False).load_one("local")
    except ConfigError as error:
        raise click.ClickException(f"DVC's configuration is invalid: {error}") from None


def is_one_machine_default(name: str, url: str | None) -> bool:
    """Whether the local default `name` is what make setup wrote when no remote was set (not a user's own choice)."""
    legacy = name == NAME and url is not None and SCHEME.match(url) is None and Path(url).name == ONE_MACHINE_FOLDER
    return name == ONE_MACHINE or legacy


def local_override() -> tuple[str, str | None] | None:
    """The remote .dvc/config.local makes DVC use instead of .dvc/config's: its own default, or a local URL for the
    shared remote's name; (name, URL or None when the URL is .dvc/config's), or None when there is none."""
    local = local_config()
    remotes = local.get("remote", {})
    name = local.get("core", {}).get("remote")
    if name is None and "url" in remotes.get(NAME, {}):
        name = NAME  # no default of its own, but NAME's URL is replaced for this clone
    url = remotes.get(name, {}).get("url") if name else None
    if name is None or (name == NAME and url is None):  # none, or a default naming the shared remote as it is
        return None
    return name, url


def leave_shared_remote_in_use() -> None:
    """After the shared remote is set: drop make setup's one-machine default from .dvc/config.local, so `dvc push`
    goes to the shared remote; any other local override is kept and said, with how to drop it."""
    override = local_override()
    if override is None:
        return
    name, url = override
    if is_one_machine_default(name, url):
        result = dvc("remote", "remove", "--local", name)
        if result.returncode != 0:
            raise click.ClickException(f"dvc remote remove failed: {result.stderr.strip() or result.stdout.strip()}")
        click.echo(f"removed this clone's one-machine default remote {name!r} ({url}) from .dvc/config.local")
        return
    in_use = current()
    click.echo(
        f"warning: .dvc/config.local (this clone only) overrides it: `dvc push` here uses {describe(in_use)}. "
        f"To use the shared remote in this clone: dvc remote remove --local {name}",
        err=True,
    )


def describe(remote: tuple[str, str] | None) -> str:
    if remote is None:
        return f"no DVC remote is set; {HOW_TO_SET}"
    name, url = remote
    where = " (this folder does not exist yet: nothing was pushed there)" if is_missing_folder(url) else ""
    return f"DVC remote {name!r}: {url}{where}"


def is_missing_folder(url: str) -> bool:
    return SCHEME.match(url) is None and not Path(url).exists()


def pull(targets: tuple[str, ...]) -> None:
    """`dvc pull targets`; when it cannot bring everything, say which remote it looked in and how to set another."""
    remote = current()
    if remote is None:
        raise click.ClickException(f"nothing to pull from: {describe(None)}")
    name, url = remote
    install = missing_plugin(url)
    if install is not None:
        scheme = SCHEME.match(url).group(1)
        raise click.ClickException(
            f"DVC remote {name!r} ({url}) needs DVC's {scheme} plugin ({PLUGINS[scheme][0].replace('_', '-')}), "
            f"which is not installed: {install}"
        )
    click.echo(f"pulling from {describe(remote)}")
    result = subprocess.run(["dvc", "pull", *targets], check=False)  # DVC's own progress and list of what is missing
    if result.returncode != 0:
        raise click.ClickException(
            f"dvc pull did not find everything in DVC remote {name!r} ({url}). The files it lists were never pushed "
            "there: whoever produced them runs `dvc push` (and `dvc exp push origin EXP` for an experiment) with the "
            f"same remote. If the data lives elsewhere, {HOW_TO_SET}."
        )
