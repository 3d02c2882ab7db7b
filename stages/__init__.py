"""The pipeline's DVC stages, one module each (dvc.yaml runs `python -m stages NAME`); the library is `friction`."""
