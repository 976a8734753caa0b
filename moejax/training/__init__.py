"""Training: optimizer, train state and step, checkpoints, metric writers, loop."""
