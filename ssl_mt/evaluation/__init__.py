"""Evaluation of trained checkpoints: per-image records that runs are compared on."""
