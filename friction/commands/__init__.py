"""The user's commands behind `friction` (friction/cli.py): the published adapter in hand, the remote, releases."""
