"""Evaluation outside the training loop: a run's checkpoints on an eval split, k-NN, a model at work."""
