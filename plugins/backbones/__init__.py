"""Embedding backbone plugins: turn images into vectors of one embedding space."""
