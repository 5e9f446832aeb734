"""Experiment tracking with MLflow (rank 0 only)."""
