"""Run by tests/test_distributed.py under torchrun: the train stage, after which every process saves the LoRA weights
it holds to rank-weights/<rank>.safetensors, so the test can compare the processes' copies of the model."""

import os
from pathlib import Path

from safetensors.torch import save_file

from friction import training
from friction.pipeline import stage_argv
from stages.train import main


class TrainerThatShowsItsWeights(training.SFTTrainer):
    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        weights = {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters() if p.requires_grad}
        Path("rank-weights").mkdir(exist_ok=True)
        save_file(weights, f"rank-weights/{os.environ['RANK']}.safetensors")
        return result


training.SFTTrainer = TrainerThatShowsItsWeights
main(stage_argv("train", Path(__file__).resolve().parents[1] / "dvc.yaml")[4:])  # after `python -m stages train`
