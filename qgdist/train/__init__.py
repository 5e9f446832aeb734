"""Training: the plain loop, metrics, checkpoints, and the Ray Train wrapper."""
