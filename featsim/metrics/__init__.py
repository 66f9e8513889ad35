"""Similarity metrics between feature sets: pure functions on arrays."""
