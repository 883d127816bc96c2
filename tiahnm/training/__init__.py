"""The shared training loop, cross-validation and metrics."""
