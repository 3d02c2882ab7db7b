"""`python -m stages ...` is `friction ...`: how torchrun starts the train stage in each process (stages/distributed.py)."""

from stages.cli import main

main()
