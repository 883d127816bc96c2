"""The shared training loop, its feeding, guards, metrics and splits."""
