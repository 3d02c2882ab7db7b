"""`python -m stages ...` is `friction ...` (torchrun can start the train stage this way: stages/distributed.py)."""

from stages.cli import main

main()
