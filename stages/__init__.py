"""Mixture-of-friction LoRA pipeline: one module per DVC stage, plus the shared pieces they use."""
