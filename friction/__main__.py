"""`python -m friction ...` is `friction ...`."""

from friction.cli import main

main()
