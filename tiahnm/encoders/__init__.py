"""Patch encoders: images to feature vectors."""
