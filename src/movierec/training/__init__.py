"""Training loop, losses, batches, checkpoints and MLflow tracking."""
