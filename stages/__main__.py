"""`python -m stages NAME [OPTIONS]`: run the DVC stage NAME, the click command `main` of stages/NAME.py.

dvc.yaml's `cmd:` lines run every stage this way; nothing here changes when a stage is added.
"""

import importlib
import sys
from pathlib import Path

names = sorted(path.stem for path in Path(__file__).parent.glob("*.py") if not path.stem.startswith("_"))
if len(sys.argv) < 2 or sys.argv[1] not in names:
    sys.exit(f"usage: python -m stages {{{'|'.join(names)}}} [OPTIONS]")
importlib.import_module(f"stages.{sys.argv[1]}").main(sys.argv[2:], prog_name=f"python -m stages {sys.argv[1]}")
